"""curated_videos: every manifest clip probed and decoded, bad ones set aside with a reason, the rest
put in one of the scene categories, with representatives chosen per category.

Decoding (resources/video.py): decord2 (PyAV where decord fails), `frames_per_clip` frames sampled
uniformly and resized to `frame_size`², cached under data/frames/ by the file's sha256, so an
unchanged clip is decoded once. `curation.workers` clips are decoded at a time; each clip's frames
are reduced to its frame feature right away, so memory does not grow with the corpus.
A clip is rejected (data/curated/rejects.parquet, the run goes on) when it is a remote URL, missing,
not a file, empty, not a video, truncated or undecodable, mostly repeated frames, outside the
duration or size range in pipelines.yaml, or byte-identical to a clip already kept; its reject row
keeps what the probe saw of it (`probe`: frames, fps, size, codec, as JSON).

Scene category, per clip:
1. Caption keywords: each category's keywords (assets/scene_categories.yaml) and its name as a
   phrase are counted in the caption; a single best category wins.
2. Otherwise (no keyword, or a tie): score = cosine(caption embedding, category description
   embedding) + FRAME_WEIGHT × cosine(frame feature, category frame prototype), over the tied
   categories or all of them. A category's frame prototype is the mean frame feature of the clips
   that step 1 placed there, so captions that name their scene teach what the scene looks like.
The frame feature is a 4×4×4 RGB colour histogram over the sampled frames, square-rooted
(Hellinger), centred on the corpus mean.

Representatives: per category, the `representatives_per_category` clips closest (cosine distance)
to the category centroid in a joint space: caption embedding ⊕ centred frame feature, each unit
length, weighted equally. The paper used VideoCLIP; offline we have all-MiniLM-L6-v2 for text.
"""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import markdown_table, table_metadata
from ground.catalog import StageData, StageSpec
from ground.scenes import scene_categories
from ground.settings import CurationSettings, resolve
from resources import quality

COLUMNS = [
    "clip_id", "path", "caption", "visual_label", "duration_s", "fps", "width", "height", "n_frames", "sha256",
    "frames_path", "sampling", "scene_category", "scene_categories_version", "is_representative",
    "centroid_distance",
]
REJECT_COLUMNS = ["clip_id", "path", "reason", "kind", "probe"]
# Decoded frames are cached by content under data/frames/, shared across runs and profiles' stages.
SPEC = StageSpec(
    folder="curated",
    files=("curated.parquet", "rejects.parquet"),
    params=("curation",),
    data_deps=("assets/scene_categories.yaml",),
    shared=("frames",),
)
FRAME_WEIGHT = 0.5
HIST_LEVELS = 4


# --- pure helpers ------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


@dataclass
class KeywordIndex:
    """The categories' keywords and name phrases, indexed so a caption is read once, not once per category."""

    names: list[str]
    by_stem: dict[str, list[int]]  # singular keyword -> category positions, once per listing of it
    by_phrase: dict[str, list[int]]  # name phrase ('city street') -> categories whose keywords lack it
    phrase_lengths: list[int]


def keyword_index(categories: dict[str, list[str]]) -> KeywordIndex:
    names = list(categories)
    by_stem: dict[str, list[int]] = {}
    by_phrase: dict[str, list[int]] = {}
    for c, name in enumerate(names):
        for k in categories[name]:
            by_stem.setdefault(_singular(k.lower()), []).append(c)
        phrase = name.replace("_", " ").lower()
        if phrase not in {k.lower() for k in categories[name]}:
            by_phrase.setdefault(phrase, []).append(c)
    return KeywordIndex(names, by_stem, by_phrase, sorted({len(p.split(" ")) for p in by_phrase}))


def index_hits(caption: str, index: KeywordIndex) -> list[int]:
    """keyword_hits, as counts in index.names order."""
    words = _words(caption)
    counts = [0] * len(index.names)
    for stem in {_singular(w) for w in words}:
        for c in index.by_stem.get(stem, ()):
            counts[c] += 1
    # A phrase is a run of whole words (the words are [a-z0-9]+, joined by one space); it counts once.
    phrases = {" ".join(words[i : i + n]) for n in index.phrase_lengths for i in range(len(words) - n + 1)}
    for c in {c for p in phrases for c in index.by_phrase.get(p, ())}:
        counts[c] += 1
    return counts


def keyword_hits(caption: str, categories: dict[str, list[str]]) -> dict[str, int]:
    """Per category: how many of its keywords occur in the caption (plural-insensitive), plus one
    when the category's name, if not itself a keyword, occurs as a phrase ('city street')."""
    index = keyword_index(categories)
    return dict(zip(index.names, index_hits(caption, index)))


def category_descriptions(categories: dict[str, list[str]]) -> list[str]:
    """What the caption embedding is compared with, in sorted category order."""
    return [f"a {name.replace('_', ' ')} scene: {', '.join(categories[name])}" for name in sorted(categories)]


def frame_features(frames: np.ndarray, levels: int = HIST_LEVELS) -> np.ndarray:
    """A levels³-bin RGB histogram over all sampled frames, square-rooted (unit L2 norm)."""
    q = (frames.astype(np.int32) * levels) // 256
    idx = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
    hist = np.bincount(idx.ravel(), minlength=levels**3).astype(np.float64)
    return np.sqrt(hist / max(hist.sum(), 1.0)).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centre(features: np.ndarray) -> np.ndarray:
    """Features minus their mean, unit length: colour histograms are all alike until centred."""
    features = np.asarray(features, dtype=np.float32)
    if len(features) == 0:
        return features
    return _unit(features - features.mean(axis=0, keepdims=True))


def assign_categories(
    captions: list[str],
    categories: dict[str, list[str]],
    text_sim: np.ndarray,
    frame_feats: np.ndarray,
    frame_weight: float = FRAME_WEIGHT,
) -> tuple[list[str], list[str]]:
    """(category, method) per clip; method is 'keyword' or 'text+frames' (see the module doc).

    text_sim: (N, C) cosine of each caption to each category description, categories in sorted order.
    frame_feats: (N, D) centred, unit frame features.
    """
    names = sorted(categories)
    n = len(captions)
    index = keyword_index({k: categories[k] for k in names})
    hits = np.array([index_hits(c, index) for c in captions], dtype=int).reshape(n, len(names))
    labels: list[str | None] = [None] * n
    methods = [""] * n
    for i in range(n):
        top = hits[i].max() if n else 0
        if top > 0 and (hits[i] == top).sum() == 1:
            labels[i], methods[i] = names[int(hits[i].argmax())], "keyword"
    feats = np.asarray(frame_feats, dtype=np.float32).reshape(n, -1)
    protos = np.zeros((len(names), feats.shape[1]), dtype=np.float32)
    for c, name in enumerate(names):
        members = [i for i in range(n) if labels[i] == name]
        if members:
            protos[c] = _unit(feats[members].mean(axis=0))
    frame_sim = feats @ protos.T if feats.shape[1] else np.zeros((n, len(names)), dtype=np.float32)
    for i in range(n):
        if labels[i] is not None:
            continue
        top = hits[i].max()
        candidates = np.flatnonzero(hits[i] == top) if top > 0 else np.arange(len(names))
        score = text_sim[i, candidates] + frame_weight * frame_sim[i, candidates]
        labels[i], methods[i] = names[int(candidates[int(np.argmax(score))])], "text+frames"
    return [str(x) for x in labels], methods


def joint_embedding(text_emb: np.ndarray, frame_feats: np.ndarray) -> np.ndarray:
    """Caption embedding ⊕ centred frame feature, each unit length, the whole unit length."""
    return _unit(np.concatenate([_unit(text_emb), _unit(frame_feats)], axis=1))


def choose_representatives(
    labels: list[str], joint: np.ndarray, k: int, ids: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(is_representative, cosine distance to own category's centroid). Per category the k closest
    clips are representatives; ties go to the smaller id."""
    labels_arr = np.asarray(labels)
    ids = ids if ids is not None else [f"{i:09d}" for i in range(len(labels))]
    joint = np.asarray(joint, dtype=np.float32)
    is_rep = np.zeros(len(labels), dtype=bool)
    dist = np.zeros(len(labels), dtype=np.float64)
    for name in sorted(set(labels)):
        members = np.flatnonzero(labels_arr == name)
        centroid = _unit(joint[members].mean(axis=0))
        d = np.clip(1.0 - joint[members] @ centroid, 0.0, 2.0)
        dist[members] = d
        order = sorted(range(len(members)), key=lambda j: (round(float(d[j]), 9), ids[members[j]]))
        is_rep[members[order[:k]]] = True
    return is_rep, dist


def range_problem(probe: dict, c) -> tuple[str, str] | None:
    """(kind, reason) when a probed clip is outside the configured duration or size range."""
    d, w, h = probe["duration_s"], probe["width"], probe["height"]
    if d < c.min_duration_s:
        return "too_short", f"too short: {d:.2f} s < min_duration_s {c.min_duration_s}"
    if d > c.max_duration_s:
        return "too_long", f"too long: {d:.2f} s > max_duration_s {c.max_duration_s}"
    if w < c.min_width or h < c.min_height:
        return "too_small", f"too small: {w}x{h} below min {c.min_width}x{c.min_height}"
    if w > c.max_width or h > c.max_height:
        return "too_large", f"too large: {w}x{h} above max {c.max_width}x{c.max_height}"
    return None


def frames_problems(df: pd.DataFrame, n_frames: int, size: int) -> list[str]:
    """Frames files that the next stage could not load as (n_frames, size, size, 3) uint8."""
    problems = []
    for clip_id, path in zip(df["clip_id"], df["frames_path"]):
        p = Path(str(path))
        if not p.exists():
            problems.append(f"{clip_id}: frames file {p} is missing")
            continue
        arr = np.load(p, mmap_mode="r")
        if arr.shape != (n_frames, size, size, 3) or arr.dtype != np.uint8:
            problems.append(f"{clip_id}: frames file has {arr.shape} {arr.dtype}")
    return problems


def _category_table(df: pd.DataFrame, names: list[str]) -> str:
    rows = [
        {
            "scene_category": n,
            "clips": int((df["scene_category"] == n).sum()),
            "representatives": int(((df["scene_category"] == n) & df["is_representative"]).sum()),
        }
        for n in names
    ]
    return markdown_table(pd.DataFrame(rows), limit=len(rows) + 1)


# --- the stage's steps --------------------------------------------------------------------------

@dataclass
class Probed:
    """What probing the manifest gave: kept clips (with their frame features), rejects, cache use."""

    kept: list[dict] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    cache_hits: int = 0
    decoded: int = 0


def _reject(row: dict, kind: str, reason: str, probe: dict | None) -> dict:
    seen = json.dumps(probe or {}, sort_keys=True, default=str)
    return {"clip_id": row["clip_id"], "path": row["path"], "reason": reason, "kind": kind, "probe": seen}


def probe_one(row: dict, cur: CurationSettings, cache_dir: Path) -> tuple[dict | None, dict | None]:
    """(probe, None) or (None, reject) for one manifest row, run by a worker. The frames become the
    frame feature here, so none outlive the call (probe_and_sample has cached them as .npy)."""
    from resources.video import VideoError, probe_and_sample

    try:
        probe = probe_and_sample(row["path"], cur.frames_per_clip, cur.frame_size, cache_dir, cur.duplicate_frame_fraction)
    except VideoError as err:
        return None, _reject(row, err.kind, err.reason, err.probe)
    except Exception as exc:  # a bug or an OS error on one clip is that clip's reject, not the run's end
        return None, _reject(row, "probe_failed", f"probe failed: {type(exc).__name__}: {exc}", None)
    probe["feature"] = frame_features(probe.pop("frames"))
    return probe, None


def _kept_row(row: dict, probe: dict) -> dict:
    return {
        "clip_id": row["clip_id"],
        "path": row["path"],
        "caption": row["caption"],
        # The manifest's own label of what the clip shows, when it has one (else decided in video_descriptions).
        "visual_label": row.get("visual_label"),
        "duration_s": float(probe["duration_s"]),
        "fps": float(probe["fps"]),
        "width": int(probe["width"]),
        "height": int(probe["height"]),
        "n_frames": int(probe["n_frames"]),
        "sha256": probe["sha256"],
        "frames_path": probe["frames_path"],
        "sampling": json.dumps(probe["sampling"], sort_keys=True),
    }


def probe_clips(manifest: pd.DataFrame, cur: CurationSettings, cache_dir: Path, progress=None) -> Probed:
    """Probe and sample every manifest clip, `cur.workers` at a time; a clip that fails, is out of
    range or repeats another's bytes becomes a reject with its kind, reason and what the probe saw,
    and the run goes on. Results are taken in manifest order, so they do not depend on the workers.

    Threads, not processes: decord (ctypes calls into libdecord) and PyAV release the GIL while
    decoding, and so do hashlib and PIL, so threads decode in parallel without pickling frames
    between processes or importing decord in each (docs/decoding.md: on 2 cores, 2 threads gave
    2.1x the throughput of one with single-threaded readers, 1.2-1.3x with the sampler's)."""
    from resources.video import import_decord, seen_of

    import_decord()  # once, before the threads: the import patches importlib for the whole process
    out = Probed()
    first_by_sha: dict[str, str] = {}
    rows = manifest.to_dict("records")
    with ThreadPoolExecutor(max_workers=cur.workers) as pool:
        results = pool.map(lambda row: probe_one(row, cur, cache_dir), rows)
        for done, (row, (probe, reject)) in enumerate(zip(rows, results)):
            if progress is not None:
                progress(done, len(rows))
            if reject is not None:
                out.rejects.append(reject)
                continue
            out.cache_hits += probe["cached"]
            out.decoded += not probe["cached"]
            problem = range_problem(probe, cur)
            if problem is None and probe["sha256"] in first_by_sha:
                problem = ("duplicate_content", f"duplicate content: same bytes (sha256) as {first_by_sha[probe['sha256']]}")
            if problem:
                out.rejects.append(_reject(row, problem[0], problem[1], seen_of(probe)))
                continue
            first_by_sha[probe["sha256"]] = row["clip_id"]
            out.kept.append(_kept_row(row, probe))
            out.features.append(probe["feature"])
    if progress is not None:
        progress(len(rows), len(rows))
    return out


def categorise(
    probed: Probed, categories: dict[str, list[str]], per_category: int, version: str, progress=None
) -> tuple[pd.DataFrame, list[str]]:
    """The curated table (COLUMNS) of the kept clips with scene category and representatives, and
    how each clip's category was found (see the module doc)."""
    df = pd.DataFrame(probed.kept, columns=COLUMNS[: COLUMNS.index("sampling") + 1])
    methods: list[str] = []
    if probed.kept:
        from resources.embeddings import embed_texts

        captions = df["caption"].tolist()
        text_emb = embed_texts(captions, progress=progress)
        text_sim = text_emb @ embed_texts(category_descriptions(categories)).T
        feats = centre(np.stack(probed.features))
        labels, methods = assign_categories(captions, categories, text_sim, feats)
        is_rep, dist = choose_representatives(labels, joint_embedding(text_emb, feats), per_category, df["clip_id"].tolist())
        df["scene_category"] = labels
        df["is_representative"] = is_rep
        df["centroid_distance"] = dist.astype(float)
    else:
        df["scene_category"] = pd.Series(dtype=str)
        df["is_representative"] = pd.Series(dtype=bool)
        df["centroid_distance"] = pd.Series(dtype=float)
    df["scene_categories_version"] = version
    df["visual_label"] = df["visual_label"].astype("Int64")
    return df[COLUMNS], methods


def curation_check(df: pd.DataFrame, cur: CurationSettings, names: list[str]) -> dg.AssetCheckResult:
    extra = []
    if df.empty:
        extra.append("no clip survived curation")
    elif not df["is_representative"].any():
        extra.append("no representative clip")
    extra += frames_problems(df, cur.frames_per_clip, cur.frame_size)[:10]
    return quality.check_result(
        df,
        quality.not_null("clip_id", "path", "caption", "sha256", "frames_path", "scene_category", "duration_s")
        + [quality.unique("clip_id"), quality.in_set("scene_category", names)],
        "curated_videos",
        "curated_videos_are_usable",
        extra,
    )


def curation_metrics(df: pd.DataFrame, probed: Probed, reject_counts: dict, method_counts: dict) -> dict:
    return {
        "kept": len(df),
        "rejected": len(probed.rejects),
        "representatives": int(df["is_representative"].sum()) if len(df) else 0,
        "categories_used": int(df["scene_category"].nunique()) if len(df) else 0,
        "frames_decoded": probed.decoded,
        "frame_cache_hits": probed.cache_hits,
        **{f"rejected_{k}": int(v) for k, v in reject_counts.items()},
        **{f"assigned_{k.replace('+', '_')}": int(v) for k, v in method_counts.items()},
    }


def curation_metadata(
    df: pd.DataFrame,
    rejects: pd.DataFrame,
    paths: tuple[Path, Path],
    probed: Probed,
    reject_counts: dict,
    method_counts: dict,
    names: list[str],
    version: str,
    sampling: dict,
) -> dict:
    """What the Dagster UI shows: preview, per-category counts, rejects with reasons, frame cache use."""
    preview = ["clip_id", "scene_category", "is_representative", "duration_s", "caption"]
    return {
        **table_metadata(df, paths[0], preview),
        "per_scene_category": dg.MetadataValue.md(_category_table(df, names)) if len(df) else dg.MetadataValue.md("_empty_"),
        "scene_categories_version": version,
        "category_assignment": dg.MetadataValue.json({k: int(v) for k, v in method_counts.items()}),
        "rejected": len(rejects),
        "rejected_per_kind": dg.MetadataValue.json({k: int(v) for k, v in reject_counts.items()}),
        "rejects": dg.MetadataValue.md(markdown_table(rejects[["clip_id", "kind", "reason"]], limit=50, width=120)),
        "rejects_path": dg.MetadataValue.path(str(paths[1])),
        "frame_cache_hits": probed.cache_hits,
        "frames_decoded": probed.decoded,
        "sampling": dg.MetadataValue.json(sampling),
    }


# --- the asset ---------------------------------------------------------------------------------

@stage_asset(
    SPEC,
    group="video_data",
    checks={
        "curated_videos_are_usable": "No clip survived, no representative was chosen, a frames file is missing or "
        "misshapen, a required field is empty, a clip id repeats, or a category is not in the scene categories file."
    },
)
def curated_videos(st: Stage, video_manifest: StageData) -> dg.MaterializeResult:
    """The clips the pipeline uses: those that decode and fit the ranges, each with a scene category and sampled frames."""
    from resources.embeddings import MODEL_NAME
    from resources.video import decoder_name

    cur = st.settings.curation
    version, categories = scene_categories(resolve(cur.scene_categories))
    names = sorted(categories)
    st.log_params(
        {"scene_categories_version": version, "decoder": decoder_name(), "text_embedding": MODEL_NAME, "frame_weight": FRAME_WEIGHT}
    )

    probed = probe_clips(video_manifest.table("manifest.parquet"), cur, st.settings.path("frames"), st.progress("decoding clips", unit="clip"))
    for r in probed.rejects:
        st.log.warning(f"rejected {r['clip_id']} ({r['path']}): {r['reason']}")
    df, methods = categorise(probed, categories, cur.representatives_per_category, version, st.progress("embedding captions"))
    rejects = pd.DataFrame(probed.rejects, columns=REJECT_COLUMNS)
    paths = st.write_table(df, "curated.parquet"), st.write_table(rejects, "rejects.parquet")
    check = curation_check(df, cur, names)

    reject_counts = rejects["kind"].value_counts().sort_index().to_dict()
    method_counts = pd.Series(methods, dtype=str).value_counts().to_dict()
    st.log.info(f"curated: kept {len(df)}, rejected {len(rejects)} {reject_counts}, frame cache hits {probed.cache_hits}")
    sampling = {"frames_per_clip": cur.frames_per_clip, "frame_size": cur.frame_size, "decoder": decoder_name()}
    return st.finish(
        curation_metadata(df, rejects, paths, probed, reject_counts, method_counts, names, version, sampling),
        [check],
        curation_metrics(df, probed, reject_counts, method_counts),
    )
