"""The resources a stage needs in a test, all inside a temporary folder: the settings object (built
in memory), a private MLflow store, no DVC, and the catalog IO manager on the same settings."""
from resources.catalog_io import CatalogIOManager
from resources.dvc import DvcTracker
from resources.tracking import MlflowTracker


def stage_resources(settings, tmp_path) -> dict:
    return {
        "settings": settings,
        "mlflow": MlflowTracker(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "mlruns")),
        "dvc": DvcTracker(repo_root=str(tmp_path), dvc_bin=str(tmp_path / "no-dvc")),
        "io_manager": CatalogIOManager(settings=settings),
    }
