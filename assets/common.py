"""The metadata a person reads in the Dagster UI: markdown tables, counts, inline plots."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import dagster as dg
import pandas as pd


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


def loss_plot(losses: list[float], title: str) -> str:
    """A training loss curve as inline markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    md = png_markdown(fig)
    plt.close(fig)
    return md
