"""The AT-SFT stages' own logic: the data check fails on what it names, the authors' JSON shape,
and the checkpoint check's head thresholds."""
import numpy as np
import pandas as pd

from ground.settings import GateSettings


def _rows(tmp_path, kinds=("HH", "SH", "HB", "SB")) -> pd.DataFrame:
    rows = []
    for i, kind in enumerate(kinds):
        video, frames = tmp_path / f"clip_{i}.mp4", tmp_path / f"clip_{i}.npy"
        video.write_bytes(b"x")
        np.save(frames, np.zeros((2, 4, 4, 3), np.uint8))
        rows.append({"query_id": f"q{i}", "clip_id": f"c{i}", "video_path": str(video), "frames_path": str(frames),
                     "query": "What is this?", "target": "A spoon.", "kind": kind, "visual_label": int(kind[0] == "H"),
                     "textual_label": int(kind[1] == "H"), "harmful": kind != "SB", "subcategory": "s", "category": "c"})
    return pd.DataFrame(rows)


def test_the_data_check_passes_good_rows_and_fails_a_missing_kind_a_bad_label_and_a_missing_video(tmp_path):
    from assets.at_sft_data import data_check

    assert data_check(_rows(tmp_path)).passed
    missing_kind = data_check(_rows(tmp_path, ("HH", "SH", "SB")))
    assert not missing_kind.passed and "HB" in str(missing_kind.metadata["results"].value)
    bad = _rows(tmp_path).assign(visual_label=[0, 1, 2, 0])
    assert not data_check(bad).passed
    gone = _rows(tmp_path)
    gone.loc[0, "video_path"] = str(tmp_path / "nowhere.mp4")
    result = data_check(gone)
    assert not result.passed and "video_path files do not exist" in str(result.metadata["results"].value)


def test_authors_json_has_their_shape(tmp_path):
    from assets.at_sft_data import authors_json

    first = authors_json(_rows(tmp_path))[2]  # HB
    assert first["video"] == [first["video"][0]] and first["video"][0].endswith("clip_2.mp4")
    assert first["conversations"] == [{"from": "human", "value": "<video>\nWhat is this?"}, {"from": "gpt", "value": "A spoon."}]
    assert first["safety_labels"] == {"visual": 1, "textual": 0}


def test_the_checkpoint_check_names_weak_heads_and_a_visual_head_that_reads_text():
    from assets.at_sft import heads_problems

    table = pd.DataFrame([
        {"seed": 0, "frames": "video", "visual_auroc": 0.95, "textual_auroc": 0.9},
        {"seed": 0, "frames": "zeroed", "visual_auroc": 0.5, "textual_auroc": 0.9},
    ])
    assert heads_problems(table, GateSettings()) == []
    weak = table.assign(textual_auroc=[0.6, 0.6])
    assert heads_problems(weak, GateSettings()) == ["seed 0: textual head validation AUROC 0.600 < 0.7"]
    reads_text = table.assign(visual_auroc=[0.95, 0.8])
    assert "reads the text" in heads_problems(reads_text, GateSettings())[0]
    nan = table.assign(visual_auroc=[float("nan"), 0.5])
    assert heads_problems(nan, GateSettings())  # no AUROC is no pass


def test_the_vsr1_profile_hands_the_papers_schedule_to_trl(tmp_path):
    from ground.settings import load_settings
    from resources.at_sft_trainer import sft_config

    s = load_settings(profile="vsr1")
    assert s.target_model.model == "Qwen/Qwen2.5-VL-3B-Instruct" and s.curation.frames_per_clip == 90
    a = s.at_sft
    assert (a.stage1_epochs, a.stage2_epochs, a.alarm_learning_rate, a.head_learning_rate) == (1, 1, 1e-5, 1e-5)
    assert (a.visual_loss_weight, a.textual_loss_weight) == (0.1, 0.1)
    config = sft_config(a, tmp_path, "cpu", a.stage2_epochs)  # "cuda" adds bf16 and checkpointing: no GPU here
    assert config.learning_rate == 1e-6 and config.lr_scheduler_type == "cosine" and config.warmup_steps == 0.03
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 128  # the authors' global batch on one GPU
    assert config.dataset_kwargs == {"skip_prepare_dataset": True} and not config.remove_unused_columns


def test_trl_args_that_the_pipeline_fixes_or_trl_lacks_are_refused(tmp_path):
    import pytest

    from ground.settings import ATSFTSettings
    from resources.at_sft_trainer import sft_config

    with pytest.raises(ValueError, match=r"at_sft\.trl_args: \['no_such_option'\] is not an option of TRL .*'s SFTConfig"):
        sft_config(ATSFTSettings(trl_args={"no_such_option": 1}), tmp_path, "cpu", 1)
    with pytest.raises(ValueError, match="which the pipeline fixes"):
        sft_config(ATSFTSettings(trl_args={"remove_unused_columns": True}), tmp_path, "cpu", 1)
    with pytest.raises(ValueError, match="has its own keys"):
        ATSFTSettings(trl_args={"learning_rate": 1.0})


def test_each_optimizer_group_trains_at_its_own_rate():
    from peft import get_peft_model
    from test_models import tiny_model_dir

    from ground.settings import ATSFTSettings
    from resources import alarm, models
    from resources.at_sft_trainer import optimizer
    from resources.training import lora_config

    model, processor = models.load_video_llm(tiny_model_dir(), device="cpu")
    alarm.add_alarm_tokens(model, processor)
    a = ATSFTSettings(learning_rate=1e-4, alarm_learning_rate=2e-3, head_learning_rate=3e-3)
    peft_model = get_peft_model(model, lora_config(a))
    stage1 = {g["name"]: g["lr"] for g in optimizer(peft_model, a, with_heads=False).param_groups}
    assert stage1 == {"lora": 1e-4, "alarm_embeddings": 2e-3}
    module = alarm.alarm_module(peft_model)
    assert not module.visual_head.weight.requires_grad  # stage 1: the heads are not trained
    stage2 = {g["name"]: (g["lr"], len(g["params"])) for g in optimizer(peft_model, a, with_heads=True).param_groups}
    assert stage2["alarm_heads"] == (3e-3, 4) and module.visual_head.weight.requires_grad
