"""comparison: safety rate and helpful rate by taxonomy version and model, read back from MLflow.

Every benchmark_scores materialization is an MLflow run in the profile's experiment, tagged with its
taxonomy version (dagster.partition) and carrying base_/aligned_ safety_rate and helpful_rate. This
asset takes the latest finished run per version and puts them side by side: one table, one plot,
shown in the Dagster UI and logged to an MLflow run of its own.
"""
import math
import re

import dagster as dg
import numpy as np
import pandas as pd

from assets.common import png_markdown, record_lineage, write_table
from dagster_project.settings import PipelineSettings
from resources import quality
from resources.dvc import DvcTracker
from resources.tracking import MlflowTracker

SOURCE_ASSET = "benchmark_scores"
MODELS = ("base", "aligned")
RATES = ("safety_rate", "helpful_rate")
COLUMNS = ["taxonomy_version", "model", "safety_rate", "helpful_rate", "loop_closed", "judge", "run_id", "run_start"]


def search_score_runs(client, experiment_id: str) -> list:
    """Every finished MLflow run of benchmark_scores in the experiment, newest first, all pages."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`dagster.asset` = '{SOURCE_ASSET}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def runs_frame(runs) -> pd.DataFrame:
    """One row per run (anything shaped like mlflow.entities.Run): version, run id, start, judge, metrics."""
    rows = []
    for r in runs:
        tags, metrics = r.data.tags, r.data.metrics
        rows.append(
            {
                "taxonomy_version": tags.get("dagster.partition", ""),
                "run_id": r.info.run_id,
                "start_time": int(r.info.start_time or 0),
                "judge": (getattr(r.data, "params", None) or {}).get("judge", ""),
                **{f"{m}_{rate}": metrics.get(f"{m}_{rate}", math.nan) for m in MODELS for rate in RATES},
                "loop_closed": metrics.get("loop_closed", math.nan),
            }
        )
    columns = ["taxonomy_version", "run_id", "start_time", "judge", *(f"{m}_{r}" for m in MODELS for r in RATES), "loop_closed"]
    return pd.DataFrame(rows, columns=columns)


def version_key(version: str):
    """Natural order: safevid-v2 before safevid-v10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version)]


def comparison_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Latest run per taxonomy version (runs without a version or without any safety rate are
    ignored), one row per (version, model) with both rates and the run it came from."""
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS).astype({"safety_rate": float, "helpful_rate": float})
    scored = runs[(runs["taxonomy_version"] != "") & runs[[f"{m}_safety_rate" for m in MODELS]].notna().any(axis=1)]
    latest = scored.sort_values(["start_time", "run_id"]).groupby("taxonomy_version").tail(1)
    rows = []
    for r in sorted(latest.to_dict("records"), key=lambda r: version_key(r["taxonomy_version"])):
        for m in MODELS:
            rows.append(
                {
                    "taxonomy_version": r["taxonomy_version"],
                    "model": m,
                    "safety_rate": float(r[f"{m}_safety_rate"]),
                    "helpful_rate": float(r[f"{m}_helpful_rate"]),
                    "loop_closed": None if math.isnan(r["loop_closed"]) else bool(r["loop_closed"]),
                    "judge": r["judge"],
                    "run_id": r["run_id"],
                    "run_start": pd.Timestamp(r["start_time"], unit="ms", tz="UTC"),
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def table_problems(table: pd.DataFrame) -> list[str]:
    """What the blocking check needs beyond GX: a version at all, both models per version, a safety rate each."""
    if table.empty:
        return [f"no finished MLflow run of {SOURCE_ASSET} with rates: materialize {SOURCE_ASSET} for a taxonomy version first"]
    problems = []
    for version, group in table.groupby("taxonomy_version"):
        if sorted(group["model"]) != sorted(MODELS):
            problems.append(f"{version}: models {sorted(group['model'])}, expected {sorted(MODELS)}")
        missing = group.loc[group["safety_rate"].isna(), "model"].tolist()
        if missing:
            problems.append(f"{version}: no safety rate for {missing}")
    rates = table[list(RATES)].to_numpy(dtype=float)
    if np.any((rates < 0) | (rates > 1)):  # NaN compares False: a missing helpful rate is allowed
        problems.append("a rate lies outside [0, 1]")
    return problems


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f}%"


def comparison_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return f"_no {SOURCE_ASSET} runs in MLflow yet_"
    lines = [
        "| taxonomy version | model | safety rate | helpful rate | loop closed | judge | MLflow run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table.to_dict("records"):
        closed = "–" if r["loop_closed"] is None else ("yes" if r["loop_closed"] else "no")
        lines.append(
            f"| {r['taxonomy_version']} | {r['model']} | {_pct(r['safety_rate'])} | {_pct(r['helpful_rate'])} | {closed} | {r['judge'] or '–'} | `{r['run_id']}` |"
        )
    return "\n".join(lines)


def comparison_chart(table: pd.DataFrame):
    """Two panels (safety rate, helpful rate), bars per taxonomy version, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = list(dict.fromkeys(table["taxonomy_version"]))
    x = np.arange(len(versions))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 2 + 1.6 * len(versions)), 3.5), sharey=True)
    width = 0.8 / len(MODELS)
    for ax, rate in zip(axes, RATES):
        for i, model in enumerate(MODELS):
            by_version = table[table["model"] == model].set_index("taxonomy_version")[rate]
            values = np.array([by_version.get(v, np.nan) for v in versions], dtype=float)
            bars = ax.bar(x + (i - (len(MODELS) - 1) / 2) * width, np.nan_to_num(values), width, label=model)
            ax.bar_label(bars, labels=[_pct(v) for v in values], fontsize=7, padding=1)
        ax.set_xticks(x, versions, rotation=20, ha="right")
        ax.set_title(rate.replace("_", " "))
        ax.set_ylim(0, 1.1)
    axes[0].set_ylabel("rate")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if not versions:
        axes[0].text(0.5, 0.5, f"no {SOURCE_ASSET} runs", ha="center", transform=axes[0].transAxes)
    fig.tight_layout()
    return fig


def _metric_key(version: str, model: str, rate: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", f"{version}.{model}.{rate}")


@dg.asset(
    deps=[SOURCE_ASSET],
    group_name="evaluation",
    code_version="1",
    check_specs=[dg.AssetCheckSpec("comparison_has_rates", asset="comparison", blocking=True)],
)
def comparison(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow: MlflowTracker, dvc: DvcTracker):
    """Safety and helpful rate of the base and the aligned model per taxonomy version, from the
    latest MLflow run of benchmark_scores for each version."""
    cfg = settings.load()
    experiment_id = mlflow.experiment_id(cfg.profile)
    runs = runs_frame(search_score_runs(mlflow.client(), experiment_id))
    table = comparison_table(runs)
    versions = list(dict.fromkeys(table["taxonomy_version"]))
    context.log.info(f"{len(runs)} finished {SOURCE_ASSET} runs in experiment {experiment_id}; latest per version: {versions}")

    folder = cfg.path("comparison")
    out = write_table(table, folder / "comparison.parquet")
    md = comparison_markdown(table)
    (folder / "comparison.md").write_text(md + "\n")
    import matplotlib.pyplot as plt

    fig = comparison_chart(table)
    fig.savefig(folder / "comparison.png", dpi=90, bbox_inches="tight")
    chart = png_markdown(fig)
    plt.close(fig)

    check = quality.check_result(
        table,
        quality.not_null("taxonomy_version", "model", "safety_rate", "run_id")
        + [quality.in_set("model", MODELS), quality.between("safety_rate", 0, 1)],
        "comparison",
        "comparison_has_rates",
        table_problems(table),
    )
    source_runs = dict(zip(table["taxonomy_version"], table["run_id"]))
    metrics = {
        _metric_key(r["taxonomy_version"], r["model"], rate): float(r[rate])
        for r in table.to_dict("records")
        for rate in RATES
        if not math.isnan(r[rate])
    }
    with mlflow.run(context, cfg.profile, {"source_asset": SOURCE_ASSET, "versions": ",".join(versions)}) as run:
        import mlflow as mlf

        mlf.log_dict(source_runs, "source_runs.json")
        if metrics:
            mlf.log_metrics(metrics)
        mlf.set_tag("check.comparison_has_rates", str(check.passed))
        for f in ("comparison.parquet", "comparison.png", "comparison.md"):
            mlf.log_artifact(str(folder / f))
    context.log.info(f"comparison:\n{md}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(table),
            "path": dg.MetadataValue.path(str(out)),
            "versions": dg.MetadataValue.json(versions),
            "comparison": dg.MetadataValue.md(md),
            "chart": dg.MetadataValue.md(chart),
            "source_runs": dg.MetadataValue.json(source_runs),
            "mlflow_run_id": run.info.run_id,
            **record_lineage(context, dvc, mlflow, run, "comparison"),
        },
        check_results=[check],
    )
