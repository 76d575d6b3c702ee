"""video_manifest: the source list of clips, in InternVid-10M-FLT's shape.

Reads a JSONL or CSV manifest (clip id, path or URL, start, end, caption, optional aesthetic and
UMT scores, an optional visual_label: 0 safe / 1 harmful; InternVid's own column names work too)
or a folder of videos. The embedded default
renders its own small corpus first, so nothing comes from outside: moving shapes and text, and on a
table one object, harmful or its safe look-alike (assets/visual_objects.yaml), so that what a
clip shows decides whether helping with it is safe.

Every line of a manifest is checked before any is used: a line that is not JSON/CSV, lacks a required
field, has a bad value or repeats an earlier line's clip id is a problem with its line number.
manifest.on_error `stop` fails with all of them in one message; `skip` goes on with the good lines
and writes the bad ones to manifest_problems.parquet (line, clip_id, path, reason), an empty table
when there are none. Whether a path exists is left to curated_videos: it rejects a missing file or a
directory with a reason and the run goes on, and it is the stage that opens the files anyway.
"""

import csv
import hashlib
import json
from pathlib import Path
from typing import Iterator

import dagster as dg
import numpy as np
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import markdown_table, table_metadata
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
    folder="manifest", files=("manifest.parquet", "manifest_problems.parquet"), params=("manifest",), shared=("corpus",),
    sources=("manifest.source",),
    data_deps=("assets/visual_objects.yaml", "assets/scene_categories.yaml"),
)


class ManifestError(ValueError):
    pass


PROBLEM_COLUMNS = ["line", "clip_id", "path", "reason"]
PROBLEM_TYPES = {"line": "Int64", "clip_id": "string", "path": "string", "reason": "string"}
LISTED_PROBLEMS = 20  # in a stop's message; the rest are counted, and all are in the table with skip


def _timestamp(value) -> float | None:
    """Seconds from a number or InternVid's 'HH:MM:SS.mmm'."""
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        parts = [float(p) for p in str(value).split(":")]
    except ValueError:
        raise ManifestError(f"timestamp {value!r} is neither seconds nor HH:MM:SS") from None
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds


VISUAL_LABELS = {"0": 0, "safe": 0, "false": 0, "1": 1, "harmful": 1, "true": 1}


def visual_label(value) -> int | None:
    """A user's own label of what the clip shows (0 safe, 1 harmful), or None when the row has none:
    the reconciler then decides from the descriptions."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    key = str(value).strip().lower().removesuffix(".0")
    if key not in VISUAL_LABELS:
        raise ManifestError(f"visual_label {value!r} is not one of 0/1/safe/harmful")
    return VISUAL_LABELS[key]


def _fields(raw: dict) -> dict:
    """A raw row under the project's column names."""
    return {ALIASES.get(k.strip().lower(), k.strip().lower()): v for k, v in raw.items()}


def normalize_row(raw: dict, base: Path) -> dict:
    """One manifest row → a manifest table row; ManifestError says what is wrong with it."""
    row = _fields(raw)
    missing = [c for c in ("clip_id", "path", "caption") if row.get(c) in (None, "")]
    if missing:
        raise ManifestError(f"missing required field(s) {missing}")
    path = str(row["path"])
    if "://" not in path and not Path(path).is_absolute():
        path = str((base / path).resolve())
    out = {
        "clip_id": str(row["clip_id"]),
        "path": path,
        "start": _timestamp(row.get("start")),
        "end": _timestamp(row.get("end")),
        "caption": str(row["caption"]).strip(),
    }
    out["visual_label"] = visual_label(row.get("visual_label"))
    for score in ("aesthetic_score", "umt_score"):
        value = row.get(score)
        try:
            out[score] = None if value in (None, "") else float(value)
        except (TypeError, ValueError):
            raise ManifestError(f"{score} {value!r} is not a number") from None
    return out


def _csv_entries(path: Path) -> Iterator[tuple[int, dict | str]]:
    # Invalid UTF-8 is replaced, not fatal, so that it is one bad line and not a crash without one;
    # utf-8-sig: a spreadsheet's byte-order mark would otherwise become part of the first column's name.
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.DictReader(fh)
        while True:
            try:
                raw = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield reader.line_num, f"not valid CSV ({exc})"
                continue
            if None in raw:  # DictReader files the values beyond the header under None
                width = len(reader.fieldnames)
                yield reader.line_num, f"{width + len(raw[None])} fields where the header has {width}"
            elif any("\ufffd" in str(v) for v in raw.values()):
                yield reader.line_num, "not UTF-8 text"
            else:
                yield reader.line_num, raw


def _jsonl_entries(path: Path) -> Iterator[tuple[int, dict | str]]:
    # bytes.splitlines splits at line ends only; str.splitlines would also split inside a JSON string (U+2028).
    for n, data in enumerate(path.read_bytes().splitlines(), start=1):
        if not data.strip():
            continue
        try:
            raw = json.loads(data.decode("utf-8-sig" if n == 1 else "utf-8"))
        except UnicodeDecodeError:
            yield n, "not UTF-8 text"
            continue
        except json.JSONDecodeError as exc:
            yield n, f"not valid JSON ({exc.msg})"
            continue
        yield n, raw if isinstance(raw, dict) else f"expected a JSON object, got {type(raw).__name__}"


def manifest_entries(path: Path) -> Iterator[tuple[int | None, str, dict | str]]:
    """(line number, where, raw row) per entry, the raw row a reason when the line holds no row at all.
    A folder's videos have no line number: `where` is the video's path."""
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    if path.is_dir():
        for f in sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
            yield None, str(f), {"clip_id": f.stem, "path": str(f), "caption": f.stem.replace("_", " ")}
        return
    suffix = path.suffix.lower()
    if suffix == ".csv":
        entries = _csv_entries(path)
    elif suffix in {".jsonl", ".json"}:
        entries = _jsonl_entries(path)
    else:
        raise ManifestError(f"manifest {path}: unsupported type; use .jsonl, .csv or a folder of videos")
    for n, raw in entries:
        yield n, f"line {n}", raw


def _checked(line: int | None, where: str, raw: dict | str, base: Path) -> dict:
    fields = _fields(raw) if isinstance(raw, dict) else {}
    cid, given_path = fields.get("clip_id"), fields.get("path")
    entry = {"line": line, "where": where, "clip_id": None if cid in (None, "") else str(cid),
             "path": None if given_path in (None, "") else str(given_path), "row": None, "reason": None}
    if isinstance(raw, str):
        entry["reason"] = raw
        return entry
    try:
        entry["row"] = normalize_row(raw, base)
    except ManifestError as exc:
        entry["reason"] = str(exc)
    return entry


def _places(places: list[str], limit: int = 10) -> str:
    shown = ", ".join(places[:limit])
    return shown if len(places) <= limit else f"{shown} and {len(places) - limit} more"


def scan_manifest(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A manifest file (JSONL/CSV) or a folder of videos → (one row per good clip, one problem per bad
    line: line, clip_id, path as written, reason). A clip id that repeats is a problem on every line
    after its first, whose reason names all the lines it is on."""
    base = path if path.is_dir() else path.parent
    entries = [_checked(line, where, raw, base) for line, where, raw in manifest_entries(path)]
    places: dict[str, list[str]] = {}
    for e in entries:
        if e["clip_id"] is not None:
            places.setdefault(e["clip_id"], []).append(e["where"])
    for e in entries:
        seen = places.get(e["clip_id"], [])
        if e["reason"] is None and seen and seen[0] != e["where"]:
            e["reason"] = f"clip id {e['clip_id']!r} repeats ({_places(seen)})"
    rows = [e["row"] for e in entries if e["reason"] is None]
    bad = [{c: e[c] for c in PROBLEM_COLUMNS} for e in entries if e["reason"] is not None]
    df = pd.DataFrame(rows, columns=COLUMNS).astype({"visual_label": "Int64"})
    return df, pd.DataFrame(bad, columns=PROBLEM_COLUMNS).astype(PROBLEM_TYPES)


def _where(line, path) -> str:
    return path if pd.isna(line) else f"line {line}"


def manifest_error(path: Path, problems: pd.DataFrame, total: int) -> ManifestError:
    """Every bad line of a manifest in one error (the first LISTED_PROBLEMS, then a count)."""
    shown = problems.head(LISTED_PROBLEMS)
    lines = [f"  {path}: {_where(p.line, p.path)}: {p.reason}" for p in shown.itertuples()]
    if len(problems) > LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - LISTED_PROBLEMS} more")
    head = (f"manifest {path}: {len(problems)} of {total} entries are bad; fix them, or set manifest.on_error: "
            "skip to go on without them:")
    return ManifestError("\n".join([head, *lines]))


def read_manifest(path: Path) -> pd.DataFrame:
    """A manifest's clips; ManifestError lists every bad line when there is any."""
    df, problems = scan_manifest(path)
    if len(problems):
        raise manifest_error(path, problems, len(df) + len(problems))
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


def load_manifest(settings: Settings, progress=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The configured source as (manifest table, the bad lines left out): the embedded corpus,
    rendered first, or a file/folder. With manifest.on_error `stop` a bad line fails instead."""
    m = settings.manifest
    if m.source == "synthetic":
        return render_corpus(settings.path("corpus"), m.synthetic_clips, m.seed, progress), no_problems()
    path = resolve(m.source)
    df, problems = scan_manifest(path)
    if len(problems) and m.on_error == "stop":
        raise manifest_error(path, problems, len(df) + len(problems))
    return df, problems


def no_problems() -> pd.DataFrame:
    return pd.DataFrame(columns=PROBLEM_COLUMNS).astype(PROBLEM_TYPES)


def problem_metadata(problems: pd.DataFrame) -> dict:
    return {
        "skipped_lines": len(problems),
        "skipped": dg.MetadataValue.md(markdown_table(problems.astype("string").fillna(""), limit=LISTED_PROBLEMS, width=120)),
    }


@stage_asset(
    SPEC,
    group="video_data",
    checks={
        "manifest_is_usable": "The manifest is empty (also when manifest.on_error is skip and every line was bad), "
        "or a clip lacks an id, path or caption, or a clip id repeats."
    },
)
def video_manifest(st: Stage) -> dg.MaterializeResult:
    """Where the video data starts: the source clips (id, path, caption; InternVid-10M-FLT shape) that curation reads."""
    df, problems = load_manifest(st.settings, st.progress("rendering the embedded corpus", unit="clip"))
    out = st.write_table(df, "manifest.parquet")
    # Written also when empty: the stage's outputs are the same files on every run.
    st.write_table(problems, "manifest_problems.parquet")
    empty = [f"manifest is empty{f' (all {len(problems)} entries were bad and skipped)' if len(problems) else ''}"]
    check = quality.check_result(
        df,
        quality.not_null("clip_id", "path", "caption") + [quality.unique("clip_id")],
        "video_manifest",
        "manifest_is_usable",
        [] if len(df) else empty,
    )
    source = st.settings.manifest.source
    if len(problems):
        st.log.warning(f"manifest {source}: skipped {len(problems)} bad entries (manifest_problems.parquet)")
    st.log.info(f"manifest: {len(df)} clips from {source}")
    meta = {**table_metadata(df, out, ["clip_id", "caption", "end"]), **problem_metadata(problems)}
    return st.finish(meta, [check], {"clips": len(df), "skipped_lines": len(problems)})
