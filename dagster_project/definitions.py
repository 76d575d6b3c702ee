"""The code location: wiring only. The assets come from dagster_project/graph.py."""
import dagster as dg

from dagster_project.graph import ASSETS, CHECKPOINTS, STAGE_MODULES  # noqa: F401  (the names tests and tools import)
from dagster_project.sensors import build_automation
from dagster_project.settings import settings_resource
from resources.catalog_io import catalog_io_manager
from resources.dvc import DvcTracker
from resources.k8s import executor_from_env
from resources.tracking import MlflowTracker

RESOURCES = {
    "settings": settings_resource,
    "mlflow": MlflowTracker(),
    "dvc": DvcTracker(),
    "io_manager": catalog_io_manager,
}

# In the cluster (SAFEVID_EXECUTOR=k8s) every step runs in a pod of its own, so its GPU tag counts.
defs = dg.Definitions(assets=ASSETS, **build_automation(ASSETS), resources=RESOURCES, executor=executor_from_env())
