"""The code location: wiring only. Each stage lives in assets/<stage>.py and is found here by itself."""
import importlib
import pkgutil

import dagster as dg

import assets
from assets.scores import build_benchmark_scores
from dagster_project.sensors import build_automation
from dagster_project.settings import settings_resource
from resources.catalog_io import catalog_io_manager
from resources.dvc import DvcTracker
from resources.tracking import MlflowTracker

STAGE_MODULES = [
    importlib.import_module(f"assets.{m.name}") for m in pkgutil.iter_modules(assets.__path__) if not m.name.startswith("_")
]
_stages = dg.load_assets_from_modules(STAGE_MODULES)
# benchmark_scores answers with every checkpoint the graph makes (assets of kind "checkpoint").
CHECKPOINTS = [a.key.to_user_string() for a in _stages if "checkpoint" in (a.specs_by_key[a.key].kinds or ())]
ASSETS = [*_stages, build_benchmark_scores(CHECKPOINTS)]

RESOURCES = {
    "settings": settings_resource,
    "mlflow": MlflowTracker(),
    "dvc": DvcTracker(),
    "io_manager": catalog_io_manager,
}

defs = dg.Definitions(assets=ASSETS, **build_automation(ASSETS), resources=RESOURCES)
