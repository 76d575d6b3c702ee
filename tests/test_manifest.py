import json
from pathlib import Path
import os

import pandas as pd
import pytest

from assets.manifest import ManifestError, load_manifest, read_manifest, render_corpus
from ground.scenes import scene_categories, visual_objects
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
    folder = Path(df["path"][0]).parent
    assert len(df) == 30 and all((folder / f"{c}.mp4").exists() for c in df["clip_id"])
    named = {c for c in categories if any(c.replace("_", " ") in cap for cap in df["caption"])}
    assert len(named) == 30
    back = read_manifest(folder)
    assert sorted(back["clip_id"]) == sorted(df["clip_id"])
    assert back["visual_label"].dtype == "Int64" and back["visual_label"].isna().all()  # a bare folder labels nothing


def test_relative_source_is_taken_from_the_project_root_and_a_missing_one_fails(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("clip_id,path,caption\na,a.mp4,x\n")
    relative = os.path.relpath(path, PROJECT_ROOT)
    df = load_manifest(Settings(data_dir=str(tmp_path / "data"), manifest={"source": relative}))
    assert df["clip_id"].tolist() == ["a"]
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(Settings(data_dir=str(tmp_path / "data"), manifest={"source": "no/such/manifest.jsonl"}))


def test_visual_label_spellings_parse_and_an_empty_one_is_missing(tmp_path):
    given = [0, 1, "safe", "harmful", "true", "false", True, False, " Harmful ", 1.0, "1", "", None]
    want = [0, 1, 0, 1, 1, 0, 1, 0, 1, 1, 1, None, None]
    rows = [{"clip_id": f"c{i}", "path": f"c{i}.mp4", "caption": "x", "visual_label": v} for i, v in enumerate(given)]
    rows.append({"clip_id": "unlabelled", "path": "u.mp4", "caption": "x"})  # no column at all
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = read_manifest(path)
    assert df["visual_label"].dtype == "Int64"
    assert df["visual_label"].tolist() == [pd.NA if w is None else w for w in want] + [pd.NA]
    # The same spellings in a CSV, where every value is text.
    csv = tmp_path / "m.csv"
    csv.write_text("clip_id,path,caption,visual_label\na,a.mp4,x,harmful\nb,b.mp4,x,0\nc,c.mp4,x,\nd,d.mp4,x,SAFE\n")
    assert read_manifest(csv)["visual_label"].tolist() == [1, 0, pd.NA, 0]


@pytest.mark.parametrize("bad", ["maybe", "2", "-1", "0.5"])
def test_a_bad_visual_label_names_the_file_and_line(tmp_path, bad):
    csv = tmp_path / "m.csv"
    csv.write_text(f"clip_id,path,caption,visual_label\na,a.mp4,x,1\nb,b.mp4,x,{bad}\n")
    with pytest.raises(ManifestError, match=rf"m\.csv: line 3: visual_label '{bad}' is not one of 0/1/safe/harmful"):
        read_manifest(csv)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"clip_id": "a", "path": "a.mp4", "caption": "x"}) + "\n\n"
                     + json.dumps({"clip_id": "b", "path": "b.mp4", "caption": "x", "visual_label": 2}) + "\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl: line 3: visual_label 2 is not one of"):
        read_manifest(jsonl)


def test_rendered_captions_name_the_object_and_labels_alternate(tmp_path):
    _, objects = visual_objects()
    names = list(objects)
    df = render_corpus(tmp_path, 2 * len(names), seed=1)
    assert df["visual_label"].dtype == "Int64"
    for i, (caption, label) in enumerate(zip(df["caption"], df["visual_label"])):
        obj = objects[names[i % len(names)]]
        assert caption.endswith(f" On the table: {obj['phrase']}."), caption
        assert label == obj["visual_label"]
    # harmful and safe objects alternate, so a split of consecutive clips holds both
    assert df["visual_label"].tolist() == [1, 0] * len(names)
    assert {o["visual_label"] for o in objects.values()} == {0, 1}
    # every harmful object is named by some caption, and so is its safe look-alike
    phrases = {o["phrase"] for o in objects.values()}
    assert {c.rsplit("On the table: ", 1)[1].rstrip(".") for c in df["caption"]} == phrases


def test_a_clip_drawn_by_another_recipe_is_never_reused(tmp_path):
    # A file left by an older renderer (here: junk under the old name pattern) must not stand in for the new clip.
    (tmp_path / "clip_0000.mp4").write_bytes(b"not this clip")
    first = render_corpus(tmp_path, 2, 0)
    assert all(Path(p).parent != tmp_path and Path(p).stat().st_size > 100 for p in first["path"])
    again = render_corpus(tmp_path, 2, 0)
    assert again["path"].tolist() == first["path"].tolist()  # the same recipe: the same files, kept
    other = render_corpus(tmp_path, 2, 1)
    assert set(other["path"]).isdisjoint(first["path"])
