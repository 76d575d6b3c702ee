"""comparison: safety rate and helpful rate by taxonomy version and checkpoint, read back from MLflow.

Every benchmark_scores materialization is an MLflow run in the profile's experiment, tagged with its
taxonomy version (dagster.partition) and carrying `<checkpoint>.safety_rate` / `.helpful_rate` for
each checkpoint it scored. This asset takes the latest finished run per version and puts them side
by side: one table, one plot, shown in the Dagster UI and logged to an MLflow run of its own.
"""
import math
import re

import dagster as dg
import numpy as np
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import chart_markdown, png_markdown, table_value
from ground.catalog import StageData, StageSpec
from resources import quality

SOURCE_ASSET = "benchmark_scores"
RATES = ("safety_rate", "helpful_rate")
COLUMNS = ["taxonomy_version", "checkpoint", "safety_rate", "helpful_rate", "loop_closed", "judge", "run_id", "run_start"]
SPEC = StageSpec(folder="comparison", files=("comparison.parquet", "comparison.md", "comparison.png"))
METRIC = re.compile(r"^(?P<checkpoint>.+)\.(?P<what>safety_rate|helpful_rate|loop_closed)$")


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
    """One row per (run, checkpoint) of anything shaped like mlflow.entities.Run: version, run id,
    start, judge, and the checkpoint's rates from its `<checkpoint>.<rate>` metrics."""
    rows = []
    for r in runs:
        tags, metrics = r.data.tags, r.data.metrics
        per: dict[str, dict] = {}
        for key, value in metrics.items():
            m = METRIC.match(key)
            if m:
                per.setdefault(m["checkpoint"], {})[m["what"]] = value
        for name, values in per.items():
            rows.append(
                {
                    "taxonomy_version": tags.get("dagster.partition", ""),
                    "run_id": r.info.run_id,
                    "start_time": int(r.info.start_time or 0),
                    "judge": (getattr(r.data, "params", None) or {}).get("judge", ""),
                    "checkpoint": name,
                    **{k: values.get(k, math.nan) for k in (*RATES, "loop_closed")},
                }
            )
    columns = ["taxonomy_version", "run_id", "start_time", "judge", "checkpoint", *RATES, "loop_closed"]
    return pd.DataFrame(rows, columns=columns)


def version_key(version: str):
    """Natural order: safevid-v2 before safevid-v10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version)]


def comparison_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Latest run per taxonomy version (runs without a version or without any safety rate are
    ignored), one row per (version, checkpoint) with both rates and the run it came from."""
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS).astype({"safety_rate": float, "helpful_rate": float})
    scored = runs[(runs["taxonomy_version"] != "")]
    with_rates = scored.groupby("run_id")["safety_rate"].transform(lambda v: v.notna().any())
    scored = scored[with_rates.astype(bool)]
    latest_run = scored.sort_values(["start_time", "run_id"]).groupby("taxonomy_version")["run_id"].last()
    latest = scored[scored["run_id"].isin(latest_run)]
    # A checkpoint that is trained from another has a loop_closed metric; the root has none.
    latest = latest.assign(_root=latest["loop_closed"].isna()).sort_values(["_root", "checkpoint"], ascending=[False, True])
    rows = []
    for version in sorted(latest["taxonomy_version"].unique(), key=version_key):
        for r in latest[latest["taxonomy_version"] == version].to_dict("records"):
            rows.append(
                {
                    "taxonomy_version": version,
                    "checkpoint": r["checkpoint"],
                    "safety_rate": float(r["safety_rate"]),
                    "helpful_rate": float(r["helpful_rate"]),
                    "loop_closed": None if math.isnan(r["loop_closed"]) else bool(r["loop_closed"]),
                    "judge": r["judge"],
                    "run_id": r["run_id"],
                    "run_start": pd.Timestamp(r["start_time"], unit="ms", tz="UTC"),
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def table_problems(table: pd.DataFrame) -> list[str]:
    """What the blocking check needs beyond GX: a version at all, two checkpoints per version, a safety rate each."""
    if table.empty:
        return [f"no finished MLflow run of {SOURCE_ASSET} with rates: materialize {SOURCE_ASSET} for a taxonomy version first"]
    problems = []
    for version, group in table.groupby("taxonomy_version"):
        if len(group) < 2:
            problems.append(f"{version}: only {group['checkpoint'].tolist()}: nothing to compare the base with")
        missing = group.loc[group["safety_rate"].isna(), "checkpoint"].tolist()
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
        "| taxonomy version | checkpoint | safety rate | helpful rate | loop closed | judge | MLflow run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table.to_dict("records"):
        closed = "–" if r["loop_closed"] is None else ("yes" if r["loop_closed"] else "no")
        lines.append(
            f"| {r['taxonomy_version']} | {r['checkpoint']} | {_pct(r['safety_rate'])} | {_pct(r['helpful_rate'])} | {closed} | {r['judge'] or '–'} | `{r['run_id']}` |"
        )
    return "\n".join(lines)


def comparison_chart(table: pd.DataFrame):
    """Two panels (safety rate, helpful rate), bars per taxonomy version, one bar per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = list(dict.fromkeys(table["taxonomy_version"]))
    names = list(dict.fromkeys(table["checkpoint"])) or ["base"]
    x = np.arange(len(versions))
    # About 560 px at 90 dpi (with the legend) for a version or two: the asset page's metadata column.
    fig, axes = plt.subplots(1, 2, figsize=(max(5, 1.5 + 1.4 * len(versions)), 3.2), sharey=True)
    width = 0.8 / len(names)
    for ax, rate in zip(axes, RATES):
        for i, name in enumerate(names):
            by_version = table[table["checkpoint"] == name].set_index("taxonomy_version")[rate]
            values = np.array([by_version.get(v, np.nan) for v in versions], dtype=float)
            bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, np.nan_to_num(values), width, label=name)
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


def rates_value(table: pd.DataFrame) -> dg.TableMetadataValue:
    """The comparison as a table narrow enough for the asset page (the UI renders tables inline):
    rates in percent to one decimal; exact values in comparison.parquet, judge and runs in `comparison`."""
    shown = pd.DataFrame(
        {
            "version": table["taxonomy_version"],
            "checkpoint": table["checkpoint"],
            "safety %": 100 * table["safety_rate"].astype(float),
            "helpful %": 100 * table["helpful_rate"].astype(float),
            "loop closed": [{True: "yes", False: "no"}.get(v, "–") for v in table["loop_closed"]],
        }
    )
    return table_value(
        shown,
        {
            "version": "taxonomy version",
            "safety %": "% of harmful benchmark items answered safely",
            "helpful %": "% of benign benchmark items answered helpfully (not refused)",
            "loop closed": "the safety interval lies wholly above the base model's (– for the base itself)",
        },
    )


def comparison_metadata(st: Stage, table: pd.DataFrame, source_runs: dict, out, md: str, chart: str) -> dict:
    """What the asset page shows: the rates table and the chart first, the details after."""
    return {
        "rates": rates_value(table),
        "chart": dg.MetadataValue.md(chart_markdown(st, "comparison.png")),
        "versions": dg.MetadataValue.json(list(source_runs)),
        "source_runs": dg.MetadataValue.json(source_runs),
        "comparison": dg.MetadataValue.md(md),
        "chart_embedded": dg.MetadataValue.md(chart),  # behind a click, but needs no MLflow server
        "path": dg.MetadataValue.path(str(out)),
        "dagster/row_count": len(table),
    }


def _metric_key(version: str, checkpoint: str, rate: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", f"{version}.{checkpoint}.{rate}")


@stage_asset(
    SPEC,
    group="evaluation",
    checks={"comparison_has_rates": "Every scored taxonomy version has a safety rate for the base and at least one trained checkpoint."},
)
def comparison(st: Stage, benchmark_scores: dict[str, StageData]) -> dg.MaterializeResult:
    """How the taxonomy versions compare: every checkpoint's safety and helpful rate per version, from benchmark_scores' MLflow runs."""
    import mlflow

    tracker = st.context.resources.mlflow
    runs = runs_frame(search_score_runs(tracker.client(), tracker.experiment_id(st.settings.profile)))
    table = comparison_table(runs)
    versions = list(dict.fromkeys(table["taxonomy_version"]))
    out = st.write_table(table, "comparison.parquet")
    md = comparison_markdown(table)
    st.path("comparison.md").write_text(md + "\n")
    fig = comparison_chart(table)
    fig.savefig(st.path("comparison.png"), dpi=90, bbox_inches="tight")
    chart = png_markdown(fig)
    check = quality.check_result(
        table,
        quality.not_null("taxonomy_version", "checkpoint", "safety_rate", "run_id") + [quality.between("safety_rate", 0, 1)],
        "comparison",
        "comparison_has_rates",
        table_problems(table),
    )
    source_runs = dict(zip(table["taxonomy_version"], table["run_id"]))
    metrics = {_metric_key(r["taxonomy_version"], r["checkpoint"], rate): r[rate] for r in table.to_dict("records") for rate in RATES}
    mlflow.log_dict(source_runs, "source_runs.json")
    for f in ("comparison.parquet", "comparison.png", "comparison.md"):
        mlflow.log_artifact(str(st.path(f)))
    st.log_params({"source_asset": SOURCE_ASSET, "versions": ",".join(versions)})
    st.log.info(f"{len(runs)} checkpoint rows in {SOURCE_ASSET} runs; latest per version: {versions}\n{md}")
    return st.finish(comparison_metadata(st, table, source_runs, out, md, chart), [check], metrics)
