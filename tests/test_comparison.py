"""comparison: the pure table / plot functions on fake runs, and the asset on a temporary MLflow store."""
import math
from types import SimpleNamespace

import dagster as dg
from stage_resources import stage_resources
import pandas as pd
import pytest

from assets.comparison import (
    comparison,
    comparison_chart,
    comparison_markdown,
    comparison_table,
    runs_frame,
    table_problems,
)
from assets._stage import taxonomy_partitions
from assets.scores import build_benchmark_scores
from ground.settings import Settings
from resources.tracking import MlflowTracker


def fake_run(run_id, version, start, base=(0.2, 0.9), aligned=(0.8, 0.85), closed=1.0, asset="benchmark_scores"):
    metrics = {"base.safety_rate": base[0], "aligned.safety_rate": aligned[0], "aligned.loop_closed": closed}
    if base[1] is not None:
        metrics["base.helpful_rate"] = base[1]
    if aligned[1] is not None:
        metrics["aligned.helpful_rate"] = aligned[1]
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, start_time=start),
        data=SimpleNamespace(
            tags={"dagster.asset": asset, "dagster.partition": version, "profile": "embedded"}, metrics=metrics, params={"judge": "offline-rules"}
        ),
    )


# --- pure functions ---------------------------------------------------------------------------------


def test_table_takes_the_latest_run_per_version_in_natural_order():
    runs = runs_frame(
        [
            fake_run("old-v1", "safevid-v1", 1000, base=(0.1, 0.5)),
            fake_run("new-v1", "safevid-v1", 2000, base=(0.3, 0.7), aligned=(0.9, 0.6)),
            fake_run("v10", "safevid-v10", 1500, closed=0.0),
            fake_run("v2", "safevid-v2", 500, aligned=(0.7, None)),
            fake_run("no-version", "", 3000),
        ]
    )
    table = comparison_table(runs)
    assert table["taxonomy_version"].tolist() == ["safevid-v1"] * 2 + ["safevid-v2"] * 2 + ["safevid-v10"] * 2
    assert table["checkpoint"].tolist() == ["base", "aligned"] * 3  # the root (no loop_closed metric) first
    v1 = table[table["taxonomy_version"] == "safevid-v1"].set_index("checkpoint")
    assert v1.loc["base", "safety_rate"] == 0.3 and v1.loc["aligned", "helpful_rate"] == 0.6
    assert set(v1["run_id"]) == {"new-v1"} and v1["loop_closed"].tolist() == [None, True]
    assert table.loc[table["taxonomy_version"] == "safevid-v10", "loop_closed"].tolist() == [None, False]
    v2_aligned = table[(table["taxonomy_version"] == "safevid-v2") & (table["checkpoint"] == "aligned")].iloc[0]
    assert math.isnan(v2_aligned["helpful_rate"])  # no benign items: missing, not zero
    assert table_problems(table) == []

    md = comparison_markdown(table)
    assert md.count("\n") == 2 + 6 - 1 and "| safevid-v1 | aligned | 90% | 60% | yes | offline-rules | `new-v1` |" in md
    assert "| safevid-v2 | aligned | 70% | – |" in md


def test_a_run_without_rates_does_not_hide_an_earlier_complete_one():
    runs = runs_frame(
        [fake_run("complete", "safevid-v1", 1000), SimpleNamespace(
            info=SimpleNamespace(run_id="empty", start_time=2000),
            data=SimpleNamespace(tags={"dagster.partition": "safevid-v1"}, metrics={}),
        )]
    )
    assert set(comparison_table(runs)["run_id"]) == {"complete"}


def test_problems_name_what_is_wrong():
    assert "no finished MLflow run" in table_problems(comparison_table(runs_frame([])))[0]
    bad = comparison_table(runs_frame([fake_run("r", "safevid-v1", 1, base=(1.4, 0.5))]))
    assert table_problems(bad) == ["a rate lies outside [0, 1]"]
    one_model = comparison_table(runs_frame([fake_run("r", "safevid-v1", 1)]))
    one_model = one_model[one_model["checkpoint"] == "base"]
    assert table_problems(one_model) == ["safevid-v1: only ['base']: nothing to compare the base with"]


def test_chart_has_a_panel_per_rate_and_a_bar_per_version_and_model():
    table = comparison_table(runs_frame([fake_run("a", "safevid-v1", 1), fake_run("b", "safevid-v2", 2, aligned=(0.5, None))]))
    fig = comparison_chart(table)
    safety, helpful = fig.axes
    assert safety.get_title() == "safety rate" and helpful.get_title() == "helpful rate"
    assert [t.get_text() for t in safety.get_xticklabels()] == ["safevid-v1", "safevid-v2"]
    heights = sorted(round(p.get_height(), 2) for p in safety.patches)
    assert heights == [0.2, 0.2, 0.5, 0.8] and len(helpful.patches) == 4
    assert comparison_chart(comparison_table(runs_frame([]))).axes  # an empty table still draws


# --- the asset on a temporary MLflow store ---------------------------------------------------------


@pytest.fixture
def env(tmp_path):
    settings = Settings(profile="embedded", data_dir=str(tmp_path / "data"))
    resources = stage_resources(settings, tmp_path)
    mlflow = resources["mlflow"]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("taxonomy_version", ["safevid-v1", "safevid-v2"])
    return tmp_path, mlflow, resources, instance


def materialize_comparison(resources, instance, **kw):
    """comparison alone; benchmark_scores is in the graph only so its partitions and outputs are known."""
    upstream = [dg.AssetSpec(k, partitions_def=taxonomy_partitions) for k in ("safety_benchmark", "safety_taxonomy", "target_model")]
    graph = [comparison, build_benchmark_scores(["target_model"]), *upstream]
    return dg.materialize(graph, resources=resources, instance=instance, selection=["comparison"], **kw)


def seed(mlflow: MlflowTracker, profile: str, asset: str, version: str, start: int, metrics: dict, status="FINISHED") -> str:
    client = mlflow.client()
    run = client.create_run(
        mlflow.experiment_id(profile),
        start_time=start,
        tags={"dagster.asset": asset, "dagster.partition": version, "profile": profile},
    )
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    client.log_param(run.info.run_id, "judge", "offline-rules")
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def rates(base_s, base_h, aligned_s, aligned_h, closed=1.0) -> dict:
    return {"base.safety_rate": base_s, "base.helpful_rate": base_h, "aligned.safety_rate": aligned_s,
            "aligned.helpful_rate": aligned_h, "aligned.loop_closed": closed}


def test_asset_reads_latest_finished_runs_of_its_profile_and_logs_its_own(env):
    tmp_path, mlflow, resources, instance = env
    seed(mlflow, "embedded", "benchmark_scores", "safevid-v1", 1_000, rates(0.1, 0.9, 0.5, 0.9, 0.0))
    v1 = seed(mlflow, "embedded", "benchmark_scores", "safevid-v1", 2_000, rates(0.2, 0.9, 0.95, 0.8))
    v2 = seed(mlflow, "embedded", "benchmark_scores", "safevid-v2", 1_500, rates(0.25, 0.85, 0.9, 0.75))
    seed(mlflow, "embedded", "benchmark_scores", "safevid-v2", 5_000, rates(0.0, 0.0, 0.0, 0.0), status="FAILED")
    seed(mlflow, "embedded", "dpo_checkpoint", "safevid-v2", 6_000, rates(0.0, 0.0, 0.0, 0.0))
    seed(mlflow, "paper", "benchmark_scores", "safevid-v3", 6_000, rates(0.5, 0.5, 0.5, 0.5))

    result = materialize_comparison(resources, instance)
    assert result.success
    [check] = result.get_asset_check_evaluations()
    assert check.passed

    table = pd.read_parquet(tmp_path / "data" / "comparison" / "comparison.parquet")
    assert table[["taxonomy_version", "checkpoint", "run_id"]].values.tolist() == [
        ["safevid-v1", "base", v1], ["safevid-v1", "aligned", v1], ["safevid-v2", "base", v2], ["safevid-v2", "aligned", v2],
    ]
    assert table["safety_rate"].tolist() == [0.2, 0.95, 0.25, 0.9]
    assert (tmp_path / "data" / "comparison" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "| safevid-v1 | aligned | 95% | 80% | yes | offline-rules |" in (tmp_path / "data" / "comparison" / "comparison.md").read_text()

    [mat] = result.asset_materializations_for_node("comparison")
    meta = mat.metadata
    assert meta["dagster/row_count"].value == 4
    assert meta["chart_embedded"].value.startswith("![plot](data:image/png;base64,")
    own_id = meta["mlflow_run_id"].value
    assert meta["chart"].value.startswith(f"![comparison.png]({mlflow.ui_url}/get-artifact?path=comparison.png&run_uuid={own_id})")
    assert len(meta["chart"].value) < 1000  # longer markdown hides behind a click in the UI
    assert [r.data["safety %"] for r in meta["rates"].records] == [20.0, 95.0, 25.0, 90.0]  # exact: comparison.parquet
    assert f"`{v2}`" in meta["comparison"].value
    assert meta["source_runs"].value == {"safevid-v1": v1, "safevid-v2": v2}

    client = mlflow.client()
    own = client.get_run(meta["mlflow_run_id"].value)
    assert own.data.tags["dagster.asset"] == "comparison" and own.data.tags["profile"] == "embedded"
    assert own.info.experiment_id == mlflow.experiment_id("embedded")
    assert own.data.metrics["safevid-v2.aligned.helpful_rate"] == 0.75
    assert {a.path for a in client.list_artifacts(own.info.run_id)} >= {"comparison.parquet", "comparison.png", "comparison.md", "source_runs.json"}


def test_asset_check_blocks_when_no_version_was_scored(env):
    tmp_path, mlflow, resources, instance = env
    seed(mlflow, "embedded", "safety_taxonomy", "safevid-v1", 1_000, {"subcategories": 3})
    result = materialize_comparison(resources, instance, raise_on_error=False)
    [check] = result.get_asset_check_evaluations()
    assert not check.passed
    assert "no finished MLflow run of benchmark_scores" in check.metadata["results"].value
    assert pd.read_parquet(tmp_path / "data" / "comparison" / "comparison.parquet").empty
