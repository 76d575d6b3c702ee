"""curated_videos: every manifest clip probed and decoded, bad ones set aside with a reason, the rest
put in one of the scene categories, with representatives chosen per category.

Decoding (resources/video.py): decord2, `frames_per_clip` frames sampled uniformly and resized to
`frame_size`², cached under data/frames/ by the file's sha256, so an unchanged clip is decoded once.
A clip is rejected (data/curated/rejects.parquet, the run goes on) when it is a remote URL, missing,
empty, not a video, truncated or undecodable, mostly repeated frames, outside the duration or size
range in pipelines.yaml, or byte-identical to a clip already kept.

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
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from assets.common import markdown_table, read_table, record_lineage, table_metadata, write_table
from assets.manifest import scene_categories
from dagster_project.settings import PROJECT_ROOT, PipelineSettings
from resources import quality
from resources.dvc import DvcTracker
from resources.tracking import MlflowTracker

COLUMNS = [
    "clip_id", "path", "caption", "duration_s", "fps", "width", "height", "n_frames", "sha256",
    "frames_path", "sampling", "scene_category", "scene_categories_version", "is_representative",
    "centroid_distance",
]
REJECT_COLUMNS = ["clip_id", "path", "reason", "kind"]
FRAME_WEIGHT = 0.5
HIST_LEVELS = 4


# --- pure helpers ------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def keyword_hits(caption: str, categories: dict[str, list[str]]) -> dict[str, int]:
    """Per category: how many of its keywords occur in the caption (plural-insensitive), plus one
    when the category's name, if not itself a keyword, occurs as a phrase ('city street')."""
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
    hits = np.array([[keyword_hits(c, categories)[k] for k in names] for c in captions], dtype=int).reshape(n, len(names))
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


# --- the asset ---------------------------------------------------------------------------------

@dg.asset(
    deps=["video_manifest"],
    group_name="data",
    code_version="1",
    check_specs=[dg.AssetCheckSpec("curated_videos_are_usable", asset="curated_videos", blocking=True)],
)
def curated_videos(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow: MlflowTracker, dvc: DvcTracker):
    """Clips that decode and fit the configured ranges, each with a scene category and frames on disk."""
    from resources.embeddings import MODEL_NAME, embed_texts
    from resources.video import VideoError, decoder_name, probe_and_sample

    cfg = settings.load()
    cur = cfg.curation
    manifest = read_table(cfg.path("manifest", "manifest.parquet"), "video_manifest")
    cat_file = Path(cur.scene_categories)
    cat_file = cat_file if cat_file.is_absolute() else PROJECT_ROOT / cat_file
    version, categories = scene_categories(cat_file)
    names = sorted(categories)

    kept: list[dict] = []
    frames: list[np.ndarray] = []
    rejects: list[dict] = []
    first_by_sha: dict[str, str] = {}
    cache_hits = decoded = 0
    for row in manifest.to_dict("records"):
        base = {"clip_id": row["clip_id"], "path": row["path"]}
        try:
            probe = probe_and_sample(
                row["path"], cur.frames_per_clip, cur.frame_size, cfg.path("frames"), cur.duplicate_frame_fraction
            )
        except VideoError as err:
            rejects.append({**base, "reason": err.reason, "kind": err.kind})
            continue
        cache_hits += probe["cached"]
        decoded += not probe["cached"]
        problem = range_problem(probe, cur)
        if problem is None and probe["sha256"] in first_by_sha:
            problem = ("duplicate_content", f"duplicate content: same bytes (sha256) as {first_by_sha[probe['sha256']]}")
        if problem:
            rejects.append({**base, "reason": problem[1], "kind": problem[0]})
            continue
        first_by_sha[probe["sha256"]] = row["clip_id"]
        kept.append(
            {
                **base,
                "caption": row["caption"],
                "duration_s": float(probe["duration_s"]),
                "fps": float(probe["fps"]),
                "width": int(probe["width"]),
                "height": int(probe["height"]),
                "n_frames": int(probe["n_frames"]),
                "sha256": probe["sha256"],
                "frames_path": probe["frames_path"],
                "sampling": json.dumps(probe["sampling"], sort_keys=True),
            }
        )
        frames.append(probe["frames"])
    for r in rejects:
        context.log.warning(f"rejected {r['clip_id']} ({r['path']}): {r['reason']}")

    df = pd.DataFrame(kept, columns=COLUMNS[: COLUMNS.index("sampling") + 1])
    methods: list[str] = []
    if kept:
        captions = df["caption"].tolist()
        text_emb = embed_texts(captions)
        text_sim = text_emb @ embed_texts(category_descriptions(categories)).T
        feats = centre(np.stack([frame_features(f) for f in frames]))
        labels, methods = assign_categories(captions, categories, text_sim, feats)
        is_rep, dist = choose_representatives(
            labels, joint_embedding(text_emb, feats), cur.representatives_per_category, df["clip_id"].tolist()
        )
        df["scene_category"] = labels
        df["is_representative"] = is_rep
        df["centroid_distance"] = dist.astype(float)
    else:
        df["scene_category"] = pd.Series(dtype=str)
        df["is_representative"] = pd.Series(dtype=bool)
        df["centroid_distance"] = pd.Series(dtype=float)
    df["scene_categories_version"] = version
    df = df[COLUMNS]
    rejects_df = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
    out = write_table(df, cfg.path("curated", "curated.parquet"))
    rejects_out = write_table(rejects_df, cfg.path("curated", "rejects.parquet"))

    extra = []
    if df.empty:
        extra.append("no clip survived curation")
    elif not df["is_representative"].any():
        extra.append("no representative clip")
    extra += frames_problems(df, cur.frames_per_clip, cur.frame_size)[:10]
    check = quality.check_result(
        df,
        quality.not_null("clip_id", "path", "caption", "sha256", "frames_path", "scene_category", "duration_s")
        + [quality.unique("clip_id"), quality.in_set("scene_category", names)],
        "curated_videos",
        "curated_videos_are_usable",
        extra,
    )

    reject_counts = rejects_df["kind"].value_counts().sort_index().to_dict()
    method_counts = pd.Series(methods, dtype=str).value_counts().to_dict()
    params = {f"curation.{k}": v for k, v in cur.model_dump().items()}
    params.update(
        {"scene_categories_version": version, "decoder": decoder_name(), "text_embedding": MODEL_NAME, "frame_weight": FRAME_WEIGHT}
    )
    with mlflow.run(context, cfg.profile, params, inputs={"video_manifest": cfg.path("manifest", "manifest.parquet")}) as run:
        import mlflow as mlf

        mlf.log_metrics(
            {
                "kept": len(df),
                "rejected": len(rejects_df),
                "representatives": int(df["is_representative"].sum()) if len(df) else 0,
                "categories_used": int(df["scene_category"].nunique()) if len(df) else 0,
                "frames_decoded": decoded,
                "frame_cache_hits": cache_hits,
                **{f"rejected_{k}": int(v) for k, v in reject_counts.items()},
                **{f"assigned_{k.replace('+', '_')}": int(v) for k, v in method_counts.items()},
            }
        )
        mlf.set_tag("check.curated_videos_are_usable", str(check.passed))
    context.log.info(f"curated: kept {len(df)}, rejected {len(rejects_df)} {reject_counts}, frame cache hits {cache_hits}")
    preview = ["clip_id", "scene_category", "is_representative", "duration_s", "caption"]
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, out, preview),
            "per_scene_category": dg.MetadataValue.md(_category_table(df, names)) if len(df) else dg.MetadataValue.md("_empty_"),
            "scene_categories_version": version,
            "category_assignment": dg.MetadataValue.json({k: int(v) for k, v in method_counts.items()}),
            "rejected": len(rejects_df),
            "rejected_per_kind": dg.MetadataValue.json({k: int(v) for k, v in reject_counts.items()}),
            "rejects": dg.MetadataValue.md(markdown_table(rejects_df[["clip_id", "kind", "reason"]], limit=50, width=120)),
            "rejects_path": dg.MetadataValue.path(str(rejects_out)),
            "frame_cache_hits": cache_hits,
            "frames_decoded": decoded,
            "sampling": dg.MetadataValue.json(
                {"frames_per_clip": cur.frames_per_clip, "frame_size": cur.frame_size, "decoder": decoder_name()}
            ),
            "mlflow_run_id": run.info.run_id,
            **record_lineage(context, dvc, mlflow, run, "curated_videos"),
        },
        check_results=[check],
    )
