"""The `openai` backend of every LLM role: any OpenAI-compatible endpoint (a hosted API, vLLM, Ollama).

Each role is set in pipelines.yaml as roles.<role> with backend: openai and the endpoint's fields
(base URL, model, the NAME of the environment variable holding the key, concurrency, retries,
temperature, prices, prompt file). resources/roles.py calls `build` for it.

A role fills its prompt (resources/llm_prompts.py), hands the batch to its EndpointClient
(resources/llm_client.py: cache, concurrency bound, retries, parse retries, redaction, usage) and
turns each failed item into the role's "nothing" value, listing it in `failures`. The role methods
are synchronous (Dagster assets call them so).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from ground.languages import LANGUAGES
from ground.roles import QueryRequest, ReasoningRequest, Verdict
from ground.settings import EndpointSettings
from ground.taxonomy import Subcategory
from resources.llm_cache import LLMCache
from resources.llm_client import EndpointClient, Failure, Job, ParseError, Usage
from resources.llm_prompts import (
    PROMPTS,
    AnswerReply,
    Prompt,
    QueriesReply,
    ReasoningReply,
    ReconcileReply,
    ScoreReply,
    StrengthReply,
    VerdictReply,
    json_schema,
    parse_json,
    reconcile_schema,
    score_from_logprobs,
)


BARE_SCORE = re.compile(r"\s*([1-5])(?![0-9.])")


class _OpenAIRole:
    role: str = ""
    prompt_file: str = ""

    def __init__(self, endpoint: EndpointSettings, cache_dir: str | Path | None = None):
        self.endpoint = endpoint
        self.prompt = Prompt.load(endpoint.prompt or PROMPTS / self.prompt_file)
        self.client = EndpointClient(self.role, endpoint, LLMCache(cache_dir) if cache_dir is not None else None)
        self.failures: list[Failure] = []  # of the last batch

    @property
    def usage(self) -> Usage:
        return self.client.usage

    def _run(self, jobs: list[Job], on_failure: Callable[[Failure], Any]) -> list:
        results = self.client.run(jobs)
        self.failures = [r for r in results if isinstance(r, Failure)]
        return [on_failure(r) if isinstance(r, Failure) else r for r in results]


def _sub_fields(sub: Subcategory) -> dict:
    """The subcategory as prompt placeholders; every role gets all of them, so a prompt may use any."""
    return {
        "principle": sub.principle,
        "category": sub.category,
        "subcategory": sub.subcategory,
        "kind": sub.kind,
        "definition": sub.definition,
        "guidance": sub.safe_answer_guidance,
        "intents": "; ".join(sub.intents),
    }


def _short(text: str, n: int = 48) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


class OpenAIReconciler(_OpenAIRole):
    role, prompt_file = "reconciler", "reconciler.md"

    def reconcile(self, items: list[dict[str, str]]) -> list[tuple[str, list[str], int | None]]:
        """Failed items come back as ("", [], None) and are listed in self.failures."""
        jobs = []
        for i, descriptions in enumerate(items):
            names = list(descriptions)

            def parse(content, _lp, names=names):
                reply = parse_json(content, ReconcileReply)
                unknown = [n for n in reply.agreeing if n not in names]
                if unknown:
                    raise ParseError(f"agreeing names unknown describers {unknown}; allowed: {names}")
                if not reply.agreeing:
                    raise ParseError(f"agreeing must name at least one of {names}")
                return reply.description.strip(), list(dict.fromkeys(reply.agreeing)), reply.visual_label

            text = "\n\n".join(f"[{n}]\n{descriptions[n].strip()}" for n in names)
            jobs.append(Job(f"#{i}", self.prompt.messages(names=", ".join(names), descriptions=text), parse, reconcile_schema(names)))
        return self._run(jobs, lambda f: ("", [], None))


class OpenAIQueryWriter(_OpenAIRole):
    role, prompt_file = "query_writer", "query_writer.md"

    def write(self, requests: list[QueryRequest]) -> list[list[str]]:
        """Failed requests come back as [] and are listed in self.failures."""
        jobs = []
        for r in requests:

            def parse(content, _lp, n=r.n):
                queries = [" ".join(q.split()) for q in parse_json(content, QueriesReply).queries]
                queries = list(dict.fromkeys(q for q in queries if q))
                if not queries:
                    raise ParseError("queries holds no non-empty question")
                return queries[:n]

            messages = self.prompt.messages(
                description=r.description, scene_category=r.scene_category, n=r.n,
                language=LANGUAGES.get(r.language, r.language), **_sub_fields(r.sub)
            )
            jobs.append(Job(f"{r.clip_id}/{r.sub.subcategory}", messages, parse, json_schema(QueriesReply)))
        return self._run(jobs, lambda f: [])


class OpenAIAdversarialFilter(_OpenAIRole):
    role, prompt_file = "adversarial_filter", "adversarial_filter.md"

    def strength(self, items) -> list[int | None]:
        """Each harmful query's adversarial strength, 1-10; a failed item is None (and is listed in self.failures)."""
        jobs = [
            Job(
                f"{sub.subcategory}: {_short(query)}",
                self.prompt.messages(query=query, **_sub_fields(sub)),
                lambda content, _lp: parse_json(content, StrengthReply).strength,
                json_schema(StrengthReply),
            )
            for query, sub in items
        ]
        return self._run(jobs, lambda f: None)


class OpenAISafeAnswerer(_OpenAIRole):
    role, prompt_file = "safe_answerer", "safe_answerer.md"

    def answer(self, items) -> list[str]:
        """Failed items come back as "" and are listed in self.failures: drop them, never pair them."""
        jobs = [
            Job(
                f"{sub.subcategory}: {_short(query)}",
                self.prompt.messages(query=query, description=description, **_sub_fields(sub)),
                lambda content, _lp: parse_json(content, AnswerReply).answer.strip(),
                json_schema(AnswerReply),
            )
            for query, description, sub in items
        ]
        return self._run(jobs, lambda f: "")

    def reason(self, requests: list[ReasoningRequest]) -> list[str]:
        """The safety reasoning behind each answer, with its own prompt (settings: reasoning_prompt);
        failed items come back as "" and are listed in self.failures."""
        prompt = Prompt.load(self.endpoint.reasoning_prompt or PROMPTS / "safety_reasoning.md")
        jobs = [
            Job(
                f"{r.sub.subcategory}: {_short(r.query)}",
                prompt.messages(query=r.query, description=r.description, answer=r.answer, visual_label=r.visual_label,
                                textual_label=r.textual_label, **_sub_fields(r.sub)),
                lambda content, _lp: parse_json(content, ReasoningReply).reasoning.strip(),
                json_schema(ReasoningReply),
            )
            for r in requests
        ]
        return self._run(jobs, lambda f: "")


class OpenAIJudge(_OpenAIRole):
    """JSON verdicts; with roles.judge.logprobs, a 1-5 harm score whose expected value decides.

    The judge sees the query's subcategory (definition, safe-answer guidance, harmful or benign), so
    it judges against the taxonomy the queries were written for, not a generic notion of harm.
    """

    role = "judge"

    def __init__(self, endpoint: EndpointSettings, cache_dir: str | Path | None = None):
        self.logprob_mode = endpoint.logprobs
        self.prompt_file = "judge_logprob.md" if self.logprob_mode else "judge.md"
        super().__init__(endpoint, cache_dir)
        kind = "openai-logprob" if self.logprob_mode else "openai"
        self.name = f"{kind}:{endpoint.model}@{self.prompt.sha}"

    def _parse_verdict(self, content, _lp) -> Verdict:
        r = parse_json(content, VerdictReply)
        return Verdict(safe=r.safe, helpful=r.helpful, rationale=r.rationale, extra={"judge": self.name})

    def _parse_score(self, content, logprobs) -> Verdict:
        scored = score_from_logprobs(logprobs)
        bare = BARE_SCORE.match(content)
        if bare:
            # A judge asked for one score token answers "3": its log-probabilities (else the digit) are the score.
            stated, helpful, rationale = int(bare.group(1)), None, ""
        else:
            r = parse_json(content, ScoreReply)
            stated, helpful, rationale = r.harm_score, r.helpful, r.rationale
        threshold = self.endpoint.harm_threshold
        if scored is None:  # the server returned no log-probabilities: the stated score decides
            expected, probs, mass, source = float(stated), None, None, "stated score (no logprobs returned)"
        else:
            expected, probs, mass = scored["expected"], scored["probs"], scored["mass"]
            source = "logprobs of a bare score reply" if bare else "logprobs"
        if bare and scored is None:
            source = "stated bare score (no logprobs returned)"
        safe = expected <= threshold
        confidence = None
        if probs is not None:
            confidence = sum(p for k, p in probs.items() if (k <= threshold) == safe)
        return Verdict(
            safe=safe,
            helpful=helpful,
            rationale=rationale,
            score=expected,
            extra={
                "judge": self.name,
                "harm_score": stated,
                "probs": probs,
                # The share of the token's probability on the digits 1-5 before renormalising: low means
                # the alternatives the server returned missed some scores.
                "score_mass": mass,
                "confidence": confidence,
                "threshold": threshold,
                "score_source": source,
            },
        )

    def _messages(self, query: str, answer: str, sub: Subcategory, description: str) -> list[dict]:
        label = "harmful" if sub.harmful else "benign"
        shown = description.strip() or "(no description of this clip)"
        return self.prompt.messages(query=query, answer=answer, label=label, description=shown, **_sub_fields(sub))

    def judge(self, items: list[tuple]) -> list[Verdict]:
        """(query, answer, the item's subcategory, the clip's description) → verdict; an unparseable
        reply is safe=None, never safe. A 3-tuple (no description) is judged without one."""
        parse = self._parse_score if self.logprob_mode else self._parse_verdict
        schema = json_schema(ScoreReply if self.logprob_mode else VerdictReply)
        jobs = []
        for i, (query, answer, sub, *rest) in enumerate(items):
            messages = self._messages(query, answer, sub, rest[0] if rest else "")
            jobs.append(Job(f"#{i} {_short(query)}", messages, parse, schema, logprobs=self.logprob_mode))
        return self._run(jobs, lambda f: Verdict(safe=None, helpful=None, failure=f.cause, extra={"judge": self.name}))


class OpenAISecondJudge(OpenAIJudge):
    """The judge's contract and prompts on another endpoint, counted and cached as its own role."""

    role = "second_judge"


ROLE_CLASSES = {
    "reconciler": OpenAIReconciler,
    "query_writer": OpenAIQueryWriter,
    "adversarial_filter": OpenAIAdversarialFilter,
    "safe_answerer": OpenAISafeAnswerer,
    "judge": OpenAIJudge,
    "second_judge": OpenAISecondJudge,
}


def build(role: str, backend: EndpointSettings, settings):
    """The role on the endpoint of roles.<role> (`backend`), caching replies under data_dir/llm_cache."""
    if role not in ROLE_CLASSES:
        raise ValueError(f"unknown role {role!r}; roles: {sorted(ROLE_CLASSES)}")
    return ROLE_CLASSES[role](backend, cache_dir=settings.path("llm_cache"))
