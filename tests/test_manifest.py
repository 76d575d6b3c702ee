import json
from pathlib import Path
import os

import dagster as dg
from stage_resources import stage_resources
import pandas as pd
import pytest

from assets.manifest import PROBLEM_COLUMNS, ManifestError, load_manifest, read_manifest, render_corpus, video_manifest
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
    df, problems = load_manifest(Settings(data_dir=str(tmp_path / "data"), manifest={"source": relative}))
    assert df["clip_id"].tolist() == ["a"] and problems.empty
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


# --- every bad line at once: stop or skip -----------------------------------------------------------

def _row(clip_id, **more):
    return json.dumps({"clip_id": clip_id, "path": f"{clip_id}.mp4", "caption": "a park", **more})


# Line 1 good; 2 not JSON; 3 blank; 4 no caption; 5 a bad label; 6 and 8 repeat line 1's id; 7 a list.
BAD_JSONL = "\n".join([_row("a"), "{oops", "", json.dumps({"clip_id": "b", "path": "b.mp4"}), _row("c", visual_label="maybe"),
                       _row("a"), "[1, 2]", _row("a"), _row("d")]) + "\n"


def test_stop_lists_every_bad_line_with_its_number_and_the_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(BAD_JSONL)
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    message = str(err.value)
    assert f"manifest {path}: 6 of 8 entries are bad" in message and "manifest.on_error: skip" in message
    for line, reason in [(2, "not valid JSON"), (4, "missing required field(s) ['caption']"),
                         (5, "visual_label 'maybe' is not one of"), (6, "clip id 'a' repeats (line 1, line 6, line 8)"),
                         (7, "expected a JSON object, got list"), (8, "clip id 'a' repeats (line 1, line 6, line 8)")]:
        assert f"{path}: line {line}: {reason}" in message, (line, message)
    assert "line 1:" not in message and "line 9:" not in message  # the first 'a' and 'd' are fine


def test_stop_lists_the_first_twenty_and_counts_the_rest(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("clip_id,path,caption\n" + "".join(f"c{i},c{i}.mp4,\n" for i in range(25)))
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    listed = [line for line in str(err.value).splitlines() if "missing required field" in line]
    assert len(listed) == 20 and listed[0].endswith("line 2: missing required field(s) ['caption']")
    assert str(err.value).splitlines()[-1].strip() == "... and 5 more"


def test_skip_goes_on_with_the_good_lines_and_returns_the_bad_ones(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(BAD_JSONL)
    cfg = Settings(data_dir=str(tmp_path / "data"), manifest={"source": str(path), "on_error": "skip"})
    df, problems = load_manifest(cfg)
    assert df["clip_id"].tolist() == ["a", "d"]  # a repeated id keeps its first line
    assert list(problems.columns) == PROBLEM_COLUMNS and problems["line"].tolist() == [2, 4, 5, 6, 7, 8]
    assert problems["clip_id"].tolist() == [pd.NA, "b", "c", "a", pd.NA, "a"]
    assert problems["path"].tolist() == [pd.NA, "b.mp4", "c.mp4", "a.mp4", pd.NA, "a.mp4"]  # as written
    with pytest.raises(ManifestError, match="6 of 8 entries are bad"):
        load_manifest(cfg.model_copy(update={"manifest": cfg.manifest.model_copy(update={"on_error": "stop"})}))


def test_csv_line_numbers_survive_blank_lines_and_a_row_with_too_many_fields(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"clip_id,path,caption\na,a.mp4,ok\n\nb,b.mp4,ok,extra\nc,c.mp4,caf\xe9\nd,d.mp4,ok\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    message = str(err.value)
    assert f"{path}: line 4: 4 fields where the header has 3" in message
    assert f"{path}: line 5: not UTF-8 text" in message and "2 of 4 entries" in message


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    for name, text in (("m.csv", "clip_id,path,caption\na,a.mp4,x\n"), ("m.jsonl", _row("a") + "\n")):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert read_manifest(tmp_path / name)["clip_id"].tolist() == ["a"], name


def test_a_folder_with_two_videos_of_one_name_names_both_files(tmp_path):
    for name in ("a.mp4", "a.webm", "b.mp4"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ManifestError) as err:
        read_manifest(tmp_path)
    assert f"{tmp_path / 'a.webm'}: clip id 'a' repeats ({tmp_path / 'a.mp4'}, {tmp_path / 'a.webm'})" in str(err.value)


def _materialize_manifest(tmp_path, manifest: Path):
    cfg = Settings(data_dir=str(tmp_path / "data"), manifest={"source": str(manifest), "on_error": "skip"})
    return dg.materialize([video_manifest], resources=stage_resources(cfg, tmp_path), instance=dg.DagsterInstance.ephemeral(),
                          raise_on_error=False)


def test_skipped_lines_are_written_and_shown_and_an_all_bad_manifest_fails_its_check(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(BAD_JSONL)
    result = _materialize_manifest(tmp_path, path)
    folder = tmp_path / "data" / "manifest"
    assert pd.read_parquet(folder / "manifest.parquet")["clip_id"].tolist() == ["a", "d"]
    problems = pd.read_parquet(folder / "manifest_problems.parquet")
    assert list(problems.columns) == PROBLEM_COLUMNS and problems["line"].tolist() == [2, 4, 5, 6, 7, 8]
    meta = result.asset_materializations_for_node("video_manifest")[0].metadata
    assert meta["skipped_lines"].value == 6 and "clip id 'a' repeats" in meta["skipped"].value
    assert [c.passed for c in result.get_asset_check_evaluations()] == [True]

    path.write_text("{oops\n" + json.dumps({"clip_id": "b"}) + "\n")
    result = _materialize_manifest(tmp_path, path)
    check = result.get_asset_check_evaluations()[0]
    assert check.passed is False and "all 2 entries were bad and skipped" in check.metadata["results"].value
    assert len(pd.read_parquet(folder / "manifest.parquet")) == 0


def test_a_clean_manifest_writes_an_empty_problem_table(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(_row("a") + "\n")
    assert _materialize_manifest(tmp_path, path).success
    problems = pd.read_parquet(tmp_path / "data" / "manifest" / "manifest_problems.parquet")
    assert problems.empty and list(problems.columns) == PROBLEM_COLUMNS
