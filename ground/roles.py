"""The LLM roles' contracts: what each role takes and returns, whatever backend serves it.

ROLES is the one list of roles; settings (`roles.<role>`), the backend registry
(resources/roles.py) and each backend follow it. Every role takes a batch, so a remote backend
can run it with bounded concurrency and the offline backend stays a plain loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ground.taxonomy import Subcategory


@dataclass(frozen=True)
class QueryRequest:
    """Write n queries about one clip for one subcategory, in `language` (a code of
    ground.languages.LANGUAGES). sub.intents holds only the intents of the clip's split's pool; pool
    is "train" or "eval" (validation and benchmark), so a template-based writer can keep its
    templates apart too."""

    clip_id: str
    description: str
    scene_category: str
    sub: Subcategory
    n: int
    pool: str = "train"
    language: str = "en"


@dataclass(frozen=True)
class ReasoningRequest:
    """Write the safety reasoning that leads to `answer` (VideoSafety-R1's <think> part): what the
    clip shows and whether it is dangerous (visual_label), whether the query asks for harm
    (textual_label), and so what the answer does. sub is the subcategory as the item sees it
    (`Subcategory.for_item`: harmful when the item must be refused)."""

    query: str
    description: str
    sub: Subcategory
    answer: str
    visual_label: int
    textual_label: int


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
    def reconcile(self, items: list[dict[str, str]]) -> list[tuple[str, list[str], int | None]]:
        """describer name → description, per clip → (reconciled description, describers that agree,
        visual label: 1 when what the clip shows is dangerous, 0 when not, None when undecided)."""


class QueryWriter(Protocol):
    def write(self, requests: list[QueryRequest]) -> list[list[str]]:
        """Candidate queries per request, grounded in its description and subcategory."""


class AdversarialFilter(Protocol):
    def strength(self, items: list[tuple[str, Subcategory]]) -> list[int | None]:
        """SafeVid's re-evaluation pass: (query, harmful subcategory) → its adversarial strength, 1
        (no real request: an opinion question, a mere mention) to 10 (a direct, detailed request
        for the harm); None for an item that failed (listed in the role's failures)."""


class SafeAnswerer(Protocol):
    def answer(self, items: list[tuple[str, str, Subcategory]]) -> list[str]:
        """(query, description, subcategory as the item sees it: `Subcategory.for_item`) → a safe,
        helpful answer under the subcategory's guidance."""

    def reason(self, requests: list[ReasoningRequest]) -> list[str]:
        """The reasoning behind each request's answer, grounded in the description and the
        subcategory's guidance; "" for an item that failed (listed in the role's failures)."""


class Judge(Protocol):
    name: str

    def judge(self, items: list[tuple[str, str, Subcategory, str]]) -> list[Verdict]:
        """(query, answer, the item's subcategory: kind (harmful = must be refused, see
        `Subcategory.for_item`), definition, guidance; the clip's reference description) → verdict."""


def failure_problems(role: str, failed: int, total: int, limit: float) -> list[str]:
    """A check's problem when more than `limit` of a role's items failed for good; one failed item
    among many is recorded and dropped, not a stopped run."""
    if not failed:
        return []
    rate = failed / total if total else 1.0
    if rate <= limit:
        return []
    return [
        f"role {role}: {failed} of {total} items failed for good ({rate:.1%}), above roles.{role}.max_failure_rate "
        f"({limit:.1%}); the `failure` column of the stage's tables says why (role, reason, attempts). Fix the endpoint "
        "and materialize again (only the failed items are sent), or raise the setting"
    ]


ROLE_CONTRACTS: dict[str, type] = {
    "reconciler": Reconciler,
    "query_writer": QueryWriter,
    "adversarial_filter": AdversarialFilter,
    "safe_answerer": SafeAnswerer,
    "judge": Judge,
    # The same contract, a second opinion on the benchmark's answers (assets/judge_agreement.py).
    "second_judge": Judge,
}
ROLES = tuple(ROLE_CONTRACTS)
