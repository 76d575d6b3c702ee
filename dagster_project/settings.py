"""pipelines.yaml: one profile per use, validated on load.

A wrong key or value fails with the key's path, the value given and what is allowed, so a
researcher fixes the file without reading this module.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "pipelines.yaml"
DEFAULT_PROFILE = "embedded"


class SettingsError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManifestSettings(_Strict):
    source: str = "synthetic"
    synthetic_clips: int = Field(60, ge=1, le=10_000)
    seed: int = 0


class CurationSettings(_Strict):
    min_duration_s: float = Field(1.0, ge=0)
    max_duration_s: float = Field(60.0, gt=0)
    min_width: int = Field(32, ge=1)
    min_height: int = Field(32, ge=1)
    max_width: int = Field(4096, ge=1)
    max_height: int = Field(4096, ge=1)
    frames_per_clip: int = Field(8, ge=1, le=256)
    frame_size: int = Field(64, ge=8, le=1024)
    duplicate_frame_fraction: float = Field(0.75, gt=0, le=1)
    representatives_per_category: int = Field(2, ge=1)
    scene_categories: str = "assets/scene_categories.yaml"

    @model_validator(mode="after")
    def _ranges(self):
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError(
                f"min_duration_s ({self.min_duration_s}) must be below max_duration_s ({self.max_duration_s})"
            )
        return self


Describer = Literal["visual_facts", "tiny_video_llm", "hf", "openai"]
Backend = Literal["offline", "openai"]


class QuerySettings(_Strict):
    per_subcategory: int = Field(3, ge=1, le=50)
    near_duplicate_threshold: float = Field(0.95, gt=0, le=1)
    heldout_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


class TargetModelSettings(_Strict):
    model: str = "embedded"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_new_tokens: int = Field(24, ge=1, le=4096)
    batch_size: int = Field(16, ge=1)


class PreferenceSettings(_Strict):
    drop_safe_rejected: bool = True


class DPOSettings(_Strict):
    beta: float = Field(0.1, gt=0)
    epochs: float = Field(1, gt=0)
    learning_rate: float = Field(5e-6, gt=0, lt=1)
    batch_size: int = Field(8, ge=1)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    seed: int = 0


class BenchmarkSettings(_Strict):
    external_files: list[str] = []
    category_mapping: dict[str, str] = {}


class Settings(_Strict):
    profile: str = DEFAULT_PROFILE
    data_dir: str = "data"
    manifest: ManifestSettings = ManifestSettings()
    curation: CurationSettings = CurationSettings()
    describers: list[Describer] = Field(default_factory=lambda: ["visual_facts", "tiny_video_llm"], min_length=2)
    reconciler: Backend = "offline"
    query_writer: Backend = "offline"
    adversarial_filter: Backend = "offline"
    safe_answerer: Backend = "offline"
    judge: Backend = "offline"
    queries: QuerySettings = QuerySettings()
    target_model: TargetModelSettings = TargetModelSettings()
    preferences: PreferenceSettings = PreferenceSettings()
    dpo: DPOSettings = DPOSettings()
    benchmark: BenchmarkSettings = BenchmarkSettings()

    def path(self, *parts: str) -> Path:
        """A path under the data folder; relative data_dir is taken from the project root."""
        root = Path(self.data_dir)
        if not root.is_absolute():
            root = PROJECT_ROOT / root
        return root.joinpath(*parts)

    def flat(self) -> dict[str, object]:
        """Dotted key → value, for MLflow params."""
        out: dict[str, object] = {}

        def walk(prefix: str, value):
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.model_dump())
        return out


def _describe_error(err: dict, raw: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "<profile>"
    value: object = raw
    for part in err["loc"]:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            value = err.get("input")
            break
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}' (value {value!r}); allowed keys here: {', '.join(_allowed_keys(err['loc']))}"
    if kind == "literal_error":
        return f"key '{key}' has value {value!r}; allowed: {err['ctx']['expected']}"
    return f"key '{key}' has value {value!r}: {err['msg']}"


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return sorted(model.model_fields)


def parse_settings(raw: dict, profile: str, source: str = "pipelines.yaml") -> Settings:
    if not isinstance(raw, dict):
        raise SettingsError(f"{source}: profile '{profile}' must be a mapping, got {type(raw).__name__}")
    try:
        return Settings(profile=profile, **raw)
    except ValidationError as exc:
        problems = "; ".join(_describe_error(e, raw) for e in exc.errors())
        raise SettingsError(f"{source} profile '{profile}': {problems}") from None


def load_settings(path: str | Path | None = None, profile: str | None = None) -> Settings:
    path = Path(path or os.environ.get("SAFEVID_CONFIG", DEFAULT_CONFIG))
    profile = profile or os.environ.get("SAFEVID_PROFILE", DEFAULT_PROFILE)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or profile not in doc:
        known = sorted(doc) if isinstance(doc, dict) else []
        raise SettingsError(f"{path}: profile '{profile}' not found; profiles: {', '.join(known) or 'none'}")
    return parse_settings(doc[profile], profile, str(path))


import dagster as dg  # noqa: E402  (kept below the pure part so tests of it stay Dagster-free in spirit)


class PipelineSettings(dg.ConfigurableResource):
    """The validated pipelines.yaml profile, as a Dagster resource."""

    config_path: str = str(DEFAULT_CONFIG)
    profile: str = DEFAULT_PROFILE

    def load(self) -> Settings:
        return load_settings(self.config_path, self.profile)
