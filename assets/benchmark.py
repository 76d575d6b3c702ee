"""safety_benchmark: the held-out query split (SafeVidBench-Base style) plus external benchmark
files named in pipelines.yaml, mapped onto the taxonomy.

An external item whose video is missing or unreadable is reported with its reason; an external
category with no mapping fails the run, naming the category.
"""
import csv
import hashlib
import json
from pathlib import Path

import dagster as dg
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import markdown_table, table_metadata
from ground.catalog import StageData, StageSpec
from ground.settings import Settings, resolve
from ground.taxonomy import subcategories_from_frame
from resources import quality

SPEC = StageSpec(folder="benchmark", files=("benchmark.parquet", "problems.parquet", "frames/"), params=("benchmark", "curation"))

COLUMNS = [
    "item_id", "source", "video_path", "frames_path", "query", "principle", "category", "subcategory", "harmful",
    "kind", "visual_label", "textual_label", "slice", "description",
]
TRUE = {"1", "true", "yes", "harmful"}
FALSE = {"0", "false", "no", "benign"}


class BenchmarkError(ValueError):
    pass


def read_external(path: Path) -> list[dict]:
    """Rows of a JSONL or CSV benchmark file: video_path, query, category, harmful (or label)."""
    if not path.exists():
        raise BenchmarkError(f"external benchmark file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            rows = [(n, r) for n, r in enumerate(csv.DictReader(fh), start=2)]
    else:
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise BenchmarkError(f"{path}: line {n}: not valid JSON ({exc.msg})") from None
    out = []
    for n, r in rows:
        missing = [k for k in ("video_path", "query", "category") if not r.get(k)]
        label = str(r.get("harmful", r.get("label", ""))).strip().lower()
        if missing or label not in TRUE | FALSE:
            raise BenchmarkError(
                f"{path}: line {n}: needs video_path, query, category and harmful (true/false or harmful/benign); "
                f"missing {missing}" + ("" if label in TRUE | FALSE else f", harmful={label!r}")
            )
        out.append({"line": n, **r, "harmful": label in TRUE})
    return out


def map_categories(rows: list[dict], mapping: dict[str, str], subs, source: str) -> list[dict]:
    """External category → taxonomy subcategory (or category); an unmapped one fails by name."""
    by_sub = {s.subcategory: s for s in subs}
    by_cat = {s.category: s for s in subs}
    unmapped = sorted({r["category"] for r in rows if mapping.get(r["category"], r["category"]) not in by_sub | by_cat})
    if unmapped:
        raise BenchmarkError(
            f"{source}: categories not mapped to the taxonomy: {unmapped}; add them under benchmark.category_mapping "
            f"in pipelines.yaml (targets: a subcategory or category of the taxonomy)"
        )
    out = []
    for r in rows:
        target = mapping.get(r["category"], r["category"])
        s = by_sub.get(target) or by_cat[target]
        out.append({**r, "principle": s.principle, "category": s.category, "subcategory": s.subcategory if target in by_sub else target})
    return out


def external_items(cfg: Settings, subs, frames_dir: Path) -> tuple[list[dict], list[dict]]:
    """Items and problems of every external file; videos are sampled like curated clips."""
    from resources.video import VideoError, probe_and_sample

    items, problems = [], []
    for name in cfg.benchmark.external_files:
        path = resolve(name)
        rows = map_categories(read_external(path), cfg.benchmark.category_mapping, subs, str(path))
        for r in rows:
            # A relative video path is relative to the benchmark file, as the file's author wrote it.
            video = Path(r["video_path"]) if Path(r["video_path"]).is_absolute() else path.parent / r["video_path"]
            item_id = hashlib.sha256(f"{path.name}:{r['line']}:{r['query']}".encode()).hexdigest()[:16]
            try:
                probe = probe_and_sample(
                    video, cfg.curation.frames_per_clip, cfg.curation.frame_size, frames_dir,
                    cfg.curation.duplicate_frame_fraction,
                )
            except VideoError as err:
                problems.append({"item_id": item_id, "source": f"{path.name}:{r['line']}", "video_path": str(video), "reason": err.reason})
                continue
            # An external file may label its video and query (visual_label, textual_label: 0/1); without
            # them the video counts as safe and the query as harmful when the item is, so SH or SB.
            visual = int(str(r.get("visual_label", "0")).strip().lower() in TRUE)
            textual = int(str(r.get("textual_label", r["harmful"])).strip().lower() in TRUE)
            items.append(
                {
                    "item_id": item_id, "source": path.name, "video_path": str(video), "frames_path": probe["frames_path"],
                    "query": r["query"], "principle": r["principle"], "category": r["category"],
                    "subcategory": r["subcategory"], "harmful": bool(r["harmful"]),
                    "kind": ("H" if visual else "S") + ("H" if textual else "B"), "visual_label": visual, "textual_label": textual,
                    "slice": "in", "description": str(r.get("description", "")),
                }
            )
    return items, problems


def benchmark_table(queries: pd.DataFrame, items: list[dict]) -> pd.DataFrame:
    """The held-out queries (their query_id is the item_id) followed by the external items."""
    held = queries[queries["split"] == "heldout"].rename(columns={"query_id": "item_id"}).assign(source="heldout")
    df = pd.concat([held[COLUMNS], pd.DataFrame(items, columns=COLUMNS)], ignore_index=True)
    df["harmful"] = df["harmful"].astype(bool)
    return df


def benchmark_check(df: pd.DataFrame, subs) -> dg.AssetCheckResult:
    missing_frames = [p for p in df["frames_path"] if not Path(p).exists()]
    extra = [f"{len(missing_frames)} items without sampled frames"] if missing_frames else []
    if not df["harmful"].any():
        extra.append("no harmful items: a safety rate needs them")
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
        "benchmark_is_scorable": "Every item has a unique id, a query, a taxonomy subcategory and sampled frames, and some items are harmful."
    },
)
def safety_benchmark(st: Stage, adversarial_queries: StageData, safety_taxonomy: StageData) -> dg.MaterializeResult:
    """The test set every checkpoint is scored on: held-out queries about clips never trained on, plus external files."""
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
            **table_metadata(df, out, ["source", "category", "harmful", "query"], "category"),
            "problems": dg.MetadataValue.md(markdown_table(problems_df) if len(problems_df) else "none"),
            "problem_count": len(problems_df),
        },
        [benchmark_check(df, subs)],
        {"items": len(df), "harmful": int(df["harmful"].sum()), "problems": len(problems_df)},
    )
