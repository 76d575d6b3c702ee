"""curated_videos: pure helpers, the decoder's rejections, and an end-to-end materialization."""
import json
from pathlib import Path

import dagster as dg
from stage_resources import stage_resources
import numpy as np
import pandas as pd
import pytest

from assets.curation import (
    COLUMNS,
    _singular,
    _words,
    assign_categories,
    centre,
    choose_representatives,
    curated_videos,
    frame_features,
    keyword_hits,
    probe_clips,
    probe_one,
)
from assets.manifest import render_corpus, video_manifest
from ground.scenes import scene_categories
from ground.settings import CurationSettings, Settings
from resources.video import VideoError, duplicate_fraction, import_decord, load_frames, probe_and_sample, sample_indices
from resources.video_writer import write_mp4

CATS = {"beach": ["beach", "sand", "waves"], "kitchen": ["kitchen", "stove", "cooking"], "office": ["office", "desk"]}


# --- pure helpers ------------------------------------------------------------------------------

def test_keyword_hits_count_keywords_plurals_and_the_name_phrase():
    hits = keyword_hits("Two desks in an office, waves outside", CATS)
    assert hits == {"beach": 1, "kitchen": 0, "office": 2}
    _, real = scene_categories()
    assert keyword_hits("A red circle stays still in a city street scene with traffic.", real)["city_street"] == 4


def _keyword_hits_per_category(caption, categories):
    """keyword_hits as it was: every category's keywords scanned for every caption."""
    words = _words(caption)
    stems = {_singular(w) for w in words}
    joined = " " + " ".join(words) + " "
    hits = {}
    for name, keywords in categories.items():
        n = sum(1 for k in keywords if _singular(k.lower()) in stems)
        phrase = name.replace("_", " ").lower()
        if phrase not in {k.lower() for k in keywords}:
            n += f" {phrase} " in joined
        hits[name] = n
    return hits


def test_keyword_index_counts_like_a_scan_per_category():
    _, real = scene_categories()
    tricky = {**CATS, "city_street": ["street", "traffic"], "beach_bar": ["beach", "bar", "beach bar"], "Dup": ["desk", "desks"]}
    rng = np.random.default_rng(0)
    for categories in (real, tricky):
        vocab = [w for name, kws in categories.items() for w in kws + name.split("_")] + ["a", "the", "with", "cars"]
        vocab += [w + "s" for w in vocab[:40]]
        for _ in range(300):
            caption = " ".join(rng.choice(vocab, size=int(rng.integers(1, 12))))
            caption = caption.title() if rng.random() < 0.3 else caption + "."
            assert keyword_hits(caption, categories) == _keyword_hits_per_category(caption, categories), caption


def test_assign_keyword_first_then_text_and_frame_prototypes():
    captions = ["sunny beach with sand", "a kitchen with a stove", "something blue", "waves near the office desk"]
    # clip 2 names no scene: its frames look like the beach clip's, its caption slightly like a kitchen
    feats = np.array([[1, 0, 0], [0, 1, 0], [0.9, 0.1, 0], [0, 0, 1]], dtype=np.float32)
    text_sim = np.zeros((4, 3), dtype=np.float32)  # beach, kitchen, office (sorted)
    text_sim[2] = [0.1, 0.2, 0.1]  # text alone prefers kitchen, frames beach
    text_sim[3] = [0.2, 0.0, 0.5]
    labels, methods = assign_categories(captions, CATS, text_sim, feats, frame_weight=0.5)
    assert labels[:2] == ["beach", "kitchen"] and methods[:2] == ["keyword", "keyword"]
    assert labels[2] == "beach" and methods[2] == "text+frames"  # 0.1 + 0.5*1.0 > 0.2 + 0.5*0.1
    # waves (beach: 1) against office + desk (office: 2): the keyword count decides
    assert labels[3] == "office" and methods[3] == "keyword"
    tie_labels, tie_methods = assign_categories(["waves by the desk"], CATS, np.array([[0.1, 0.9, 0.3]]), np.zeros((1, 3)))
    # beach and office tie on keywords: text decides between them; kitchen scores higher but is not tied
    assert tie_labels == ["office"] and tie_methods == ["text+frames"]


def test_representatives_are_closest_to_their_category_centroid():
    joint = np.array([[1, 0], [0.9, 0.1], [0.6, 0.8], [0, 1]], dtype=np.float32)
    joint /= np.linalg.norm(joint, axis=1, keepdims=True)
    labels = ["a", "a", "a", "b"]
    is_rep, dist = choose_representatives(labels, joint, k=1, ids=["c0", "c1", "c2", "c3"])
    assert is_rep.tolist() == [False, True, False, True]  # c1 is in the middle of a's cluster; b has one clip
    assert dist[3] == pytest.approx(0.0, abs=1e-6) and dist[2] == dist[:3].max()
    is_rep, _ = choose_representatives(labels, joint, k=5)
    assert is_rep.all()


def test_duplicate_fraction_counts_repeats_but_not_short_clip_resampling():
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 255, (8, 4, 4, 3), dtype=np.uint8)
    assert duplicate_fraction(distinct) == 0.0
    damaged = distinct.copy()
    damaged[3:] = damaged[2]  # decord's "nearest good frame" repeated over the back of the clip
    assert duplicate_fraction(damaged) == pytest.approx(5 / 7)
    one_still_moment = distinct.copy()
    one_still_moment[4] = one_still_moment[3]
    assert duplicate_fraction(one_still_moment) == pytest.approx(1 / 7)
    # a 3-frame clip sampled 8 times repeats frames by index, which is not damage
    idx = sample_indices(3, 8)
    assert idx == [0, 0, 1, 1, 1, 1, 2, 2]
    assert duplicate_fraction(distinct[idx], idx) == 0.0
    assert duplicate_fraction(distinct[idx]) == pytest.approx(5 / 7)  # without the indices it would look damaged


def test_frame_features_separate_colours():
    red = np.zeros((4, 8, 8, 3), np.uint8)
    red[..., 0] = 220
    blue = np.zeros((4, 8, 8, 3), np.uint8)
    blue[..., 2] = 220
    f = centre(np.stack([frame_features(red), frame_features(red + 5), frame_features(blue)]))
    assert f[0] @ f[1] > 0.9 and f[0] @ f[2] < 0


# --- bad inputs through the decoder --------------------------------------------------------------

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Good rendered clips plus one of each kind of bad input."""
    root = tmp_path_factory.mktemp("clips")
    good = render_corpus(root / "good", 6, seed=3)
    real = Path(good.path[0]).read_bytes()
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "truncated.mp4").write_bytes(real[: len(real) // 2])
    (bad / "text.mp4").write_text("this is a text file, not a video\n")
    (bad / "dir.mp4").mkdir()
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    write_mp4(np.repeat(frame[None], 24, axis=0), bad / "still.mp4", fps=8)
    write_mp4(rng.integers(0, 255, (4, 96, 128, 3), dtype=np.uint8), bad / "short.mp4", fps=8)
    expected = {
        "empty": ("empty", "empty file"),
        "truncated": ("truncated", "truncated"),
        "text": ("not_a_video", "not a video"),
        "missing": ("missing", "does not exist"),
        "dir": ("not_a_file", "not a file"),
        "still": ("duplicate_frames", "mostly identical sampled frames"),
        "short": ("too_short", "too short"),
        "remote": ("remote_url", "remote URL; download not supported offline"),
        "copy": ("duplicate_content", "same bytes"),
    }
    paths = {name: str(bad / f"{name}.mp4") for name in expected}
    paths["remote"] = "https://example.org/v.mp4"
    paths["copy"] = str(bad / "copy.mp4")
    Path(paths["copy"]).write_bytes(real)
    return good, paths, expected


@pytest.mark.parametrize("name", ["empty", "truncated", "text", "missing", "dir", "still", "remote"])
def test_probe_rejects_bad_input_with_a_reason(clips, name, tmp_path):
    _, paths, expected = clips
    kind, phrase = expected[name]
    with pytest.raises(VideoError) as err:
        probe_and_sample(paths[name], 8, 32, tmp_path / "frames")
    assert err.value.kind == kind and phrase in err.value.reason


def test_probe_samples_uniformly_and_records_the_protocol(clips, tmp_path):
    good, _, _ = clips
    out = probe_and_sample(good.path[0], 8, 32, tmp_path)
    assert out["frames"].shape == (8, 32, 32, 3) and out["frames"].dtype == np.uint8
    assert (out["width"], out["height"], out["fps"]) == (128, 96, 8.0)
    assert out["duration_s"] == pytest.approx(good.end[0]) and out["n_frames"] == round(good.end[0] * 8)
    s = out["sampling"]
    assert s["frame_count"] == 8 and s["resize"] == "32x32" and s["decoder"].startswith("decord2")
    assert s["indices"][0] == 0 and s["indices"][-1] == out["n_frames"] - 1 and s["indices"] == sorted(s["indices"])
    assert np.array_equal(load_frames(out["frames_path"]), out["frames"])
    assert Path(out["frames_path"]).name == f"{out['sha256']}_8x32.npy"


# --- end to end through Dagster ------------------------------------------------------------------

def _settings(tmp_path: Path, manifest: Path, **curation) -> Settings:
    return Settings(
        data_dir=str(tmp_path / "data"),
        manifest={"source": str(manifest)},
        curation={"representatives_per_category": 1, **curation},
    )


def _materialize(tmp_path: Path, cfg: Settings, **kwargs):
    return dg.materialize(
        [video_manifest, curated_videos],
        resources=stage_resources(cfg, tmp_path),
        instance=dg.DagsterInstance.ephemeral(),
        **kwargs,
    )


def test_curated_videos_end_to_end_rejects_bad_clips_and_reuses_frames(clips, tmp_path, monkeypatch):
    good, paths, expected = clips
    rows = good.to_dict("records") + [
        {"clip_id": f"bad_{name}", "path": p, "caption": f"a {name} clip in a park"} for name, p in paths.items()
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # frame_size 32: decord2 3.4 refuses some sizes, depending on the clip (resources/video.py then resizes with PIL)
    config = _settings(tmp_path, manifest, frame_size=32)

    result = _materialize(tmp_path, config)
    assert result.success
    data = tmp_path / "data" / "curated"
    curated = pd.read_parquet(data / "curated.parquet")
    rejects = pd.read_parquet(data / "rejects.parquet").set_index("clip_id")
    assert list(curated.columns) == COLUMNS
    assert sorted(curated.clip_id) == sorted(good.clip_id)
    assert sorted(rejects.index) == sorted(f"bad_{n}" for n in expected)
    for name, (kind, phrase) in expected.items():
        assert rejects.loc[f"bad_{name}", "kind"] == kind
        assert phrase in rejects.loc[f"bad_{name}", "reason"], rejects.loc[f"bad_{name}", "reason"]
    # what the probe saw of each reject: nothing of a path that is no file, the stream of a decoded one
    seen = {name: json.loads(rejects.loc[f"bad_{name}", "probe"]) for name in expected}
    assert seen["missing"] == seen["dir"] == seen["remote"] == {}
    assert seen["still"] == {"n_frames": 24, "fps": 8.0, "duration_s": 3.0, "width": 128, "height": 96, "codec": "mpeg4"}
    assert seen["short"]["n_frames"] == 4 and seen["short"]["duration_s"] == 0.5

    version, categories = scene_categories()
    assert set(curated.scene_category) <= set(categories) and (curated.scene_categories_version == version).all()
    # render_corpus names each clip's scene in its caption: category i % 30 of the sorted list
    names = sorted(categories)
    assert curated.set_index("clip_id").scene_category.to_dict() == {
        f"clip_{i:04d}": names[i % len(names)] for i in range(len(good))
    }
    assert curated.is_representative.all()  # one clip per category here
    # the rendered clips' labels came with the manifest; the bad rows had none (and were rejected)
    assert curated.visual_label.dtype == "Int64"
    assert curated.set_index("clip_id").visual_label.to_dict() == good.set_index("clip_id").visual_label.to_dict()
    assert all(Path(p).exists() for p in curated.frames_path)
    sampling = json.loads(curated.sampling[0])
    assert sampling["frame_count"] == 8 and sampling["resize"] == "32x32"
    check = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in check if c.asset_key.path == ["curated_videos"]] == [
        ("curated_videos_are_usable", True)
    ]
    meta = result.asset_materializations_for_node("curated_videos")[0].metadata
    # decoded: the good clips and the short one; the byte copy of clip_0000 came from the frame cache
    assert meta["rejected"].value == len(expected)
    assert (meta["frames_decoded"].value, meta["frame_cache_hits"].value) == (len(good) + 1, 1)

    # Re-materializing decodes nothing: every unchanged clip comes from data/frames by sha256.
    decord = import_decord()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decord.VideoReader called for an unchanged clip")

    monkeypatch.setattr(decord, "VideoReader", no_decoding)
    again = _materialize(tmp_path, config)
    assert again.success
    pd.testing.assert_frame_equal(pd.read_parquet(data / "curated.parquet"), curated)
    assert pd.read_parquet(data / "rejects.parquet").set_index("clip_id").equals(rejects)
    meta = again.asset_materializations_for_node("curated_videos")[0].metadata
    assert (meta["frames_decoded"].value, meta["frame_cache_hits"].value) == (0, len(good) + 2)


def test_visual_label_travels_from_the_manifest_to_curated(clips, tmp_path):
    """A user manifest's own labels, in any accepted spelling, reach manifest.parquet and
    curated.parquet as 0/1, and a clip without one stays <NA> (video_descriptions decides it)."""
    good, _, _ = clips
    given = ["harmful", "safe", None, "1", "false", ""]
    want = {"clip_0000": 1, "clip_0001": 0, "clip_0002": None, "clip_0003": 1, "clip_0004": 0, "clip_0005": None}
    rows = []
    for row, label in zip(good.drop(columns="visual_label").to_dict("records"), given):
        rows.append(row if label is None else {**row, "visual_label": label})
    assert len(rows) == len(want)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _materialize(tmp_path, _settings(tmp_path, manifest)).success
    data = tmp_path / "data"
    for table in (data / "manifest" / "manifest.parquet", data / "curated" / "curated.parquet"):
        df = pd.read_parquet(table)
        assert df["visual_label"].dtype == "Int64", table
        got = {c: None if pd.isna(v) else int(v) for c, v in zip(df["clip_id"], df["visual_label"])}
        assert got == want, table


def test_check_fails_when_nothing_survives(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"clip_id": "x", "path": str(tmp_path / "nope.mp4"), "caption": "a park"}) + "\n")
    result = _materialize(tmp_path, _settings(tmp_path, manifest), raise_on_error=False)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["curated_videos_are_usable"].passed is False
    assert pd.read_parquet(tmp_path / "data" / "curated" / "rejects.parquet").kind.tolist() == ["missing"]


# --- probing in parallel -------------------------------------------------------------------------

def test_probe_clips_gives_the_same_results_for_any_number_of_workers(clips, tmp_path):
    good, paths, _ = clips
    rows = good.to_dict("records")
    # the byte copy right after its original: two workers probe them at once
    rows.insert(1, {"clip_id": "copy", "path": paths["copy"], "caption": "a copy"})
    rows += [{"clip_id": f"bad_{n}", "path": paths[n], "caption": "x"} for n in ("text", "dir", "still", "short")]
    manifest = pd.DataFrame(rows)
    runs = {}
    for workers in (1, 2):
        cache = tmp_path / f"frames_{workers}"
        out = probe_clips(manifest, CurationSettings(workers=workers), cache)
        for row in out.kept:
            row["frames_path"] = row["frames_path"].replace(str(cache), "<cache>")
        runs[workers] = out
    one, two = runs[1], runs[2]
    assert [r["clip_id"] for r in one.kept] == good.clip_id.tolist()
    assert one.kept == two.kept and one.rejects == two.rejects
    assert [r["clip_id"] for r in one.rejects] == ["copy", "bad_text", "bad_dir", "bad_still", "bad_short"]
    assert all(np.array_equal(a, b) for a, b in zip(one.features, two.features)) and len(one.features) == len(good)
    assert (one.decoded, one.cache_hits) == (two.decoded, two.cache_hits) == (len(good) + 1, 1)  # + short; copy: cached


def test_a_clip_that_breaks_the_prober_is_a_reject(monkeypatch, tmp_path):
    import resources.video

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(resources.video, "probe_and_sample", broken)
    probe, reject = probe_one({"clip_id": "c", "path": "x.mp4"}, CurationSettings(), tmp_path)
    assert probe is None
    assert reject == {"clip_id": "c", "path": "x.mp4", "reason": "probe failed: OSError: disk on fire", "kind": "probe_failed", "probe": "{}"}
