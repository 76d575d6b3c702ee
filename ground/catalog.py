"""The data contract: where each stage's outputs live, named once, in the stage's own declaration.

A stage declares a StageSpec (its folder under the data folder, the files it writes there, the
settings sections it reads, the non-code files it depends on). The spec travels in the asset's
definition metadata, so the IO manager (resources/catalog_io.py) hands every downstream asset a
StageData of its upstream, and dvc.yaml is generated from the same specs (dagster_project/dvc_stages.py).
Partitioned stages add the taxonomy version to the folder: data/<folder>/<version>/.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ground.checkpoints import CheckpointRecord

META_KEY = "safevid/stage_spec"
_PLACEHOLDER = re.compile(r"\{([\w.]+)\}")


class MissingOutput(FileNotFoundError):
    pass


@dataclass(frozen=True)
class StageSpec:
    folder: str  # under the data folder; partitioned stages add /<taxonomy version>
    files: tuple[str, ...]  # what the stage writes there; a trailing "/" marks a folder
    params: tuple[str, ...] = ()  # settings sections it reads ("curation", "roles.judge")
    # non-code files it reads, from the project root; "{version}" is the partition, "{a.b}" the setting a.b
    data_deps: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()  # folders under the data folder it writes beside its own (a frame cache)
    # settings naming outside data it reads (a manifest file, a folder of clips): the run's freshness
    # check lists them (dagster_project/freshness.py); a keyword such as `synthetic` counts as is
    sources: tuple[str, ...] = ()

    def metadata(self) -> dict[str, str]:
        return {META_KEY: json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()})}

    @classmethod
    def from_metadata(cls, metadata) -> "StageSpec":
        raw = metadata.get(META_KEY)
        raw = getattr(raw, "value", raw)  # a Dagster TextMetadataValue or the string itself
        if raw is None:
            raise KeyError(f"no {META_KEY} in the asset's metadata")
        doc = json.loads(raw)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()})

    def names(self) -> set[str]:
        return {f.rstrip("/") for f in self.files}

    def data_files(self, settings, version: str | None) -> list[str]:
        """data_deps with "{version}" and every "{section.key}" filled in from these settings."""
        out = []
        for dep in self.data_deps:
            for name in _PLACEHOLDER.findall(dep):
                try:
                    value = version if name == "version" else settings.section(name)
                except AttributeError:
                    value = None
                if value is None:
                    raise KeyError(f"data dependency {dep!r} names {name!r}, which is neither the version nor a setting")
                dep = dep.replace(f"{{{name}}}", str(value))
            out.append(dep)
        return out


@dataclass(frozen=True)
class StageData:
    """A stage's outputs for one partition (or none): paths, tables and its checkpoint record."""

    asset: str
    spec: StageSpec
    folder: Path
    version: str | None = None
    shared_root: Path | None = field(default=None, compare=False)

    def path(self, name: str) -> Path:
        if name.rstrip("/") not in self.spec.names():
            raise KeyError(f"{self.asset} declares no output {name!r}; it writes {sorted(self.spec.names())}")
        return self.folder / name.rstrip("/")

    def table(self, name: str) -> pd.DataFrame:
        path = self.path(name)
        if not path.exists():
            where = f" for partition {self.version}" if self.version else ""
            raise MissingOutput(f"{path} is missing: materialize '{self.asset}'{where} first")
        return pd.read_parquet(path)

    def checkpoint(self) -> CheckpointRecord:
        return CheckpointRecord.load(self.folder)


def stage_folder(data_root: Path, spec: StageSpec, version: str | None) -> Path:
    folder = Path(data_root) / spec.folder
    return folder / version if version else folder
