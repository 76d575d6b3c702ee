"""video_manifest: the source list of clips, in InternVid-10M-FLT's shape.

Reads a JSONL or CSV manifest (clip id, path or URL, start, end, caption, optional aesthetic and
UMT scores, an optional visual_label: 0 safe / 1 harmful; InternVid's own column names work too)
or a folder of videos. The embedded default
renders its own small corpus first, so nothing comes from outside: moving shapes and text, and on a
table one object, harmful or its safe look-alike (assets/visual_objects.yaml), so that what a
clip shows decides whether helping with it is safe.
"""

import csv
import hashlib
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import table_metadata
from ground.catalog import StageSpec
from ground.scenes import scene_categories, visual_objects
from ground.settings import Settings, resolve
from resources import quality
from resources import corpus
from resources.corpus import COLOURS, MOTIONS, SHAPES, render_clip

COLUMNS = ["clip_id", "path", "start", "end", "caption", "aesthetic_score", "umt_score", "visual_label"]
# InternVid-10M-FLT spells its columns this way.
ALIASES = {
    "youtubeid": "clip_id", "id": "clip_id", "video": "path", "url": "path",
    "start_timestamp": "start", "end_timestamp": "end",
    "aesthetic_score": "aesthetic_score", "umt_score": "umt_score", "caption": "caption",
}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov"}
# The rendered corpus lives beside the stage's folder (data/corpus/): the manifest points into it.
SPEC = StageSpec(
    folder="manifest", files=("manifest.parquet",), params=("manifest",), shared=("corpus",), sources=("manifest.source",),
    data_deps=("assets/visual_objects.yaml", "assets/scene_categories.yaml"),
)


class ManifestError(ValueError):
    pass


def _timestamp(value, where: str) -> float | None:
    """Seconds from a number or InternVid's 'HH:MM:SS.mmm'."""
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        parts = [float(p) for p in str(value).split(":")]
    except ValueError:
        raise ManifestError(f"{where}: timestamp {value!r} is neither seconds nor HH:MM:SS") from None
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds


VISUAL_LABELS = {"0": 0, "safe": 0, "false": 0, "1": 1, "harmful": 1, "true": 1}


def visual_label(value, where: str) -> int | None:
    """A user's own label of what the clip shows (0 safe, 1 harmful), or None when the row has none:
    the reconciler then decides from the descriptions."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    key = str(value).strip().lower().removesuffix(".0")
    if key not in VISUAL_LABELS:
        raise ManifestError(f"{where}: visual_label {value!r} is not one of 0/1/safe/harmful")
    return VISUAL_LABELS[key]


def normalize_row(raw: dict, where: str, base: Path) -> dict:
    row = {ALIASES.get(k.strip().lower(), k.strip().lower()): v for k, v in raw.items()}
    missing = [c for c in ("clip_id", "path", "caption") if row.get(c) in (None, "")]
    if missing:
        raise ManifestError(f"{where}: missing required field(s) {missing}")
    path = str(row["path"])
    if "://" not in path and not Path(path).is_absolute():
        path = str((base / path).resolve())
    out = {
        "clip_id": str(row["clip_id"]),
        "path": path,
        "start": _timestamp(row.get("start"), where),
        "end": _timestamp(row.get("end"), where),
        "caption": str(row["caption"]).strip(),
    }
    out["visual_label"] = visual_label(row.get("visual_label"), where)
    for score in ("aesthetic_score", "umt_score"):
        value = row.get(score)
        try:
            out[score] = None if value in (None, "") else float(value)
        except (TypeError, ValueError):
            raise ManifestError(f"{where}: {score} {value!r} is not a number") from None
    return out


def read_manifest(path: Path) -> pd.DataFrame:
    """A manifest file (JSONL/CSV) or a folder of videos → one row per clip. A bad line fails with its number."""
    rows: list[dict] = []
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    if path.is_dir():
        for f in sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
            rows.append(normalize_row({"clip_id": f.stem, "path": str(f), "caption": f.stem.replace("_", " ")}, str(f), path))
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            for n, raw in enumerate(csv.DictReader(fh), start=2):
                rows.append(normalize_row(raw, f"{path}: line {n}", path.parent))
    elif path.suffix.lower() in {".jsonl", ".json"}:
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path}: line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(raw, dict):
                raise ManifestError(f"{path}: line {n}: expected a JSON object, got {type(raw).__name__}")
            rows.append(normalize_row(raw, f"{path}: line {n}", path.parent))
    else:
        raise ManifestError(f"manifest {path}: unsupported type; use .jsonl, .csv or a folder of videos")
    df = pd.DataFrame(rows, columns=COLUMNS).astype({"visual_label": "Int64"})
    dupes = df["clip_id"][df["clip_id"].duplicated()].tolist()
    if dupes:
        raise ManifestError(f"{path}: clip ids repeat: {dupes[:5]}")
    return df


# --- the embedded corpus -------------------------------------------------------------------------

def render_corpus(out_dir: Path, n_clips: int, seed: int, progress=None) -> pd.DataFrame:
    """About n_clips short mp4s whose captions span the scene categories, each with one object of
    assets/visual_objects.yaml (harmful and safe ones alternate); already-rendered clips are kept."""
    from resources.video_writer import write_mp4

    _, categories = scene_categories()
    _, objects = visual_objects()
    names, object_names = sorted(categories), list(objects)
    # One folder per recipe (drawing code, seed, scenes, objects): a clip rendered by an older recipe
    # is never taken for this one, and a folder still reads back as clip_<i>.mp4.
    recipe = hashlib.sha256(Path(corpus.__file__).read_bytes() + json.dumps([seed, categories, objects], sort_keys=True).encode())
    folder = out_dir / f"recipe-{recipe.hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_clips):
        if progress is not None:
            progress(i, n_clips)
        scene = names[i % len(names)]
        obj = objects[object_names[i % len(object_names)]]
        keyword = categories[scene][int(rng.integers(len(categories[scene])))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        fps = 8
        n_frames = int(rng.integers(16, 33))
        clip_rng = np.random.default_rng([seed, i])
        path = folder / f"clip_{i:04d}.mp4"
        if not path.exists():
            write_mp4(render_clip(clip_rng, scene, keyword, shape, colour, motion, n_frames, obj["draw"]), path, fps)
        place = scene.replace("_", " ")
        rows.append(
            {
                "clip_id": f"clip_{i:04d}",
                "path": str(path),
                "start": 0.0,
                "end": n_frames / fps,
                "caption": f"A {colour} {shape} {motion} in a {place} scene with {keyword}. On the table: {obj['phrase']}.",
                "aesthetic_score": round(float(rng.uniform(4, 7)), 3),
                "umt_score": round(float(rng.uniform(0.3, 0.5)), 3),
                "visual_label": int(obj["visual_label"]),
            }
        )
    if progress is not None:
        progress(n_clips, n_clips)
    return pd.DataFrame(rows, columns=COLUMNS).astype({"visual_label": "Int64"})


def load_manifest(settings: Settings, progress=None) -> pd.DataFrame:
    """The configured source as a manifest table: the embedded corpus, rendered first, or a file/folder."""
    m = settings.manifest
    if m.source == "synthetic":
        return render_corpus(settings.path("corpus"), m.synthetic_clips, m.seed, progress)
    return read_manifest(resolve(m.source))


@stage_asset(
    SPEC,
    group="video_data",
    checks={"manifest_is_usable": "The manifest is empty, or a clip lacks an id, path or caption, or a clip id repeats."},
)
def video_manifest(st: Stage) -> dg.MaterializeResult:
    """Where the video data starts: the source clips (id, path, caption; InternVid-10M-FLT shape) that curation reads."""
    df = load_manifest(st.settings, st.progress("rendering the embedded corpus", unit="clip"))
    out = st.write_table(df, "manifest.parquet")
    check = quality.check_result(
        df,
        quality.not_null("clip_id", "path", "caption") + [quality.unique("clip_id")],
        "video_manifest",
        "manifest_is_usable",
        [] if len(df) else ["manifest is empty"],
    )
    st.log.info(f"manifest: {len(df)} clips from {st.settings.manifest.source}")
    return st.finish(table_metadata(df, out, ["clip_id", "caption", "end"]), [check], {"clips": len(df)})
