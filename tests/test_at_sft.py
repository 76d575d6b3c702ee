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
