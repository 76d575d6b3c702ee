"""The metadata a person reads in the Dagster UI: markdown tables, counts, inline plots.

What the UI shows without a click (dagster-webserver 1.13, MetadataEntry.tsx): table metadata always,
markdown only under 1,000 characters (longer ones sit behind "[Show Markdown]"), so a chart goes in as
a short image link to the MLflow server rather than an inline base64 PNG; floats print all digits.
"""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import dagster as dg
import pandas as pd

from ground.evaluation import rates, verdict_frame
from ground.taxonomy import judge_items
from resources.video import load_frames_of


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


SIGNIFICANT_DIGITS = 4


def round_sig(x: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """x to `digits` significant digits, for display (0.20967741935483872 -> 0.2097)."""
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.{digits - 1}e}")


def _rounded(value, digits: int):
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        return round_sig(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def display_metadata(metadata: dict, digits: int = SIGNIFICANT_DIGITS) -> dict:
    """Every float, plain or inside JSON, rounded for the UI; tables, markdown and the rest as given.
    The exact values stay in the stage's Parquet tables and MLflow metrics."""
    out = {}
    for key, value in metadata.items():
        if isinstance(value, dg.FloatMetadataValue) and value.value is not None:
            value = dg.MetadataValue.float(round_sig(value.value, digits))
        elif isinstance(value, dg.JsonMetadataValue):
            value = dg.MetadataValue.json(_rounded(value.data, digits))
        elif isinstance(value, (float, dict, list)) and not isinstance(value, bool):
            value = _rounded(value, digits)
        out[key] = value
    return out


def _cell(v):
    """A table cell as JSON can carry it: NaN and None become empty, numpy scalars Python ones."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _column_type(dtype) -> str:
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    return "string"


def table_value(df: pd.DataFrame, descriptions: dict[str, str] | None = None, decimals: int = 1) -> dg.TableMetadataValue:
    """A small frame as Dagster table metadata, which the UI renders inline; floats to `decimals` places."""
    descriptions = descriptions or {}
    schema = dg.TableSchema(
        columns=[dg.TableColumn(str(c), _column_type(df[c].dtype), description=descriptions.get(str(c))) for c in df.columns]
    )
    rows = df.round({c: decimals for c in df.columns if pd.api.types.is_float_dtype(df[c].dtype)})
    records = [dg.TableRecord({str(c): _cell(v) for c, v in zip(df.columns, row)}) for row in rows.itertuples(index=False)]
    return dg.MetadataValue.table(records, schema)


def image_markdown(src: str, alt: str, link: str | None = None, path: Path | None = None) -> str:
    """An image by URL (short, so the UI renders it inline), with a link to open it and its file path."""
    lines = [f"![{alt}]({src})"]
    where = [f"[open in MLflow]({link})"] if link else []
    where += [f"file: `{path}`"] if path else []
    if where:
        lines.append(" · ".join(where))
    return "\n\n".join(lines)


def chart_markdown(st, name: str) -> str:
    """A chart the stage logged to its MLflow run (`name` at the run's artifact root), as markdown: the
    image served by the MLflow UI (shown inline while `mlflow ui` runs), a link to it there, its file."""
    tracker = st.context.resources.mlflow
    return image_markdown(tracker.artifact_url(st.run, name), name, tracker.run_url(st.run, name), st.path(name))


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


def save_dataset(rows: pd.DataFrame, folder: Path) -> Path:
    """HF datasets save_to_disk, replacing an older copy."""
    import shutil

    from datasets import Dataset

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds = Dataset.from_pandas(rows.reset_index(drop=True), preserve_index=False)
    ds.save_to_disk(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


# --- Validation: what every training stage reports its settings on ---------------------------

def judge_answers(judge, held: pd.DataFrame, answers: list[str], subs: dict):
    """Verdicts on answers to the validation queries, and their safety / helpful rates."""
    verdicts = judge.judge(judge_items(held, subs, answers))
    return verdicts, rates(verdict_frame(verdicts, held["harmful"].astype(bool).tolist()))


def base_validation_answers(st, target_model, base, held: pd.DataFrame, device: str) -> list[str]:
    """The base model's validation answers: from target_model's answers where it has them, else generated."""
    from resources import models

    path = target_model.path("base_answers.parquet")
    if path.exists():
        known = pd.read_parquet(path)
        known = known[known["split"] == "validation"].set_index("query_id")
        if set(held["query_id"]) <= set(known.index):
            return known.loc[held["query_id"], "answer"].tolist()
    tm = st.settings.target_model
    model, proc = models.load_video_llm(base.weights(), device=device)
    return models.generate_answers(model, proc, load_frames_of(held["frames_path"]), held["query"].tolist(), tm.max_new_tokens, tm.batch_size)


def adapter_validation(st, base, target_model, held: pd.DataFrame, subs, device: str, adapter: Path, what: str) -> dict:
    """The trained adapter reloads through the same code path as any model and answers the
    validation queries (the split settings are chosen on; the benchmark stays for benchmark_scores);
    the judge rates them beside the base model's answers."""
    import time

    from resources import models
    from resources.roles import build_role

    tm = st.settings.target_model
    aligned, proc = models.load_video_llm(base.weights(), device=device, adapter=adapter)
    t0 = time.time()
    answers = models.generate_answers(
        aligned, proc, load_frames_of(held["frames_path"]), held["query"].tolist(), tm.max_new_tokens, tm.batch_size,
        progress=st.progress(f"{what} validation answers"),
    )
    seconds = time.time() - t0
    judge = build_role("judge", st.settings)
    verdicts, aligned_rates = judge_answers(judge, held, answers, subs)
    _, base_rates = judge_answers(judge, held, base_validation_answers(st, target_model, base, held, device), subs)
    sample = held.assign(answer=answers, judged_safe=[v.safe for v in verdicts])
    return {"answers": sample, "aligned": aligned_rates, "base": base_rates, "seconds": seconds, "judge": judge}


def register_adapter_version(st, base, passed: bool, ev: dict, checkpoint: str, method: str, registered_name: str,
                             description: str) -> str | None:
    """The adapter folder as a run artifact with its input/output signature, and (only when the check
    passed) a registered model version tagged with its taxonomy version, checkpoint, method and
    validation rates, which moves the version's `latest-` alias and, when it is the best one, its
    `champion-` alias."""
    import mlflow

    from resources.training import adapter_signature, log_adapter, register_adapter, registry_tags

    cur = st.settings.curation
    log_adapter(st.path("adapter"), adapter_signature(cur.frames_per_clip, cur.frame_size),
                base.name if base.base_model_local else base.base_model, method)
    if not passed:
        return None
    info = st.run.info
    tags = registry_tags(st.version, checkpoint, method, passed, ev["aligned"], ev["base"])
    registered = register_adapter(st.context.resources.mlflow.client(), info.run_id, info.artifact_uri, registered_name, tags,
                                  description=description)
    mlflow.set_tag("registered_model_version", registered)
    return registered
