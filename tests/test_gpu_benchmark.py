"""benchmarks/gpu_step.py: its cpu variant runs all three rows (the project's video DPO, TRL's stock
DPO, the project's video GRPO) and counts what each processed; the FLOP and MFU formulas give the
numbers worked out by hand; the 7b config has LLaVA-NeXT-Video-7B's shape and token count."""
import json

import numpy as np
import pytest

from benchmarks import gpu_step

ROWS = ["project DPO (video collator)", "stock TRL DPO (text only)", "project GRPO (video)"]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_step") / "cpu.json"
    assert gpu_step.main(["--size", "cpu", "--steps", "1", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_every_row_ran_a_timed_step_and_counted_its_tokens(cpu_run):
    rows = {r["row"]: r for r in cpu_run["rows"]}
    assert list(rows) == ROWS
    for r in rows.values():
        assert r["step_s"] > 0 and r["tokens"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_s"])
        assert r["mfu"] is None  # no peak given on the CPU
        assert r["flops"] == gpu_step.step_flops(r["n_lm"], r["tokens"], r["tokens_no_grad"], r["n_vision"], r["vision_patches"])
    dpo, stock, grpo = (rows[n] for n in ROWS)
    # the same pairs: the project's sequences carry the clip's tokens, stock TRL's dropped them
    assert stock["video_tokens"] == 0 and stock["vision_patches"] == 0
    assert dpo["video_tokens"] == 4 * 32  # 2 pairs, chosen and rejected, 8 frames x 4 tokens
    assert dpo["tokens"] > stock["tokens"]
    assert dpo["tokens"] - dpo["video_tokens"] == pytest.approx(stock["tokens"], rel=0.1)  # about the same text around them
    assert dpo["tokens_no_grad"] == dpo["tokens"]  # the reference pass scores the same sequences
    assert grpo["video_tokens"] > 0 and grpo["tokens_no_grad"] > grpo["tokens"]  # generation and reference passes


def test_dpo_trains_lora_only_and_leaves_the_vision_tower(cpu_run):
    for r in cpu_run["rows"]:
        assert r["frozen_changed"] == [], r["row"]  # vision tower, projector, base language model
        assert r["freed"], r["row"]  # else the next row's peak memory would hold it too
        if "DPO" in r["row"]:
            assert r["lora_tensors"] > 0 and r["lora_changed"] == r["lora_tensors"], r


def test_the_table_names_every_row(cpu_run):
    text = gpu_step.table(cpu_run)
    assert all(f"| {name} |" in text for name in ROWS) and text.count("| n/a |") == 3
    assert "text only" in gpu_step.notes(cpu_run)


def test_flops_and_mfu_on_known_numbers():
    # 7e9 params, 1000 tokens with gradient, 1000 without, 3e8 vision params over 1e4 patches
    flops = gpu_step.step_flops(7e9, 1000, 1000, 3e8, 10_000)
    assert flops == 6 * 7e9 * 1000 + 2 * 7e9 * 1000 + 2 * 3e8 * 10_000 == 6.2e13
    assert gpu_step.mfu(flops, 0.5, 989) == pytest.approx(6.2e13 / 0.5 / 989e12)  # 12.5 %
    assert gpu_step.mfu(flops, 0.5, None) is None


def test_the_7b_variant_has_llava_next_video_7bs_shape(tmp_path):
    """On the meta device (no memory): 7.06e9 parameters, and 144 video tokens a frame from the processor."""
    from resources import models

    spec = {**gpu_step.spec_of("7b"), "device": "meta"}
    tok = models.train_tokenizer([gpu_step.QUERY, gpu_step.REFUSAL, gpu_step.COMPLY], vocab_size=800)
    model = gpu_step.build_model(spec, tok, seed=0)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(7.06e9, rel=2e-3)
    meter = gpu_step.Meter(model)
    assert meter.n_lm == pytest.approx(6.61e9, rel=2e-3) and meter.n_vision == pytest.approx(3.24e8, rel=2e-3)
    meter.remove()
    processor = gpu_step.build_processor(tok, 336, 14)
    clip = np.zeros((spec["frames"], 336, 336, 3), np.uint8)
    enc = models.encode_prompts(processor, [clip], ["What happens?"])
    assert int((enc["input_ids"] == model.config.video_token_index).sum()) == spec["frames"] * 144
