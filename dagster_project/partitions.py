"""Partitions: the taxonomy version (a file name under taxonomies/) keys every taxonomy-dependent asset."""
from pathlib import Path

import dagster as dg

from dagster_project.settings import PROJECT_ROOT

TAXONOMY_DIR = PROJECT_ROOT / "taxonomies"

taxonomy_partitions = dg.DynamicPartitionsDefinition(name="taxonomy_version")


def taxonomy_versions(folder: Path = TAXONOMY_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))
