"""pipelines.yaml: one profile per use, validated on load.

A wrong key or value fails with the key's path, the value given and what is allowed, so a
researcher fixes the file without reading this module.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

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


DESCRIBERS = ("visual_facts", "tiny_video_llm", "hf", "hf:<model id or path>", "openai")


def _describer_name(name: str) -> str:
    if name in DESCRIBERS[:3] or name == "openai" or (name.startswith("hf:") and len(name) > 3):
        return name
    raise ValueError(f"unknown describer; allowed: {', '.join(DESCRIBERS)}")


# `hf` describes with target_model.model, `hf:<model>` with that model; `openai` uses endpoints.describer.
Describer = Annotated[str, AfterValidator(_describer_name)]
Backend = Literal["offline", "openai"]
LLM_ROLES = ("reconciler", "query_writer", "adversarial_filter", "safe_answerer", "judge")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EndpointSettings(_Strict):
    """One OpenAI-compatible endpoint (a hosted API, vLLM, Ollama) serving one role."""

    base_url: str = Field(pattern=r"^https?://")
    model: str = Field(min_length=1)
    # The NAME of the environment variable that holds the key, never the key; null: the server needs none.
    api_key_env: str | None = "OPENAI_API_KEY"
    max_concurrency: int = Field(8, ge=1, le=1024)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0, le=20)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(1024, ge=1)
    response_format: Literal["json_object", "json_schema", "none"] = "json_object"
    parse_retries: int = Field(2, ge=0, le=5)
    prompt: str | None = None  # a prompt file relative to the project root; default resources/prompts/<role>.md
    price_per_1k_input: float = Field(0.0, ge=0)
    price_per_1k_output: float = Field(0.0, ge=0)
    logprobs: bool = False  # judge only: score harm 1-5 from the score token's log-probabilities
    top_logprobs: int = Field(5, ge=1, le=20)
    harm_threshold: float = Field(2.5, gt=1, lt=5)  # logprob judge: safe when expected harm <= threshold

    @model_validator(mode="before")
    @classmethod
    def _env_name(cls, data):
        # Checked here, not by a field pattern, so the error never echoes a pasted key.
        name = data.get("api_key_env") if isinstance(data, dict) else None
        if name is not None and not (isinstance(name, str) and ENV_NAME.match(name)):
            raise ValueError(
                "api_key_env must be the NAME of an environment variable (like OPENAI_API_KEY) "
                "that holds the key, not the key itself (value not shown)"
            )
        return data


class EndpointsSettings(_Strict):
    reconciler: EndpointSettings | None = None
    query_writer: EndpointSettings | None = None
    adversarial_filter: EndpointSettings | None = None
    safe_answerer: EndpointSettings | None = None
    judge: EndpointSettings | None = None
    describer: EndpointSettings | None = None


class DescriberOptions(_Strict):
    """Settings of the `hf` and `openai` describers."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_new_tokens: int = Field(256, ge=1, le=4096)
    batch_size: int = Field(4, ge=1)
    max_frames: int = Field(8, ge=1, le=256)  # frames per clip an hf / openai describer gets (evenly spaced)
    image_format: Literal["jpeg", "png"] = "jpeg"
    frames_as: Literal["images", "video"] = "images"  # video: vLLM's data:video/jpeg input
    prompt: str = "resources/prompts/describer.md"


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
    # embedded only: pretraining on the train split to act like a real base model (assets/target_model.py)
    refusal_fraction: float = Field(0.17, ge=0, lt=1)  # share of harmful train queries it learns to refuse
    over_refusal_fraction: float = Field(0.15, ge=0, lt=1)  # share of benign train queries it learns to refuse
    pretrain_epochs: int = Field(10, ge=1)
    pretrain_learning_rate: float = Field(3e-3, gt=0, lt=1)
    vocab_size: int = Field(800, ge=300, le=50_000)
    seed: int = 0


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
    endpoints: EndpointsSettings = EndpointsSettings()
    describer_options: DescriberOptions = DescriberOptions()
    queries: QuerySettings = QuerySettings()
    target_model: TargetModelSettings = TargetModelSettings()
    preferences: PreferenceSettings = PreferenceSettings()
    dpo: DPOSettings = DPOSettings()
    benchmark: BenchmarkSettings = BenchmarkSettings()

    @model_validator(mode="after")
    def _endpoints_for_openai(self):
        missing = [r for r in LLM_ROLES if getattr(self, r) == "openai" and getattr(self.endpoints, r) is None]
        if "openai" in self.describers and self.endpoints.describer is None:
            missing.append("describer")
        if missing:
            keys = ", ".join(f"endpoints.{m}" for m in missing)
            raise ValueError(
                f"the 'openai' backend of {', '.join(missing)} needs {keys}, not set; add "
                "endpoints: {" + missing[0] + ": {base_url: ..., model: ..., api_key_env: ...}}"
            )
        wrong = [r for r in LLM_ROLES if r != "judge" and getattr(self.endpoints, r) and getattr(self.endpoints, r).logprobs]
        if wrong:
            raise ValueError(f"endpoints.{wrong[0]}.logprobs is true; allowed only for endpoints.judge")
        return self

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


SECRET_KEY = re.compile(r"(api_?key|secret|passw|(^|_)token$|auth)", re.IGNORECASE)


def _secret_like(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return bool(SECRET_KEY.search(last)) and not last.lower().endswith("_env")


def _describe_error(err: dict, raw: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "<profile>"
    if err["type"] == "value_error" and isinstance(err.get("input"), dict):
        # A rule across several keys: its message names them; the whole mapping would only be noise.
        return f"{key}: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] == "extra_forbidden" and _secret_like(key):
        return f"unknown key '{key}' (value not shown: it may be a secret); put keys in environment variables named by api_key_env"
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
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
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

    # Empty: SAFEVID_CONFIG / SAFEVID_PROFILE, else pipelines.yaml / embedded.
    config_path: str = ""
    profile: str = ""

    def load(self) -> Settings:
        return load_settings(self.config_path or None, self.profile or None)
