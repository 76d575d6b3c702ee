"""The code location: wiring only. Each stage lives in assets/<stage>.py."""
import dagster as dg

from assets import curation, manifest, taxonomy
from dagster_project.settings import PipelineSettings
from resources.tracking import MlflowTracker

STAGES = [manifest, taxonomy, curation]

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(STAGES),
    resources={"settings": PipelineSettings(), "mlflow": MlflowTracker()},
)
