import json
import os

import pytest

from assets.manifest import ManifestError, load_manifest, read_manifest, render_corpus
from ground.scenes import scene_categories
from ground.settings import PROJECT_ROOT, Settings


def test_internvid_columns_and_timestamps(tmp_path):
    path = tmp_path / "m.jsonl"
    row = {"YoutubeID": "abc", "Start_timestamp": "00:01:02.500", "End_timestamp": "00:01:10.000",
           "Caption": "a man cooks in a kitchen", "Aesthetic_Score": 5.1, "UMT_Score": 0.4, "path": "v/abc.mp4"}
    path.write_text(json.dumps(row) + "\n")
    df = read_manifest(path)
    assert df.loc[0, "clip_id"] == "abc" and df.loc[0, "start"] == 62.5 and df.loc[0, "end"] == 70.0
    assert df.loc[0, "path"] == str((tmp_path / "v" / "abc.mp4").resolve())


def test_malformed_jsonl_line_fails_with_its_number(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps({"clip_id": "a", "path": "a.mp4", "caption": "x"})
    path.write_text(good + "\n\n{not json\n")
    with pytest.raises(ManifestError, match=r"m.jsonl: line 3: not valid JSON"):
        read_manifest(path)


def test_csv_missing_caption_names_line_and_field(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("clip_id,path,caption\na,a.mp4,ok\nb,b.mp4,\n")
    with pytest.raises(ManifestError, match=r"line 3: missing required field\(s\) \['caption'\]"):
        read_manifest(path)


def test_repeated_clip_ids_fail(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("clip_id,path,caption\na,a.mp4,x\na,b.mp4,y\n")
    with pytest.raises(ManifestError, match="repeat"):
        read_manifest(path)


def test_rendered_corpus_spans_scene_categories_and_a_folder_reads_back(tmp_path):
    _, categories = scene_categories()
    df = render_corpus(tmp_path, 30, seed=0)
    assert len(df) == 30 and all((tmp_path / f"{c}.mp4").exists() for c in df["clip_id"])
    named = {c for c in categories if any(c.replace("_", " ") in cap for cap in df["caption"])}
    assert len(named) == 30
    assert sorted(read_manifest(tmp_path)["clip_id"]) == sorted(df["clip_id"])


def test_relative_source_is_taken_from_the_project_root_and_a_missing_one_fails(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("clip_id,path,caption\na,a.mp4,x\n")
    relative = os.path.relpath(path, PROJECT_ROOT)
    df = load_manifest(Settings(data_dir=str(tmp_path / "data"), manifest={"source": relative}))
    assert df["clip_id"].tolist() == ["a"]
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(Settings(data_dir=str(tmp_path / "data"), manifest={"source": "no/such/manifest.jsonl"}))
