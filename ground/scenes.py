"""The scene categories clips are put in (assets/scene_categories.yaml, versioned)."""
from __future__ import annotations

from pathlib import Path

import yaml

from ground.settings import PROJECT_ROOT

DEFAULT_FILE = PROJECT_ROOT / "assets" / "scene_categories.yaml"


def scene_categories(path: Path | None = None) -> tuple[str, dict[str, list[str]]]:
    """(version, category → keywords) of a scene categories file."""
    doc = yaml.safe_load(Path(path or DEFAULT_FILE).read_text())
    return doc["version"], {k: list(v) for k, v in doc["categories"].items()}


OBJECTS_FILE = PROJECT_ROOT / "assets" / "visual_objects.yaml"


def visual_objects(path: Path | None = None) -> tuple[str, dict[str, dict]]:
    """(version, object name → phrase, visual_label, draw, hazard) of the embedded corpus's objects."""
    doc = yaml.safe_load(Path(path or OBJECTS_FILE).read_text())
    return doc["version"], {k: dict(v) for k, v in doc["objects"].items()}
