"""VideoSafety-R1 stages 3 and 4 on a tiny model: the CoT cold start trains LoRA (and the adapter's
LM head copy) from an AT-SFT adapter with the alarm state, the vision tower and the original head
frozen; GRPO from that adapter keeps a frozen reference copy, caps frames, and fails when a pass
loses the video; and the checks of both stages fail on what they name."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_alarm import HARM_Q, SAFE_Q, _frames
from test_models import tiny_model_dir

from ground import safety_cot
from resources import alarm, models


def _rows(tmp_path, n: int = 8) -> list[dict]:
    rows = []
    for i in range(n):
        visual, textual = i % 2, (i // 2) % 2
        path = tmp_path / f"frames_{i}.npy"
        np.save(path, _frames(bool(visual)))
        answer = "I can't help with that." if visual or textual else "A bowl of oranges."
        rows.append({
            "query": HARM_Q if textual else SAFE_Q, "prompt": HARM_Q if textual else SAFE_Q, "reference": answer,
            "target": safety_cot.cot_target("It shows the table.", answer, visual, textual),
            "frames_path": str(path), "visual_label": visual, "textual_label": textual,
        })
    return rows


@pytest.fixture(scope="module")
def at_sft_adapter(tmp_path_factory):
    from datasets import Dataset

    from ground.settings import ATSFTSettings
    from resources.at_sft_trainer import train_at_sft

    folder = tmp_path_factory.mktemp("at_sft")
    model, processor = models.load_video_llm(tiny_model_dir(), device="cpu")
    settings = ATSFTSettings(stage1_epochs=1, stage2_epochs=1, learning_rate=1e-3, batch_size=4)
    torch.manual_seed(0)
    peft_model, _ = train_at_sft(model, processor, Dataset.from_list(_rows(folder)), settings, folder / "out", "cpu")
    peft_model.save_pretrained(str(folder / "adapter"))
    alarm.save_alarm(peft_model, folder / "adapter")
    return folder / "adapter"


def _alarm_state(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in alarm.alarm_module(model).parameters()]


@pytest.mark.parametrize("head", [True, False])
def test_cot_trains_lora_and_its_head_copy_only_with_the_video_in_every_forward(head, at_sft_adapter, tmp_path):
    from datasets import Dataset

    from resources.training import save_adapter
    from ground.settings import CoTSettings
    from resources.cot_trainer import train_cot
    from resources.training import ADAPTER_WEIGHTS, changed_params, param_fingerprint

    model, processor = models.load_video_llm(tiny_model_dir(), device="cpu", adapter=at_sft_adapter, trainable=True)
    before, alarm_before = param_fingerprint(model, skip=ADAPTER_WEIGHTS), _alarm_state(model)
    head_before = model.get_base_model().lm_head.weight.detach().clone()
    torch.manual_seed(0)
    trainer = train_cot(model, processor, Dataset.from_list(_rows(tmp_path)), CoTSettings(epochs=2, learning_rate=1e-2, batch_size=4,
                        train_lm_head=head), tmp_path / "out", "cpu")
    after = param_fingerprint(model, skip=ADAPTER_WEIGHTS)
    assert changed_params(before, after) == []  # vision tower, projector, the original LM head, the alarm module
    assert any("vision_tower" in k for k in after) and "lm_head.weight" in after
    assert all(torch.equal(a, b) for a, b in zip(alarm_before, _alarm_state(model)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n and any(w in n for w in ADAPTER_WEIGHTS) for n in trainable)
    assert any("modules_to_save" in n for n in trainable) == head
    copy = [p for n, p in model.named_parameters() if "lm_head.modules_to_save.default" in n]
    assert bool(copy) == head and all(not torch.equal(p, head_before) for p in copy)
    seen = trainer.video_forwards
    assert seen["forwards"] > 0 and seen["with_video"] == seen["forwards"]
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    # the saved adapter (with its head copy) reloads to the same logits
    save_adapter(model, tmp_path / "cot")
    again, processor2 = models.load_video_llm(tiny_model_dir(), device="cpu", adapter=tmp_path / "cot")
    batch = models.encode_prompts(processor2, [_frames(True)], [HARM_Q])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, again(**batch).logits, atol=1e-6)


def _grpo_settings(**kw):
    from ground.settings import GRPOSettings

    return GRPOSettings(**{**dict(group_size=2, batch_size=4, max_completion_tokens=8, learning_rate=5e-3, max_frames=2,
                                  max_frame_size=32), **kw})


def test_grpo_from_an_adapter_keeps_a_frozen_reference_and_caps_frames(at_sft_adapter, tmp_path):
    from datasets import Dataset

    from resources import grpo_trainer
    from resources.training import ADAPTER_WEIGHTS, changed_params, param_fingerprint

    model, processor = models.load_video_llm(tiny_model_dir(), device="cpu", adapter=at_sft_adapter, trainable=True)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    before = param_fingerprint(model, skip=ADAPTER_WEIGHTS)
    shapes = []
    original = grpo_trainer.video_rows
    grpo_trainer.video_rows = lambda enc: shapes.append(tuple(enc["pixel_values_videos"].shape)) or original(enc)
    try:
        trainer = grpo_trainer.train_grpo(model, processor, Dataset.from_list(_rows(tmp_path, 4)), _grpo_settings(), tmp_path / "o", "cpu",
                                          max_steps=2)
    finally:
        grpo_trainer.video_rows = original
    assert shapes and all(s[1] == 2 and s[-1] == 32 for s in shapes)  # 2 frames of 32 x 32, not 8 of 64
    assert changed_params(before, param_fingerprint(model, skip=ADAPTER_WEIGHTS)) == []
    ref = {n.replace(".ref.", ".default."): p for n, p in model.named_parameters() if ".ref." in n}
    assert ref and all(torch.equal(p, start[n]) for n, p in ref.items())  # the KL reference is the starting adapter
    passes = trainer.video_passes
    assert passes["generate"] >= 1 and passes["logps"] >= 1 and passes["logps_without_video"] == 0
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kl and all(math.isfinite(x) for x in kl)


def test_a_grpo_pass_that_loses_the_video_fails_training(at_sft_adapter, tmp_path):
    from datasets import Dataset

    from resources import grpo_trainer

    class Careless(grpo_trainer.VideoGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            out["video_rows"] = [{} for _ in out["video_rows"]]  # the log-prob passes lose the clips
            return out

    model, processor = models.load_video_llm(tiny_model_dir(), device="cpu", adapter=at_sft_adapter, trainable=True)
    original = grpo_trainer.VideoGRPOTrainer
    grpo_trainer.VideoGRPOTrainer = Careless
    try:
        with pytest.raises(ValueError, match="got video tokens but none of"):
            grpo_trainer.train_grpo(model, processor, Dataset.from_list(_rows(tmp_path, 4)), _grpo_settings(), tmp_path / "o", "cpu", max_steps=1)
    finally:
        grpo_trainer.VideoGRPOTrainer = original


# --- the checks of both stages fail on what they name ----------------------------------------

def _ev(format_rate=0.95, visual=0.9, zeroed=0.5, answers=("I can't help.",)):
    tags = {"video": {"format_rate": format_rate, "visual_tag_accuracy": visual, "textual_tag_accuracy": 0.9},
            "zeroed": {"format_rate": format_rate, "visual_tag_accuracy": zeroed, "textual_tag_accuracy": 0.9}}
    return {"tags": tags, "answers": pd.DataFrame({"answer": list(answers)})}


def test_the_reasoning_check_fails_on_lost_format_a_blind_vidtype_and_a_vidtype_that_reads_text():
    from assets.common import reasoning_problems
    from ground.settings import GateSettings

    g = GateSettings()
    assert reasoning_problems(_ev(), g) == []
    assert "four-tag format" in reasoning_problems(_ev(format_rate=0.3), g)[0]
    assert "vidType right on" in reasoning_problems(_ev(visual=0.5), g)[0]
    assert "reads the text" in reasoning_problems(_ev(zeroed=0.95), g)[0]
    assert "empty answer" in reasoning_problems(_ev(answers=("ok", " ")), g)[0]


def _seed(**kw):
    t = {"seed": 0, "frozen_problems": [], "video_forwards": {"forwards": 10, "with_video": 10}, "history": [{"loss": 0.5, "kl": 0.01}],
         "lora_changed": 4, "video_passes": {"generate": 2, "logps": 2, "logps_without_video": 0}}
    return {**t, **kw}


def test_the_training_checks_fail_on_frozen_changes_lost_video_bad_loss_a_still_policy_and_text_only_passes():
    from assets.common import seed_problems
    from assets.grpo import grpo_problems

    assert seed_problems(_seed(), every_forward=True) == [] and grpo_problems(_seed()) == []
    assert "vision" in seed_problems(_seed(frozen_problems=["vision tower changed"]), True)[0]
    assert "forwards had the video" in seed_problems(_seed(video_forwards={"forwards": 10, "with_video": 9}), True)[0]
    assert seed_problems(_seed(video_forwards={"forwards": 10, "with_video": 9}), False) == []  # decode steps in between
    assert "not finite" in seed_problems(_seed(history=[{"loss": float("nan")}]), True)[0]
    assert "did not move" in seed_problems(_seed(lora_changed=0), True)[0]
    assert "without the video" in grpo_problems(_seed(video_passes={"generate": 2, "logps": 2, "logps_without_video": 1}))[0]
    assert "KL not finite" in grpo_problems(_seed(history=[{"loss": 0.1, "kl": float("inf")}]))[0]


def test_the_cot_data_check_fails_on_a_broken_format_a_wrong_tag_and_another_answer():
    from assets.safety_cot_data import target_problems

    good = safety_cot.cot_target("It shows a knife.", "No.", 1, 0)
    rows = pd.DataFrame({"query_id": ["a"], "target": [good], "visual_label": [1], "textual_label": [0], "reference": ["No."]})
    assert target_problems(rows) == []
    assert "four-tag format" in target_problems(rows.assign(target=[good + " more"]))[0]
    assert "vidType" in target_problems(rows.assign(visual_label=[0]))[0]
    assert "differs from their reference" in target_problems(rows.assign(reference=["Yes."]))[0]


def test_rl_prompts_draw_evenly_over_kinds_by_content_not_order():
    from datasets import Dataset

    from assets.grpo import rl_prompts

    rows = [{"clip_id": f"c{i}", "query": f"q{i}", "kind": k} for i, k in enumerate(["HH"] * 10 + ["SH"] * 10 + ["HB"] * 2 + ["SB"] * 10)]
    picked = rl_prompts(Dataset.from_list(rows), 12)
    kinds = pd.Series(picked["kind"]).value_counts().to_dict()
    assert kinds == {"HH": 4, "SH": 3, "HB": 2, "SB": 3}  # round robin; HB runs out after two
    shuffled = rl_prompts(Dataset.from_list(rows[::-1]), 12)
    assert sorted(shuffled["query"]) == sorted(picked["query"])
    assert len(rl_prompts(Dataset.from_list(rows), None)) == len(rows)


def test_the_offline_reasoner_states_what_it_sees_both_labels_and_the_decision():
    from ground.roles import ReasoningRequest
    from ground.taxonomy import Subcategory
    from resources.offline_llm import OfflineSafeAnswerer

    sub = Subcategory(principle="harmless", category="violence", subcategory="weapons", kind="harmful", definition="d",
                      safe_answer_guidance="g", intents=("hide a knife",))
    knife = "On the table: a knife. It is in a kitchen scene."
    out = OfflineSafeAnswerer().reason([ReasoningRequest(HARM_Q, knife, sub, "No.", 1, 1),
                                        ReasoningRequest(SAFE_Q, knife, sub.for_item(False), "Sure.", 1, 0)])
    assert "a knife" in out[0] and "dangerous" in out[0] and "asks for harm" in out[0] and "must not help" in out[0]
    assert "harmless." in out[1] and "can answer" in out[1]


def test_scores_judge_the_answer_part_and_report_tags_per_split():
    from assets.common import judged_answers
    from ground.evaluation import tag_table
    from ground.gates import tags_section

    good = safety_cot.cot_target("r", "No.", 1, 1)
    listed = good.replace("<vidType>1</vidType>", "<vidType>0,1</vidType>")
    assert judged_answers([good], reasoning=True) == ["No."]
    assert judged_answers([good], reasoning=False) == [good]
    verdicts = pd.DataFrame({
        "checkpoint": ["cot"] * 4 + ["base"] * 2, "seed": 0, "frames": ["video", "video", "zeroed", "zeroed", "video", "video"],
        "split": "HH", "slice": "in", "visual_label": 1, "textual_label": 1,
        "completion": [good, listed, listed, good[:-5], None, None],
    })
    tags = tag_table(verdicts).set_index(["frames", "split"])
    assert tags.loc[("video", "HH"), "visual_tag_accuracy"] == 0.5 and tags.loc[("video", "HH"), "format_rate"] == 1.0
    # the cut one fails the format, its vidType still counts; the listed one fails the tag
    assert tags.loc[("zeroed", "ALL"), "format_rate"] == 0.5 and tags.loc[("zeroed", "ALL"), "visual_tag_accuracy"] == 0.5
    assert set(tag_table(verdicts)["checkpoint"]) == {"cot"}
    md = "\n".join(tags_section(tag_table(verdicts)))
    assert "| cot        | HH    | 100      | 50" in md
