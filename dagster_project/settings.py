"""The settings resource: the validated pipelines.yaml profile, built once per run and handed to
every asset as a typed ground.settings.Settings (tests pass a Settings object instead)."""
from __future__ import annotations

import dagster as dg

from ground.settings import Settings, load_settings, parse_settings
from ground.settings_doc import settings_reference


@dg.resource(
    config_schema={
        "config_path": dg.Field(str, default_value="", description="Settings file; empty: $SAFEVID_CONFIG, else pipelines.yaml"),
        "profile": dg.Field(str, default_value="", description="Profile in it; empty: $SAFEVID_PROFILE, else embedded"),
        "overrides": dg.Field(
            dg.Permissive(), default_value={}, description="Keys merged over the profile for this run (same shape as pipelines.yaml)"
        ),
    },
    description="The pipeline's settings (pipelines.yaml, validated).\n\n" + settings_reference(),
)
def settings_resource(init_context) -> Settings:
    cfg = init_context.resource_config
    settings = load_settings(cfg["config_path"] or None, cfg["profile"] or None)
    if cfg["overrides"]:
        raw = _merge(settings.model_dump(exclude={"profile"}), cfg["overrides"])
        settings = parse_settings(raw, settings.profile, "run config overrides")
    return settings


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
