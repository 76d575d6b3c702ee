"""The project's Dagster instance: $DAGSTER_HOME, default .dagster/ (the one `dagster dev` reads)."""
import os

from ground.settings import PROJECT_ROOT


def project_instance():
    import dagster as dg

    home = os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster"))
    os.makedirs(home, exist_ok=True)
    yaml_path = os.path.join(home, "dagster.yaml")
    if not os.path.exists(yaml_path):
        with open(yaml_path, "w") as fh:
            fh.write("telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.get()


def taxonomy_versions(folder=None) -> list[str]:
    from assets.taxonomy import TAXONOMY_DIR

    return sorted(p.stem for p in (folder or TAXONOMY_DIR).glob("*.yaml"))
