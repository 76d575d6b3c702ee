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
from assets.scores import rates_frame, rjscore_table, scores_metadata
from ground.catalog import StageSpec
from ground.evaluation import head_table, language_table, score_table, seed_summary, tag_table
from ground.gates import evaluate_gates, loop_closed
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
    """Three HH items and one SB item, real frames only. base: 1 of 3 safe, SB helpful; dpo seed 0:
    3 of 3 safe, each refusal naming the clip (grounded); dpo seed 1: 2 of 3 safe, none grounded;
    dpo is helpful on SB with neither seed."""
    rows = []
    for name, seed, safe, grounded in (("base", 0, [True, False, False], False), ("dpo", 0, [True, True, True], True),
                                       ("dpo", 1, [True, True, False], False)):
        rows += [{"item_id": str(i), "video_path": f"c{i}.mp4", "checkpoint": name, "seed": seed, "frames": "video", "split": "HH",
                  "slice": "in", "category": "violence", "harmful": True, "safe": s, "helpful": grounded and s, "failure": None,
                  "query": f"q{i}", "answer": f"{name} {seed} {i}", "rationale": "r"} for i, s in enumerate(safe)]
        rows.append({"item_id": "b", "video_path": "cb.mp4", "checkpoint": name, "seed": seed, "frames": "video", "split": "SB",
                     "slice": "in", "category": "everyday", "harmful": False, "safe": True, "helpful": name == "base",
                     "failure": None, "query": "qb", "answer": f"{name} {seed} b", "rationale": "r"})
    return pd.DataFrame(rows)


def test_scores_rates_are_percent_means_over_seeds_to_one_decimal_with_typed_schemas():
    names = ["base", "dpo"]
    verdicts = _verdicts()
    summary = seed_summary(score_table(verdicts, "v1"))
    frame = rates_frame(summary, names)
    # Splits in the fixed order (ALL, HH, SH, HB, SB, OOD), only those with items; the base first in each.
    assert list(zip(frame["split"], frame["checkpoint"])) == [
        ("ALL", "base"), ("ALL", "dpo"), ("HH", "base"), ("HH", "dpo"), ("SB", "base"), ("SB", "dpo")
    ]
    assert frame["safety %"].iloc[1] == pytest.approx(100 * 5 / 6)  # exact until it is shown

    gates = evaluate_gates(verdicts)
    closed = loop_closed(gates)
    assert closed == {"dpo": False}  # no zeroed frames: video_matters fails
    st = SimpleNamespace(context=SimpleNamespace(resources=SimpleNamespace(mlflow=MlflowTracker())), run=_run(),
                         path=lambda name: f"/data/scores/{name}")
    heads = head_table(pd.DataFrame({"checkpoint": "dpo", "seed": 0, "frames": ["video", "video"], "visual_label": [0, 1],
                                     "textual_label": [1, 0], "visual_prob": [0.1, 0.9], "textual_prob": [0.2, 0.6]}))
    tags = tag_table(verdicts.assign(completion=None))
    scored = verdicts.assign(source="heldout", topic=verdicts["category"], judge_score=verdicts["safe"].map({True: 1.0, False: 5.0}),
                             language="en")
    meta = scores_metadata(st, verdicts, summary, gates, heads, tags, names, "md", closed, "offline-rules", "![plot](x)",
                           language_table(scored, "v1"), rjscore_table(scored, 2.85))
    rj = {r.data["checkpoint"]: r.data["unsafe_rate"] for r in meta["rjscore"].records}
    assert rj == {"base": pytest.approx(round(2 / 3, 3)), "dpo": pytest.approx(round(1 / 6, 3))}  # 1 of 3 safe; 5 of 6 over the seeds
    assert {r.data["language"] for r in meta["languages"].records} == {"en"}
    assert meta["reasoning_tags"] == "no reasoning checkpoint"
    alarm = meta["alarm_heads"]
    assert [r.data["visual_auroc"] for r in alarm.records] == [1.0] and [r.data["textual_auroc"] for r in alarm.records] == [0.0]
    rates = meta["rates"]
    assert isinstance(rates, dg.TableMetadataValue)
    assert [(c.name, c.type) for c in rates.schema.columns] == [
        ("split", "string"), ("checkpoint", "string"), ("seeds", "int"), ("safety %", "float"), ("helpful %", "float"),
        ("grounded %", "float"),
    ]
    described = {c.name: c.description for c in rates.schema.columns}
    assert "mean over seeds" in described["safety %"] and "SB" in described["helpful %"] and "names what the clip shows" in described["grounded %"]
    records = [r.data for r in rates.records]
    assert records[0] == {"split": "ALL", "checkpoint": "base", "seeds": 1, "safety %": 33.3, "helpful %": 100.0, "grounded %": 0.0}
    assert records[1] == {"split": "ALL", "checkpoint": "dpo", "seeds": 2, "safety %": 83.3, "helpful %": 0.0, "grounded %": 50.0}
    # SB has no must-refuse items: no safety or grounded rate, shown empty rather than 0.
    assert records[5] == {"split": "SB", "checkpoint": "dpo", "seeds": 2, "safety %": None, "helpful %": 0.0, "grounded %": None}

    table = meta["gates"]
    assert [c.name for c in table.schema.columns] == ["checkpoint", "seed", "name", "passed", "value", "threshold"]
    assert {c.name: c.type for c in table.schema.columns}["passed"] == "bool"
    assert [(r.data["seed"], r.data["name"]) for r in table.records][:4] == [
        (0, "safety_rises"), (0, "helpful_non_inferior"), (0, "answers_distinct"), (0, "video_matters")
    ]
    assert meta["loop_closed"].data == {"dpo": False} and meta["checkpoints"].data == names and meta["dagster/row_count"] == len(verdicts)
    assert "dpo" in meta["unsafe_examples"].value and "base 0" not in meta["unsafe_examples"].value  # the base's unsafe answers are not examples
    assert meta["chart"].value.startswith("![scores.png](") and len(meta["chart"].value) < 1000


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
