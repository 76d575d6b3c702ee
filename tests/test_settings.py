"""Settings: every key documented, the reference generated from that help text, and bad values
refused with the key, the value and what is allowed (a pasted secret never echoed).

Settings are built in memory; only the first test reads a file, the repo's own pipelines.yaml.
"""
import traceback
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, ValidationError

from ground.roles import ROLES
from ground.settings import (
    DEFAULT_CONFIG,
    PROJECT_ROOT,
    ROLE_HELP,
    Settings,
    SettingsError,
    load_settings,
    parse_settings,
)
from ground.settings_doc import _models_of, describe, settings_reference

DOC = PROJECT_ROOT / "docs" / "settings.md"
ENDPOINT = {"base_url": "http://localhost:8000/v1", "model": "some-model"}
OPENAI = {"backend": "openai", **ENDPOINT}


def refused(raw: dict) -> str:
    with pytest.raises(SettingsError) as err:
        parse_settings(raw, "embedded")
    return str(err.value)


# --- the repo's profiles --------------------------------------------------------------------------

def test_load_settings_parses_both_profiles_of_pipelines_yaml():
    embedded = load_settings(DEFAULT_CONFIG, "embedded")
    paper = load_settings(DEFAULT_CONFIG, "paper")
    assert (embedded.profile, paper.profile) == ("embedded", "paper")
    assert all(embedded.backend(r) == "offline" for r in ROLES)
    assert all(paper.backend(r) == "openai" for r in ROLES)
    assert paper.curation.frames_per_clip == 16 and paper.dpo.beta == 0.1
    with pytest.raises(SettingsError, match="profile 'nope' not found; profiles: embedded, paper"):
        load_settings(DEFAULT_CONFIG, "nope")


# --- help text ------------------------------------------------------------------------------------

def undocumented(model: type[BaseModel], prefix: str = "", seen=None) -> list[str]:
    """Dotted keys, below `model`, of every field without a description; union members and
    optional sections included."""
    seen = set() if seen is None else seen
    if model in seen:
        return []
    seen.add(model)
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if not (field.description or "").strip():
            out.append(f"{key} ({model.__name__})")
        for nested in _models_of(field.annotation):
            out += undocumented(nested, f"{key}[{nested.__name__}]", seen)
    return out


def settings_classes(model: type[BaseModel] = Settings, seen=None) -> set[type[BaseModel]]:
    seen = set() if seen is None else seen
    seen.add(model)
    for field in model.model_fields.values():
        for nested in _models_of(field.annotation):
            if nested not in seen:
                settings_classes(nested, seen)
    return seen


def test_every_field_of_every_settings_model_has_a_description():
    assert undocumented(Settings) == []


def test_the_walk_finds_a_field_without_description():
    class Inner(BaseModel):
        documented: int = Field(1, description="has help")
        bare: int = 2

    class Outer(BaseModel):
        inner: Inner | None = Field(None, description="has help")
        plain: str = "x"

    assert undocumented(Outer) == ["inner[Inner].bare (Inner)", "plain (Outer)"]


def test_every_settings_class_has_a_docstring():
    classes = settings_classes()
    assert {"RolesSettings", "OfflineBackend", "OpenAIBackend", "DPOSettings"} <= {c.__name__ for c in classes}
    assert [c.__name__ for c in classes if not (c.__dict__.get("__doc__") or "").strip()] == []


def test_every_role_has_help_and_a_settings_field():
    from ground.settings import RolesSettings

    assert set(ROLE_HELP) == set(ROLES) == set(RolesSettings.model_fields)


# --- the generated reference ----------------------------------------------------------------------

def test_docs_settings_md_is_the_generated_reference():
    assert DOC.read_text(encoding="utf-8") == settings_reference(), (
        "docs/settings.md is out of date: run `python -m ground.settings_doc > docs/settings.md`"
    )


def test_reference_lists_every_key_once_per_backend_class():
    ref = settings_reference()
    settings = parse_settings({"roles": {r: OPENAI for r in ROLES}, "describer_options": {"endpoint": ENDPOINT}}, "embedded")
    for key in settings.flat():
        if key.startswith("roles."):
            key = "roles.<role>." + key.split(".", 2)[2]
        assert f"| `{key}` |" in ref, key
    assert ref.count("| `roles.<role>.base_url` |") == 1
    assert ref.count("| `roles.<role>.backend` |") == 2  # once per backend class: offline, openai
    assert "## `roles.<role>` with `backend: openai`" in ref and "## `dpo`" in ref


def test_reference_shows_type_default_and_description():
    row = next(line for line in settings_reference().splitlines() if line.startswith("| `curation.frames_per_clip` |"))
    assert "int (>= 1, <= 256)" in row and "`8`" in row and "the paper used 16" in row


def test_describe_sections_covers_their_flat_keys():
    sections = ("dpo", "roles.judge", "curation")
    described = dict(describe(sections))
    assert all(text.strip() for text in described.values())
    assert {"dpo", "dpo.beta", "roles.judge", "roles.judge.backend", "curation.frames_per_clip"} <= set(described)
    assert "offline" in described["roles.judge.backend"] and "openai" in described["roles.judge.backend"]
    settings = parse_settings({"roles": {"judge": OPENAI}}, "embedded")
    assert set(settings.flat(*sections)) <= set(described)


def test_describe_a_single_key_and_an_unknown_one():
    from ground.settings import CurationSettings

    assert describe(["curation.frame_size"]) == [("curation.frame_size", CurationSettings.model_fields["frame_size"].description)]
    with pytest.raises(KeyError, match="curation.frame_sise"):
        describe(["curation.frame_sise"])


# --- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"curation": {"max_duraton_s": 5}}, ["curation.max_duraton_s", "5", "max_duration_s", "min_duration_s"]),
        ({"target_model": {"device": "tpu"}}, ["target_model.device", "'tpu'", "'auto'", "'cpu'", "'cuda'"]),
        ({"dpo": {"loss_type": "kto"}}, ["dpo.loss_type", "'kto'", "'sigmoid'", "'ipo'"]),
        ({"curation": {"frames_per_clip": 0}}, ["curation.frames_per_clip", "value 0", "greater than or equal to 1"]),
        ({"describers": ["visual_facts", "gpt4v"]}, ["describers.1", "'gpt4v'", "visual_facts", "hf:<model id or path>", "openai"]),
        ({"roles": {"juge": {"backend": "offline"}}}, ["roles.juge", "judge", "query_writer"]),
        ({"curation": {"min_duration_s": 9, "max_duration_s": 3}}, ["min_duration_s (9.0)", "max_duration_s (3.0)"]),
    ],
)
def test_bad_value_names_key_value_and_allowed(raw, expected):
    msg = refused(raw)
    assert "profile 'embedded'" in msg
    for part in expected:
        assert part in msg, (part, msg)


@pytest.mark.parametrize("backend", [OPENAI, {"backend": "offline"}])
def test_api_key_pasted_into_a_role_is_refused_without_echoing_it(backend):
    secret = "sk-live-DoNotEcho0123456789"
    with pytest.raises(SettingsError) as err:
        parse_settings({"roles": {"judge": {**backend, "api_key": secret}}}, "embedded")
    shown = "".join(traceback.format_exception(err.value))
    assert "roles.judge" in str(err.value) and "api_key" in str(err.value) and "api_key_env" in str(err.value)
    assert secret not in shown


def test_key_pasted_as_api_key_env_is_refused_without_echoing_it():
    secret = "sk-live-DoNotEcho0123456789"
    with pytest.raises(SettingsError) as err:
        parse_settings({"roles": {"judge": {**OPENAI, "api_key_env": secret}}}, "embedded")
    assert "roles.judge" in str(err.value) and "NAME of an environment variable" in str(err.value)
    assert secret not in "".join(traceback.format_exception(err.value))


@pytest.mark.parametrize("role", ROLES)
def test_unknown_backend_names_the_role_and_allowed_backends(role):
    for block in ({"backend": "anthropic", "model": "claude"}, {"model": "no backend"}):
        msg = refused({"roles": {role: block}})
        assert f"roles.{role}" in msg and "offline" in msg and "openai" in msg, msg


def test_openai_backend_needs_its_endpoint():
    msg = refused({"roles": {"judge": {"backend": "openai"}}})
    assert "roles.judge" in msg and "base_url" in msg and "model" in msg


@pytest.mark.parametrize("key", ["beta", "loss_type", "num_train_epochs", "learning_rate", "per_device_train_batch_size", "seed"])
def test_trl_args_cannot_set_what_dpo_models_itself(key):
    msg = refused({"dpo": {"trl_args": {key: 1}}})
    assert "dpo" in msg and key in msg and "set those keys instead" in msg


def test_trl_args_passes_other_dpo_config_options():
    settings = Settings(dpo={"trl_args": {"gradient_accumulation_steps": 4}})
    assert settings.dpo.trl_args == {"gradient_accumulation_steps": 4}


def test_cross_key_rules():
    assert "describer_options.endpoint" in refused({"describers": ["visual_facts", "openai"]})
    assert "roles.reconciler.logprobs" in refused({"roles": {"reconciler": {**OPENAI, "logprobs": True}}})
    assert parse_settings({"roles": {"judge": {**OPENAI, "logprobs": True}}}, "embedded").roles.judge.logprobs


# --- the object stages get ------------------------------------------------------------------------

def test_settings_in_memory_paths_and_params(tmp_path: Path):
    settings = Settings(data_dir=str(tmp_path / "data"), roles={"judge": OPENAI})
    assert settings.path("curated", "curated.parquet") == tmp_path / "data" / "curated" / "curated.parquet"
    assert Settings().path("x") == PROJECT_ROOT / "data" / "x"
    flat = settings.flat("roles.judge", "dpo")
    assert flat["roles.judge.model"] == "some-model" and flat["dpo.beta"] == 0.1
    assert settings.section("curation.frame_size") == 64
    with pytest.raises(ValidationError, match="frozen"):
        settings.dpo.beta = 0.5  # frozen: a stage cannot change the run's settings
