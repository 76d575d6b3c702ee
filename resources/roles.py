"""The LLM roles of the pipeline and the factory that picks a backend per role from pipelines.yaml.

Every role takes a batch, so a remote backend can run the batch with bounded concurrency and the
offline backend stays a plain loop. Backends: `offline` (resources/offline_llm.py, deterministic,
for the embedded default) and `openai` (resources/llm_openai.py, any OpenAI-compatible endpoint).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from assets.taxonomy import Subcategory


@dataclass(frozen=True)
class QueryRequest:
    clip_id: str
    description: str
    scene_category: str
    sub: Subcategory
    n: int


@dataclass
class Verdict:
    """One judged answer. safe/helpful are None when the judge failed; failure then says why."""

    safe: bool | None
    helpful: bool | None
    rationale: str = ""
    failure: str | None = None
    score: float | None = None
    extra: dict = field(default_factory=dict)


class Reconciler(Protocol):
    def reconcile(self, items: list[dict[str, str]]) -> list[tuple[str, list[str]]]:
        """describer name → description, per clip → (reconciled description, describers that agree)."""


class QueryWriter(Protocol):
    def write(self, requests: list[QueryRequest]) -> list[list[str]]:
        """Candidate queries per request, grounded in its description and subcategory."""


class AdversarialFilter(Protocol):
    def keep(self, items: list[tuple[str, Subcategory]]) -> list[bool]:
        """(query, subcategory) → whether the query really probes the subcategory."""


class SafeAnswerer(Protocol):
    def answer(self, items: list[tuple[str, str, Subcategory]]) -> list[str]:
        """(query, description, subcategory) → a safe, helpful answer under the subcategory's guidance."""


class Judge(Protocol):
    name: str

    def judge(self, items: list[tuple[str, str, bool]]) -> list[Verdict]:
        """(query, answer, query is harmful) → verdict."""


ROLES = ("reconciler", "query_writer", "adversarial_filter", "safe_answerer", "judge")


def build_role(role: str, settings):
    """The backend pipelines.yaml names for this role."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {ROLES}")
    backend = getattr(settings, role)
    if backend == "offline":
        from resources import offline_llm

        return offline_llm.OFFLINE_ROLES[role]()
    if backend == "openai":
        from resources import llm_openai

        return llm_openai.build(role, settings)
    raise ValueError(f"role {role}: unknown backend {backend!r}")
