"""The project's Dagster instance: $DAGSTER_HOME, default .dagster/ (the one `dagster dev` reads)."""
import os

from ground.settings import PROJECT_ROOT

# The project's own `logging.getLogger(__name__)` lines (batch summaries, retries) go into each run's
# log, so the UI's run view and the run CLI's console show them; the four layers' packages.
PYTHON_LOGS = """python_logs:
  managed_python_loggers: [ground, resources, assets, dagster_project]
  python_log_level: INFO
"""


def ensure_instance_yaml(home: str) -> str:
    """dagster.yaml in `home`: written once; a copy without python_logs gets the project's added
    (a section of its own is left as it is)."""
    import yaml

    path = os.path.join(home, "dagster.yaml")
    if not os.path.exists(path):
        with open(path, "w") as fh:
            fh.write("telemetry:\n  enabled: false\nnux:\n  enabled: false\n" + PYTHON_LOGS)  # no first-visit pop-up over the UI
        return path
    with open(path) as fh:
        text = fh.read()
    if "python_logs" not in (yaml.safe_load(text) or {}):
        with open(path, "a") as fh:  # appended, so a person's comments stay
            fh.write(("" if text.endswith("\n") or not text else "\n") + PYTHON_LOGS)
    return path


def project_instance():
    import dagster as dg

    home = os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster"))
    os.makedirs(home, exist_ok=True)
    ensure_instance_yaml(home)
    return dg.DagsterInstance.get()


def taxonomy_versions(folder=None) -> list[str]:
    from assets.taxonomy import TAXONOMY_DIR

    return sorted(p.stem for p in (folder or TAXONOMY_DIR).glob("*.yaml"))
