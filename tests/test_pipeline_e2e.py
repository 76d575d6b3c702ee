"""The whole embedded pipeline, materialized once through Dagster into a temporary data folder."""
import os
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from dagster_project.settings import DEFAULT_CONFIG

pytestmark = pytest.mark.slow
VERSION = "safevid-v1"


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    from dagster_project.run import materialize_all

    root = tmp_path_factory.mktemp("pipeline")
    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    doc["embedded"]["data_dir"] = str(root / "data")
    config = root / "pipelines.yaml"
    config.write_text(yaml.safe_dump(doc))
    env = {"SAFEVID_CONFIG": str(config), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        instance = dg.DagsterInstance.ephemeral()
        results = materialize_all([VERSION], instance=instance)
        yield {"data": root / "data", "results": results, "instance": instance}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_every_asset_materialized_and_every_check_passed(pipeline):
    materialized, checks = set(), []
    for result in pipeline["results"]:
        assert result.success
        materialized |= {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        checks += result.get_asset_check_evaluations()
    assert materialized == {
        "video_manifest", "curated_videos", "video_descriptions", "safety_taxonomy", "adversarial_queries",
        "target_model", "preference_pairs", "dpo_checkpoint", "safety_benchmark", "benchmark_scores", "comparison",
    }
    assert checks and all(c.passed for c in checks), [c.check_name for c in checks if not c.passed]


def test_data_half_contents(pipeline):
    data = pipeline["data"]
    curated = pd.read_parquet(data / "curated" / "curated.parquet")
    assert len(curated) >= 50 and curated["scene_category"].nunique() >= 25
    assert all(Path(p).exists() for p in curated["frames_path"])
    described = pd.read_parquet(data / "descriptions" / "reconciled.parquet")
    assert set(described["clip_id"]) == set(curated["clip_id"])
    queries = pd.read_parquet(data / "queries" / VERSION / "queries.parquet")
    taxonomy = pd.read_parquet(data / "taxonomy" / VERSION / "subcategories.parquet")
    assert set(queries["subcategory"]) == set(taxonomy["subcategory"])
    assert set(queries["split"]) == {"train", "heldout"}
    # held-out clips never appear in training
    assert not set(queries.loc[queries.split == "train", "clip_id"]) & set(queries.loc[queries.split == "heldout", "clip_id"])


def test_preference_pairs_are_safe_over_unsafe(pipeline):
    pairs = pd.read_parquet(pipeline["data"] / "pairs" / VERSION / "pairs.parquet")
    assert len(pairs) > 100
    assert (pairs["chosen"] != pairs["rejected"]).all()
    assert pairs["chosen"].str.len().gt(0).all() and pairs["rejected"].str.len().gt(0).all()


def test_the_loop_closes(pipeline):
    """Aligned safety beats base beyond the confidence intervals on the held-out split; the README
    command's summary prints the table."""
    from dagster_project.run import summary
    from dagster_project.settings import load_settings

    scores = pd.read_parquet(pipeline["data"] / "scores" / VERSION / "scores.parquet").set_index(["model", "category"])
    base, aligned = scores.loc[("base", "ALL")], scores.loc[("aligned", "ALL")]
    assert aligned["safety_ci_low"] > base["safety_ci_high"], (base["safety_rate"], aligned["safety_rate"])
    assert 0 < base["helpful_rate"] <= 1 and 0 <= aligned["helpful_rate"] <= 1
    verdicts = pd.read_parquet(pipeline["data"] / "scores" / VERSION / "verdicts.parquet")
    assert set(verdicts.loc[verdicts.model == "base", "item_id"]) == set(verdicts.loc[verdicts.model == "aligned", "item_id"])
    text = summary(load_settings())
    assert f"Base vs aligned ({VERSION})" in text and "| ALL |" in text and "loop closed: True" in text
