"""safety_benchmark: the held-out query split (SafeVidBench-Base style) plus external benchmark
files named in pipelines.yaml, mapped onto the taxonomy.

External files come in the shapes public benchmarks ship (Video-SafetyBench rows, MM-SafetyBench's
JSON keyed by id, goal/target lists of harmful questions) or with the user's own column names. Each
file is a source of its own (slice "external"), scored as its own split and never inside the
held-out ALL (ground/evaluation.py); the source's own topic is kept beside the taxonomy's names.

An external item whose video (or image) is missing or unreadable is reported with its reason; any
other problem of a file (a missing column, a bad label, an unmapped category, a harmful item mapped
to a benign subcategory) fails the run, naming the settings file, the benchmark file and the line.
"""
import csv
import hashlib
import json
import os
import re
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import markdown_table, table_metadata
from ground.catalog import StageData, StageSpec
from ground.settings import DEFAULT_CONFIG, BenchmarkSettings, Settings, resolve
from ground.taxonomy import subcategories_from_frame
from resources import quality

SPEC = StageSpec(folder="benchmark", files=("benchmark.parquet", "problems.parquet", "frames/"), params=("benchmark", "curation"))

COLUMNS = [
    "item_id", "source", "video_path", "frames_path", "media", "query", "principle", "category", "subcategory", "topic",
    "harmful", "kind", "visual_label", "textual_label", "slice", "language", "description", "source_fields",
]
TRUE = {"1", "true", "yes", "harmful", "unsafe"}
FALSE = {"0", "false", "no", "benign", "safe"}

# The names a column goes by in public benchmark files, matched after `norm`. The category's are
# most specific first: with both a subcategory and a category, the subcategory is the item's topic
# and the category what maps it when the subcategory does not.
ALIASES = {
    # red_team_query / attack_prompt / risk_type: the shapes a red-team (challenge) file comes in.
    "query": ("query", "question", "prompt", "instruction", "goal", "red_team_query", "attack_prompt"),
    "video_path": ("video_path", "video", "video_file", "path", "image", "image_path", "clip", "clip_path"),
    "category": ("subcategory", "topic", "scenario", "harm_category", "risk_type", "category", "type"),
    "harmful": ("harmful", "label", "is_harmful", "unsafe"),
    "visual_label": ("visual_label",),
    "textual_label": ("textual_label",),
    "description": ("description",),
    "language": ("language", "lang", "locale"),
}
ExternalFile = BenchmarkSettings.ExternalFile


class BenchmarkError(ValueError):
    pass


def norm(name) -> str:
    """A header or category name as compared: case, spaces, hyphens and underscores do not matter."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower()).strip("_")


def settings_label(cfg: Settings) -> str:
    """The settings file as the loader picks it ($SAFEVID_CONFIG, else pipelines.yaml): where a person fixes the keys."""
    return f"settings {os.environ.get('SAFEVID_CONFIG') or DEFAULT_CONFIG} (profile {cfg.profile!r})"


# --- reading a file ------------------------------------------------------------------------------

def entry_lines(text: str) -> list[int]:
    """The line each top-level entry of a (valid) JSON list or object starts on."""
    decoder, between = json.JSONDecoder(), re.compile(r"[\s,:]*")
    keyed = text.lstrip()[0] == "{"
    i, line, last, lines = text.index("{" if keyed else "[") + 1, 1, 0, []
    while True:
        i = between.match(text, i).end()
        if text[i] in "]}":
            return lines
        line, last = line + text.count("\n", last, i), i
        lines.append(line)
        if keyed:
            _, i = decoder.raw_decode(text, i)
            i = between.match(text, i).end()
        _, i = decoder.raw_decode(text, i)


def json_rows(path: Path, where: str) -> list[tuple[int, dict]]:
    """A JSON list of rows, or an object of rows keyed by id (MM-SafetyBench: the scenario is the file's name)."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{where}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(doc, dict) and all(isinstance(v, dict) for v in doc.values()):
        scenario = re.sub(r"^\d+[-_ ]*", "", path.stem)  # 01-Illegal_Activitiy.json: the number only orders the files
        return [(n, {"id": key, "scenario": scenario, **row}) for n, (key, row) in zip(entry_lines(text), doc.items())]
    if isinstance(doc, list) and all(isinstance(r, dict) for r in doc):
        return list(zip(entry_lines(text), doc))
    raise BenchmarkError(f"{where}: line 1: expected a list of rows or an object of rows keyed by id")


def file_rows(path: Path, where: str) -> list[tuple[int, dict]]:
    """(line, row) of a JSONL, CSV or JSON file."""
    if not path.exists():
        raise BenchmarkError(f"{where}: the file does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json_rows(path, where)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            return [(reader.line_num, r) for r in reader]
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise BenchmarkError(f"{where}: line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rows[-1][1], dict):
                raise BenchmarkError(f"{where}: line {n}: expected a JSON object (one row)")
    return rows


def columns(row: dict, aliases: dict[str, str]) -> dict[str, list[str]]:
    """Per column the row's keys that stand for it, preferred first: the user's aliases, then the built-in names."""
    by_norm = {norm(k): k for k in row}
    claimed = {norm(a): f for a, f in aliases.items()}
    out = {}
    for field, builtin in ALIASES.items():
        names = [a for a, f in claimed.items() if f == field] + [n for n in builtin if claimed.get(n, field) == field]
        out[field] = [by_norm[n] for n in dict.fromkeys(names) if n in by_norm]
    return out


def shape_defaults(row: dict) -> dict:
    """What a public benchmark's shape says where its rows have no column for it (keys normalised)."""
    if {"harmful_intention", "question_type"} <= row.keys():
        # Video-SafetyBench: every video shows the harm; its benign questions read harmless and are
        # harmful with the video (HB), its harmful ones are harmful either way (HH).
        return {"harmful": "true", "visual_label": "1", "textual_label": "0" if norm(row["question_type"]) == "benign" else "1"}
    if {"goal", "target"} <= row.keys() or {"question", "key_phrase"} <= row.keys():
        return {"harmful": "true"}  # lists of harmful questions (JailbreakBench, AdvBench) and MM-SafetyBench
    return {}


def need(where: str, field: str, why: str) -> BenchmarkError:
    accepted = ", ".join(ALIASES[field])
    return BenchmarkError(f"{where}: {why} (columns read as {field}: {accepted}; name your own in benchmark.column_aliases)")


def flag(where: str, field: str, value: str) -> bool:
    text = value.strip().lower()
    if text not in TRUE | FALSE:
        raise BenchmarkError(f"{where}: {field}={value!r} is not a label; use true/false, 1/0 or harmful/benign")
    return text in TRUE


def require(at: str, cols: dict, values: dict, media: str) -> None:
    """The columns every row needs: a query, a category and, unless the file is text-only, its video or image."""
    for field in ("query", "category") + (("video_path",) if media != "none" else ()):
        if not cols[field]:
            hint = " (for a text-only file set media: none in its benchmark.external_files entry)" if field == "video_path" else ""
            raise need(at, field, f"no {field} column{hint}")
        if not values[field]:
            raise need(at, field, f"empty {', '.join(cols[field])}")


def row_labels(at: str, row: dict, cols: dict, values: dict, file: ExternalFile) -> dict:
    """harmful, visual_label and textual_label: the row's columns, else the file's option, else the shape's, else the
    defaults of before (a safe video; the query harmful when the item is)."""
    shape = shape_defaults({norm(k): str(v) for k, v in row.items()})
    if cols["harmful"]:
        label = str(row[cols["harmful"][0]])
    elif file.harmful is not None:
        label = str(file.harmful)
    elif "harmful" in shape:
        label = shape["harmful"]
    else:
        raise need(at, "harmful", "no label column (or set harmful: true/false in the file's benchmark.external_files entry)")
    harmful = flag(at, "harmful", label)
    defaults = {"visual_label": shape.get("visual_label", "0"), "textual_label": shape.get("textual_label", str(harmful))}
    return {"harmful": harmful, **{f: int(flag(at, f, values[f][0] if values[f] else d)) for f, d in defaults.items()}}


def parse_row(n: int, raw: dict, file: ExternalFile, aliases: dict[str, str], where: str) -> dict:
    """One row in the benchmark's terms: query, video_path, topics (most specific first), labels and the other fields kept."""
    at = f"{where}: line {n}"
    row = {str(k): "" if v is None else v for k, v in raw.items() if k is not None}
    cols = columns(row, aliases)
    values = {f: [str(row[c]).strip() for c in cs if str(row[c]).strip()] for f, cs in cols.items()}
    require(at, cols, values, file.media)
    # The columns read stay out of source_fields; the rest, a broader category too, is kept as the source wrote it.
    used = {next((c for c in cs if str(row[c]).strip()), cs[0]) for cs in cols.values() if cs}
    first = {f: v[0] if v else "" for f, v in values.items()}
    return {
        "line": n, "query": first["query"], "video_path": first["video_path"], "topics": values["category"],
        **row_labels(at, row, cols, values, file), "description": first["description"], "language": first["language"] or file.language,
        "source_fields": json.dumps({k: v for k, v in row.items() if k not in used}, ensure_ascii=False, default=str),
    }


def read_external(path: Path, file: ExternalFile | None = None, aliases: dict[str, str] | None = None, where: str | None = None) -> list[dict]:
    """The rows of one external benchmark file, each as `parse_row` reads it."""
    file = file or ExternalFile(path=str(path))
    where = where or f"benchmark file {path}"
    return [parse_row(n, r, file, aliases or {}, where) for n, r in file_rows(path, where)]


# --- mapping onto the taxonomy -------------------------------------------------------------------

def targets(subs) -> dict[str, dict]:
    """Normalised taxonomy name → what an item mapped to it gets; a category is benign when all it holds is."""
    out = {}
    for category in dict.fromkeys(s.category for s in subs):
        held = [s for s in subs if s.category == category]
        out[norm(category)] = {"principle": held[0].principle, "category": category, "subcategory": category,
                               "benign": all(s.kind == "benign" for s in held)}
    for s in subs:
        out[norm(s.subcategory)] = {"principle": s.principle, "category": s.category, "subcategory": s.subcategory,
                                    "benign": s.kind == "benign"}
    return out


def mapping_targets(mapping: dict[str, str], names: dict[str, dict], settings: str) -> dict[str, dict]:
    """benchmark.category_mapping with normalised keys, each to its taxonomy target; a target the taxonomy lacks, or
    one name written two ways with different targets, fails."""
    out, written = {}, {}
    for key, target in mapping.items():
        if norm(target) not in names:
            raise BenchmarkError(f"{settings}: benchmark.category_mapping maps {key!r} to {target!r}, which is not a "
                                 f"subcategory or category of the taxonomy; those are: {sorted({t['subcategory'] for t in names.values()})}")
        if norm(key) in out and out[norm(key)] is not names[norm(target)]:
            raise BenchmarkError(f"{settings}: benchmark.category_mapping has {written[norm(key)]!r} and {key!r}, one name "
                                 "written two ways, mapped to different targets")
        out[norm(key)], written[norm(key)] = names[norm(target)], key
    return out


def map_categories(rows: list[dict], mapping: dict[str, str], subs, where: str, settings: str = "the settings file") -> list[dict]:
    """Each row's topic (else its broader category) → a taxonomy subcategory or category, by mapping or by name."""
    names = targets(subs)
    mapped = {**names, **mapping_targets(mapping, names, settings)}
    out, unmapped, benign = [], {}, {}
    for r in rows:
        target = next((mapped[norm(t)] for t in r["topics"] if norm(t) in mapped), None)
        if target is None:
            unmapped.setdefault(" / ".join(r["topics"]), r["line"])
        elif r["harmful"] and target["benign"]:
            benign.setdefault((r["topics"][0], target["subcategory"]), r["line"])
        else:
            out.append({**r, "topic": r["topics"][0], **{k: target[k] for k in ("principle", "category", "subcategory")}})
    if unmapped:
        listed = ", ".join(f"{name!r} (line {n})" for name, n in unmapped.items())
        raise BenchmarkError(f"{where}: categories not mapped to the taxonomy: {listed}; add them under "
                             f"benchmark.category_mapping in {settings} (targets: a subcategory or category of the taxonomy)")
    if benign:
        listed = "; ".join(f"line {n}: topic {topic!r} -> {sub!r}" for (topic, sub), n in benign.items())
        raise BenchmarkError(f"{where}: harmful items mapped to a benign subcategory ({listed}): the taxonomy holds only "
                             "benign requests there, so the mapping is wrong or the label is; map the topic to a harmful or "
                             f"contextual subcategory under benchmark.category_mapping in {settings}, or label the item benign")
    return out


# --- frames --------------------------------------------------------------------------------------

def blank_frames(frames_dir: Path, n_frames: int, size: int) -> str:
    """The zeroed frames every text-only item shares, saved once."""
    path = frames_dir / f"blank_{n_frames}x{size}.npy"
    if not path.exists():
        frames_dir.mkdir(parents=True, exist_ok=True)
        np.save(path, np.zeros((n_frames, size, size, 3), np.uint8))
    return str(path)


def image_frames(image: Path, n_frames: int, size: int, frames_dir: Path) -> str:
    """An image as a still clip: resized like sampled frames, repeated n_frames times."""
    from PIL import Image

    from resources.video import VideoError, resize_frames, sha256_file

    if not image.is_file():
        raise VideoError(f"missing file: {image} does not exist", "missing")
    try:
        with Image.open(image) as img:
            pixels = np.asarray(img.convert("RGB"))
    except OSError as exc:  # PIL's UnidentifiedImageError is one
        raise VideoError(f"unreadable image: {exc}", "unreadable") from None
    path = frames_dir / f"image_{sha256_file(image)}_{n_frames}x{size}.npy"
    if not path.exists():
        frames_dir.mkdir(parents=True, exist_ok=True)
        np.save(path, np.repeat(resize_frames(pixels[None], size), n_frames, axis=0))
    return str(path)


def item_frames(media: Path | None, kind: str, cfg: Settings, frames_dir: Path) -> str:
    """The frames_path of one item; a video or image that cannot be used raises VideoError."""
    from resources.video import probe_and_sample

    n, size = cfg.curation.frames_per_clip, cfg.curation.frame_size
    if kind == "none":
        return blank_frames(frames_dir, n, size)
    if kind == "image":
        return image_frames(media, n, size, frames_dir)
    return probe_and_sample(media, n, size, frames_dir, cfg.curation.duplicate_frame_fraction)["frames_path"]


def media_path(r: dict, file: ExternalFile, path: Path) -> Path | None:
    if file.media == "none":
        return None
    given = Path(r["video_path"])
    # A relative path is relative to the benchmark file, as the file's author wrote it.
    return given if given.is_absolute() else path.parent / given


def external_item(r: dict, file: ExternalFile, path: Path, source: str, cfg: Settings, frames_dir: Path) -> tuple[dict | None, dict | None]:
    """One mapped row as a benchmark item, or as a problem when its video or image cannot be used."""
    from resources.video import VideoError

    item_id = hashlib.sha256(f"{source}:{r['line']}:{r['query']}".encode()).hexdigest()[:16]
    media = media_path(r, file, path)
    try:
        frames = item_frames(media, file.media, cfg, frames_dir)
    except VideoError as err:
        return None, {"item_id": item_id, "source": f"{source}:{r['line']}", "video_path": str(media), "reason": err.reason}
    # Without visual_label / textual_label (0/1) a video counts as safe and the query as harmful when the item is.
    visual, textual = r["visual_label"], r["textual_label"]
    return {
        "item_id": item_id, "source": source, "video_path": str(media or ""), "frames_path": frames, "media": file.media,
        "query": r["query"], "principle": r["principle"], "category": r["category"], "subcategory": r["subcategory"],
        "topic": r["topic"], "harmful": r["harmful"], "kind": ("H" if visual else "S") + ("H" if textual else "B"),
        "visual_label": visual, "textual_label": textual, "slice": file.split, "language": r["language"], "description": r["description"],
        "source_fields": r["source_fields"],
    }, None


def external_items(cfg: Settings, subs, frames_dir: Path) -> tuple[list[dict], list[dict]]:
    """Items and problems of every external file; videos are sampled like curated clips."""
    settings = settings_label(cfg)
    items, problems = [], []
    for file in cfg.benchmark.external_files:
        path = resolve(file.path)
        where = f"{settings}: benchmark file {path}"
        rows = read_external(path, file, {**cfg.benchmark.column_aliases, **file.column_aliases}, where)
        for r in map_categories(rows, cfg.benchmark.category_mapping, subs, where, settings):
            item, problem = external_item(r, file, path, file.source(), cfg, frames_dir)
            items += [item] if item else []
            problems += [problem] if problem else []
    return items, problems


# --- the table -----------------------------------------------------------------------------------

def benchmark_table(queries: pd.DataFrame, items: list[dict]) -> pd.DataFrame:
    """The held-out queries (their query_id is the item_id; their topic, their subcategory) followed by the external items."""
    held = queries[queries["split"] == "heldout"].rename(columns={"query_id": "item_id"})
    held = held.assign(source="heldout", media="video", topic=held["subcategory"], source_fields="{}")
    df = pd.concat([held[COLUMNS], pd.DataFrame(items, columns=COLUMNS)], ignore_index=True)
    df["harmful"] = df["harmful"].astype(bool)
    return df


def source_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Items per source and topic, harmful and benign apart."""
    if df.empty:
        return pd.DataFrame(columns=["source", "topic", "harmful", "benign"])
    label = df["harmful"].map({True: "harmful", False: "benign"}).rename("label")
    counts = pd.crosstab([df["source"], df["topic"]], label).reindex(columns=["harmful", "benign"], fill_value=0)
    return counts.reset_index().rename_axis(columns=None)


def benchmark_check(df: pd.DataFrame, subs, min_items: int = 1) -> dg.AssetCheckResult:
    missing_frames = [p for p in df["frames_path"] if not Path(p).exists()]
    extra = [f"{len(missing_frames)} items without sampled frames"] if missing_frames else []
    if not df["harmful"].any():
        extra.append("no harmful items: a safety rate needs them")
    held = int((df["source"] == "heldout").sum())
    if held < min_items:
        extra.append(f"the held-out split has {held} items, fewer than benchmark.min_items ({min_items}): add clips or raise "
                     "queries.heldout_fraction (or lower benchmark.min_items on purpose)")
    return quality.check_result(
        df,
        quality.not_null("item_id", "query", "subcategory", "frames_path")
        + [quality.unique("item_id"), quality.in_set("subcategory", {s.subcategory for s in subs} | {s.category for s in subs})],
        "safety_benchmark",
        "benchmark_is_scorable",
        extra,
    )


@stage_asset(
    SPEC,
    group="evaluation",
    partitioned=True,
    checks={
        "benchmark_is_scorable": "Every item has a unique id, a query, a taxonomy subcategory and sampled frames, some items "
        "are harmful, and the held-out split has at least benchmark.min_items items."
    },
)
def safety_benchmark(st: Stage, adversarial_queries: StageData, safety_taxonomy: StageData) -> dg.MaterializeResult:
    """The test set every checkpoint is scored on: held-out queries about clips never trained on, plus external files, each scored apart."""
    subs = subcategories_from_frame(safety_taxonomy.table("subcategories.parquet"))
    frames = st.path("frames")
    frames.mkdir(exist_ok=True)  # a declared output, present even when no external file adds frames
    items, problems = external_items(st.settings, subs, frames)
    df = benchmark_table(adversarial_queries.table("queries.parquet"), items)
    out = st.write_table(df, "benchmark.parquet")
    problems_df = pd.DataFrame(problems, columns=["item_id", "source", "video_path", "reason"])
    st.write_table(problems_df, "problems.parquet")
    return st.finish(
        {
            **table_metadata(df, out, ["source", "topic", "category", "harmful", "query"], "category"),
            "sources": dg.MetadataValue.md(markdown_table(source_counts(df), limit=200)),
            "problems": dg.MetadataValue.md(markdown_table(problems_df) if len(problems_df) else "none"),
            "problem_count": len(problems_df),
        },
        [benchmark_check(df, subs, st.settings.benchmark.min_items)],
        {"items": len(df), "harmful": int(df["harmful"].sum()), "external_items": len(items), "problems": len(problems_df)},
    )
