"""Small helpers every stage uses: table files and the metadata a person reads in the Dagster UI."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import dagster as dg
import pandas as pd


def write_table(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)  # atomic: a crash never leaves half a table behind
    return path


def read_table(path: Path, upstream: str) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize '{upstream}' first")
    return pd.read_parquet(path)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    tmp.replace(path)
    return path


def markdown_table(df: pd.DataFrame, limit: int = 10, width: int = 80) -> str:
    if df.empty:
        return "_empty_"
    head = df.head(limit)
    cells = [[str(v).replace("|", "/").replace("\n", " ")[:width] for v in row] for row in head.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, head.columns)) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    if len(df) > limit:
        lines.append(f"\n_{len(df) - limit} more rows_")
    return "\n".join(lines)


def counts_table(df: pd.DataFrame, column: str) -> str:
    counts = df[column].value_counts().sort_index().rename_axis(column).reset_index(name="count")
    return markdown_table(counts, limit=100)


def table_metadata(
    df: pd.DataFrame, path: Path, preview: list[str] | None = None, category: str | None = None
) -> dict:
    meta = {
        "dagster/row_count": len(df),
        "path": dg.MetadataValue.path(str(path)),
        "preview": dg.MetadataValue.md(markdown_table(df[preview] if preview else df)),
    }
    if category and category in df.columns:
        meta[f"per_{category}"] = dg.MetadataValue.md(counts_table(df, category))
    return meta


def png_markdown(fig) -> str:
    """A matplotlib figure inline as markdown, so the Dagster UI shows the plot itself."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return f"![plot](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def record_lineage(context, dvc, mlflow, run, stage: str) -> dict:
    """DVC records the outputs; the MLflow run gets their hashes as tags. Returns Dagster metadata."""
    from resources.dvc import record_outputs

    meta = record_outputs(context, dvc, stage)
    outs = meta.get("dvc/outs")
    if outs is not None:
        mlflow.tag(run.info.run_id, {"dvc.stage": meta["dvc/stage"], "dvc.outs": json.dumps(outs.data)})
    return meta


def progress_logger(context, what: str, steps: int = 10):
    """progress(done, total) that logs about `steps` times: long stages report items done / total."""
    last = [-1]

    def progress(done: int, total: int) -> None:
        tenth = done * steps // max(total, 1)
        if tenth != last[0] or done == total:
            last[0] = tenth
            context.log.info(f"{what}: {done}/{total}")

    return progress
