"""The code location: wiring only. Each stage lives in assets/<stage>.py."""
import dagster as dg

from assets import (
    benchmark,
    comparison,
    curation,
    descriptions,
    dpo,
    manifest,
    preferences,
    queries,
    scores,
    target_model,
    taxonomy,
)
from dagster_project.sensors import build_automation
from dagster_project.settings import PipelineSettings
from resources.dvc import DvcTracker
from resources.tracking import MlflowTracker

STAGES = [manifest, taxonomy, curation, descriptions, queries, target_model, preferences, dpo, benchmark, scores, comparison]

ASSETS = dg.load_assets_from_modules(STAGES)

defs = dg.Definitions(
    assets=ASSETS,
    **build_automation(ASSETS),
    resources={"settings": PipelineSettings(), "mlflow": MlflowTracker(), "dvc": DvcTracker()},
)
