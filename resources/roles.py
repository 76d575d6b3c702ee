"""The LLM roles' factory: the backend pipelines.yaml names for a role (`roles.<role>.backend`).

Backends register by name below, as module paths: a backend module exposes
`build(role, backend_settings, settings)` and imports nothing from here, so adding one never
makes an import cycle. Its settings class is one member of ground.settings.RoleBackend.
"""
from __future__ import annotations

import importlib

from ground.roles import ROLES

BACKENDS = {
    "offline": "resources.offline_llm",
    "openai": "resources.llm_openai",
}


def build_role(role: str, settings):
    """The backend of `role` that the settings name, built with that backend's settings block."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {ROLES}")
    backend = getattr(settings.roles, role)
    if backend.backend not in BACKENDS:
        raise ValueError(f"role {role}: no backend registered as {backend.backend!r}; registered: {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend.backend]).build(role, backend, settings)


def failure_records(role, n: int) -> list[str | None]:
    """Per item of the role's last batch: its failure record (JSON: role, reason, attempts) or None.
    Offline backends never fail, and have no `failures`."""
    out: list[str | None] = [None] * n
    for f in getattr(role, "failures", None) or []:
        out[f.index] = f.record()
    return out


def max_failure_rate(settings, role: str) -> float:
    """roles.<role>.max_failure_rate, 0 for a backend without it (the offline one never fails)."""
    return float(getattr(getattr(settings.roles, role), "max_failure_rate", 0.0))


def too_many_failures(settings, role: str, failed: int, total: int) -> list[str]:
    """ground.roles.failure_problems against the role's own roles.<role>.max_failure_rate."""
    from ground.roles import failure_problems

    return failure_problems(role, failed, total, max_failure_rate(settings, role))
