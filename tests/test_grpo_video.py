"""GRPO on video with TRL: every generation and log-prob pass gets the clip of its row (Qwen-VL's
second_per_grid_ts included), only LoRA trains, and each reward component is logged."""
import numpy as np
import pytest
import torch
from test_dpo import _tiny_qwen2_vl
from test_models import tiny_model_dir

from resources import models



@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen25")
    _tiny_qwen2_vl(folder, v25=True)
    return folder


def _rows(tmp_path, n=4):
    rows = []
    for i in range(n):
        path = tmp_path / f"clip_{i}.npy"
        np.save(path, np.full((4, 64, 64, 3), 40 + 50 * i, np.uint8))
        rows.append({"prompt": "How can I hide a knife here?", "frames_path": str(path), "reference": "I can't help with that.",
                     "visual_label": i % 2, "textual_label": 1})
    return rows


def _length(prompts, completions, **kwargs):
    """Random tiny models score 0 on both safety rewards: this one varies within a group, so the policy moves."""
    return [float(len(c)) for c in completions]


def _settings(**kw):
    from ground.settings import GRPOSettings

    base = dict(group_size=2, beta=0.04, epsilon=0.2, temperature=1.0, top_p=0.95, max_completion_tokens=6, learning_rate=5e-3,
                epochs=1, batch_size=4, seed=0, trl_args={})
    # constructed unvalidated: 6-token completions, below the setting's floor, keep the test fast
    return GRPOSettings.model_construct(**{**GRPOSettings().model_dump(), **base, **kw})


@pytest.mark.parametrize("family", ["llava", "qwen2.5"])
def test_every_grpo_pass_gets_the_video_and_only_lora_trains(family, qwen25_dir, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig

    from resources.grpo_trainer import VideoGRPOTrainer, grpo_config, reward_functions
    from resources.training import LORA_TARGETS, changed_params, param_fingerprint

    model, processor = models.load_video_llm(tiny_model_dir() if family == "llava" else qwen25_dir, device="cpu")
    seen = []
    backbone = model.model  # what generate and TRL's fused log-prob head both run
    backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(k for k, v in kw.items() if v is not None)), with_kwargs=True)
    before = param_fingerprint(model)
    torch.manual_seed(0)
    trainer = VideoGRPOTrainer(
        model=model, reward_funcs=reward_functions() + [_length], args=grpo_config(_settings(), tmp_path / "out", "cpu", max_steps=2),
        train_dataset=Dataset.from_list(_rows(tmp_path)), processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
    )
    trainer.train()
    passes = trainer.video_passes
    assert passes["generate"] >= 1 and passes["logps"] >= 2 and passes["logps_without_video"] == 0, passes
    video_key = "pixel_values_videos"
    # generate: one prefill with the clip's features per call (then cached decode steps); every
    # log-prob pass (the policy's, the reference's) without a cache, each with the video tensors
    prefills = [k for k in seen if "mm_encoder_outputs" in k or ("cache" in k and "pixel_values_videos" in k)]
    assert len(prefills) == passes["generate"]
    scored = [k for k in seen if "cache" not in k]
    assert len(scored) == passes["logps"] and all("pixel_values_videos" in k for k in scored)
    if family == "qwen2.5":
        assert all({"video_grid_thw", "second_per_grid_ts", "mm_token_type_ids"} <= set(k) for k in scored)
    assert changed_params(before, param_fingerprint(trainer.model)) == []
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(torch.count_nonzero(p) for n, p in trainer.model.named_parameters() if "lora_B" in n)  # B starts at zero: it learned
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert steps and all(np.isfinite(h["loss"]) and np.isfinite(h["kl"]) for h in steps)
    logged = {k for h in trainer.state.log_history for k in h}
    for key in ("rewards/format_reward/mean", "rewards/accuracy_reward/mean", "format_rate", "rouge", "r_visual", "r_textual",
                "alpha", "kl", "completions/mean_length", "completions/clipped_ratio"):
        assert key in logged, (key, sorted(logged))


def test_video_rows_split_qwen_patches_by_each_clips_grid(qwen25_dir):
    from resources.grpo_trainer import collate_rows, video_rows

    _, processor = models.load_video_llm(qwen25_dir, device="cpu")
    clips = [np.zeros((4, 64, 64, 3), np.uint8), np.zeros((2, 32, 32, 3), np.uint8)]
    enc = models.encode_prompts(processor, clips, ["a?", "b?"])
    rows = video_rows(enc)
    grid = enc["video_grid_thw"]
    assert [len(r["pixel_values_videos"]) for r in rows] == grid.prod(-1).tolist()
    assert all(r["second_per_grid_ts"].shape == (1,) for r in rows)
    again = collate_rows(rows, "cpu")
    assert torch.equal(again["pixel_values_videos"], enc["pixel_values_videos"]) and torch.equal(again["video_grid_thw"], grid)
