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
    assert {"video_manifest", "curated_videos", "video_descriptions", "safety_taxonomy", "adversarial_queries"} <= materialized
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
