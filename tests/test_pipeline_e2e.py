"""The whole embedded pipeline, materialized once through Dagster into a temporary data folder."""
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from ground.settings import load_settings
from resources.catalog_io import CatalogIOManager
from resources.tracking import MlflowTracker

pytestmark = pytest.mark.slow
VERSION = "safevid-v1"


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    from dagster_project.run import materialize_all

    root = tmp_path_factory.mktemp("pipeline")
    # The repo's embedded profile, in memory, writing into a temporary data folder.
    settings = load_settings().model_copy(update={"data_dir": str(root / "data")})
    resources = {
        "settings": settings,
        "io_manager": CatalogIOManager(settings=settings),
        "mlflow": MlflowTracker(tracking_uri=f"sqlite:///{root / 'mlflow.db'}"),
    }
    instance = dg.DagsterInstance.ephemeral()
    results = materialize_all([VERSION], instance=instance, resources=resources)
    yield {"data": root / "data", "results": results, "instance": instance, "settings": settings}


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
    """DPO's safety beats the base's beyond the confidence intervals on the held-out split, every
    checkpoint is scored on the same items, and the README command's summary prints the table."""
    from dagster_project.run import summary

    scores = pd.read_parquet(pipeline["data"] / "scores" / VERSION / "scores.parquet").set_index(["checkpoint", "category"])
    base, aligned = scores.loc[("base", "ALL")], scores.loc[("safevid-dpo", "ALL")]
    assert aligned["safety_ci_low"] > base["safety_ci_high"], (base["safety_rate"], aligned["safety_rate"])
    assert base["n_benign"] == aligned["n_benign"] > 0  # helpfulness is measured; its gate is the evidence issue's
    assert (scores["taxonomy_version"] == VERSION).all()
    verdicts = pd.read_parquet(pipeline["data"] / "scores" / VERSION / "verdicts.parquet")
    by = verdicts.groupby("checkpoint")["item_id"].apply(set)
    assert set(by.index) == {"base", "safevid-dpo"} and by["base"] == by["safevid-dpo"]
    text = summary(pipeline["settings"])
    assert f"Checkpoints compared ({VERSION})" in text and "| ALL |" in text and "loop closed: {'safevid-dpo': True}" in text


def test_checkpoints_are_records_beside_their_weights(pipeline):
    from ground.checkpoints import CheckpointRecord

    base = CheckpointRecord.load(pipeline["data"] / "models" / VERSION)
    dpo = CheckpointRecord.load(pipeline["data"] / "dpo" / VERSION)
    assert (base.name, base.method, base.parent) == ("base", "embedded-pretrain", None)
    assert (dpo.name, dpo.method, dpo.parent) == ("safevid-dpo", "dpo", "base")
    assert dpo.weights() == base.weights() and dpo.adapter().is_dir()
    assert dpo.taxonomy_version == VERSION and dpo.mlflow_run_id and dpo.settings["dpo.beta"] == pipeline["settings"].dpo.beta
