"""The asset graph: each stage in assets/<stage>.py, found here by itself (definitions.py wires it
to resources and automation; dvc_stages.py and freshness.py read it)."""
import importlib
import pkgutil

import dagster as dg

import assets
from assets.scores import build_benchmark_scores

STAGE_MODULES = [
    importlib.import_module(f"assets.{m.name}") for m in pkgutil.iter_modules(assets.__path__) if not m.name.startswith("_")
]
_stages = dg.load_assets_from_modules(STAGE_MODULES)
# benchmark_scores answers with every checkpoint the graph makes (assets of kind "checkpoint").
CHECKPOINTS = [a.key.to_user_string() for a in _stages if "checkpoint" in (a.specs_by_key[a.key].kinds or ())]
ASSETS = [*_stages, build_benchmark_scores(CHECKPOINTS)]
