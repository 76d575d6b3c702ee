"""What the Dagster UI shows: floats rounded for display (exact in MLflow), rates as inline tables,
the MLflow run as a link, charts as short markdown (the UI renders markdown inline only under 1,000
characters)."""
from types import SimpleNamespace

import dagster as dg
import pandas as pd
import pytest

from assets._stage import Stage, stage_asset
from assets.common import chart_markdown, display_metadata, round_sig, table_value
from assets.comparison import rates_value as comparison_rates
from assets.scores import loop_closed, rates_values, side_by_side
from ground.catalog import StageSpec
from ground.evaluation import rollup
from ground.settings import Settings
from resources.dvc import DvcTracker
from resources.tracking import MlflowTracker

EXACT = 0.20967741935483872


def test_round_sig_keeps_four_significant_digits():
    assert round_sig(EXACT) == 0.2097
    assert round_sig(12345.678) == 12350.0
    assert round_sig(-0.000123456) == -0.0001235
    assert round_sig(0.0) == 0.0 and round_sig(float("inf")) == float("inf")


def test_display_metadata_rounds_every_float_and_nothing_else():
    meta = display_metadata(
        {
            "plain": EXACT,
            "wrapped": dg.MetadataValue.float(EXACT),
            "json": dg.MetadataValue.json({"rates": {"train": EXACT}, "list": [EXACT, 3], "flag": True}),
            "raw_dict": {"share": 1 / 3},
            "count": 7,
            "flag": True,
            "md": dg.MetadataValue.md(f"{EXACT}"),
        }
    )
    assert meta["plain"] == 0.2097 and meta["wrapped"].value == 0.2097
    assert meta["json"].data == {"rates": {"train": 0.2097}, "list": [0.2097, 3], "flag": True}
    assert meta["raw_dict"] == {"share": 0.3333}
    assert meta["count"] == 7 and meta["flag"] is True and meta["md"].value == str(EXACT)


def _verdicts() -> pd.DataFrame:
    """base: 1 of 3 harmful items safe; dpo: 3 of 3; one benign item each."""
    rows = []
    for name, safe in (("base", [True, False, False]), ("dpo", [True, True, True])):
        rows += [{"item_id": str(i), "checkpoint": name, "category": "violence", "harmful": True, "safe": s, "helpful": False,
                  "failure": None} for i, s in enumerate(safe)]
        rows.append({"item_id": "b", "checkpoint": name, "category": "everyday", "harmful": False, "safe": True,
                     "helpful": name == "base", "failure": None})
    return pd.DataFrame(rows)


def test_scores_tables_are_percent_to_one_decimal_with_typed_schemas():
    names = ["base", "dpo"]
    table = side_by_side(rollup(_verdicts()), names)
    closed = loop_closed(table, names)
    values = rates_values(table, names, closed)
    assert all(isinstance(v, dg.TableMetadataValue) for v in values.values())

    rates = values["rates"]
    assert [(c.name, c.type) for c in rates.schema.columns] == [
        ("checkpoint", "string"), ("safety %", "float"), ("95% CI", "string"), ("helpful %", "float"), ("loop closed", "string"),
    ]
    base, dpo = (r.data for r in rates.records)
    assert base["checkpoint"] == "base" and base["safety %"] == 33.3 and base["helpful %"] == 100.0 and base["loop closed"] == "–"
    assert dpo["safety %"] == 100.0 and dpo["loop closed"] == ("yes" if closed["dpo"] else "no")
    assert base["95% CI"] == "6.1–79.2"  # Wilson interval of 1 of 3
    assert table.loc[table["category"] == "ALL", "safety_base"].item() == pytest.approx(1 / 3)  # exact stays exact

    per = values["safety_by_category"]
    assert [c.name for c in per.schema.columns] == ["category", "n harmful", "base %", "dpo %"]
    # Neither ALL (the rates table has it) nor a category without harmful items.
    assert [r.data for r in per.records] == [{"category": "violence", "n harmful": 3, "base %": 33.3, "dpo %": 100.0}]
    assert {c.name: c.description for c in per.schema.columns}["dpo %"] == "% of the category's harmful items dpo answered safely"


def test_comparison_rates_table_shows_percent_and_loop_in_words():
    table = pd.DataFrame(
        {"taxonomy_version": ["v1", "v1"], "checkpoint": ["base", "dpo"], "safety_rate": [EXACT, 0.95], "helpful_rate": [0.9, None],
         "loop_closed": [None, True], "judge": ["offline-rules", ""], "run_id": ["0123456789abcdef", "0123456789abcdef"]}
    )
    rows = [r.data for r in comparison_rates(table).records]
    assert rows[0] == {"version": "v1", "checkpoint": "base", "safety %": 21.0, "helpful %": 90.0, "loop closed": "–"}
    assert rows[1]["loop closed"] == "yes" and rows[1]["helpful %"] is None


def test_table_value_types_bools_and_ints():
    value = table_value(pd.DataFrame({"ok": [True], "n": [2], "x": [1.26], "s": ["a"]}), {"x": "a rate"})
    assert [(c.name, c.type) for c in value.schema.columns] == [("ok", "bool"), ("n", "int"), ("x", "float"), ("s", "string")]
    assert value.records[0].data == {"ok": True, "n": 2, "x": 1.3, "s": "a"}


def _run(exp="7", run="abc123"):
    return SimpleNamespace(info=SimpleNamespace(experiment_id=exp, run_id=run))


def test_run_url_points_at_the_run_page_of_the_configured_ui():
    tracker = MlflowTracker(ui_url="http://mlflow.example:5001/")
    assert tracker.run_url(_run()) == "http://mlflow.example:5001/#/experiments/7/runs/abc123?workflowType=machine_learning"
    assert tracker.run_url(_run(), "scores.png") == "http://mlflow.example:5001/#/experiments/7/runs/abc123/artifacts/scores.png?workflowType=machine_learning"
    assert tracker.artifact_url(_run(), "a b.png") == "http://mlflow.example:5001/get-artifact?path=a+b.png&run_uuid=abc123"
    assert MlflowTracker().run_url(_run()).startswith("http://127.0.0.1:5000/#/")


def test_chart_markdown_is_short_enough_to_render_inline():
    folder = "/a/long/data/folder/" + "x" * 200
    st = SimpleNamespace(context=SimpleNamespace(resources=SimpleNamespace(mlflow=MlflowTracker())), run=_run(run="f" * 32),
                         path=lambda name: f"{folder}/{name}")
    md = chart_markdown(st, "scores.png")
    assert md.startswith(f"![scores.png](http://127.0.0.1:5000/get-artifact?path=scores.png&run_uuid={'f' * 32})")
    assert f"(http://127.0.0.1:5000/#/experiments/7/runs/{'f' * 32}/artifacts/scores.png?workflowType=machine_learning)" in md and folder in md
    assert len(md) < 1000  # longer markdown sits behind "[Show Markdown]" (dagster-webserver's MetadataEntry.tsx)


PROBE = StageSpec(folder="ui_probe", files=())


@stage_asset(PROBE, group="evaluation")
def ui_probe(st: Stage) -> dg.MaterializeResult:
    """A stage that only finishes, with an unrounded float."""
    return st.finish({"rate": EXACT, "rates": {"train": EXACT}}, metrics={"rate": EXACT})


def test_finish_links_the_mlflow_run_and_rounds_only_what_dagster_shows(tmp_path):
    tracker = MlflowTracker(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "mlruns"), ui_url="http://ui:1"
    )
    resources = {
        "settings": Settings(profile="embedded", data_dir=str(tmp_path / "data")),
        "mlflow": tracker,
        "dvc": DvcTracker(repo_root=str(tmp_path), dvc_bin=str(tmp_path / "no-dvc")),
    }
    result = dg.materialize([ui_probe], resources=resources, instance=dg.DagsterInstance.ephemeral())
    [mat] = result.asset_materializations_for_node("ui_probe")
    meta = mat.metadata
    assert meta["rate"].value == 0.2097 and meta["rates"].value == {"train": 0.2097}
    run = tracker.client().get_run(meta["mlflow_run_id"].value)
    assert meta["mlflow_run"] == dg.MetadataValue.url(f"http://ui:1/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning")
    assert run.data.metrics["rate"] == EXACT
