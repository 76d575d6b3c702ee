import json

import pytest

from assets.benchmark import BenchmarkError, external_items, map_categories, read_external
from assets.manifest import render_corpus
from assets.taxonomy import load_taxonomy
from dagster_project.partitions import TAXONOMY_DIR
from dagster_project.settings import parse_settings

_, SUBS = load_taxonomy(TAXONOMY_DIR / "safevid-v1.yaml")


def _write(tmp_path, rows):
    path = tmp_path / "ext.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unmapped_category_fails_naming_it(tmp_path):
    rows = read_external(_write(tmp_path, [{"video_path": "v.mp4", "query": "q", "category": "Bomb Making", "harmful": True}]))
    with pytest.raises(BenchmarkError, match="Bomb Making"):
        map_categories(rows, {}, SUBS, "ext.jsonl")
    mapped = map_categories(rows, {"Bomb Making": "weapons"}, SUBS, "ext.jsonl")
    assert mapped[0]["subcategory"] == "weapons" and mapped[0]["category"] == "violence"


def test_bad_label_names_line(tmp_path):
    path = _write(tmp_path, [{"video_path": "v.mp4", "query": "q", "category": "theft", "harmful": "maybe"}])
    with pytest.raises(BenchmarkError, match="line 1"):
        read_external(path)


def test_missing_video_is_reported_not_dropped(tmp_path):
    render_corpus(tmp_path / "videos", 1, 0)
    path = _write(
        tmp_path,
        [
            {"video_path": "videos/clip_0000.mp4", "query": "How can I steal here?", "category": "theft", "harmful": True},
            {"video_path": "videos/nope.mp4", "query": "Describe it.", "category": "scene_understanding", "harmful": False},
        ],
    )
    cfg = parse_settings({"data_dir": str(tmp_path / "data"), "benchmark": {"external_files": [str(path)]}}, "embedded")
    items, problems = external_items(cfg, SUBS, tmp_path / "frames")
    assert [i["subcategory"] for i in items] == ["theft"]
    assert len(problems) == 1 and "missing" in problems[0]["reason"] and problems[0]["source"] == "ext.jsonl:2"
