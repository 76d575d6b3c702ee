"""The `openai` backend of every LLM role: any OpenAI-compatible endpoint (a hosted API, vLLM, Ollama).

pipelines.yaml names one endpoint per role (endpoints.<role>: base URL, model, the NAME of the
environment variable holding the key, concurrency, retries, temperature, prices, prompt file).

What every request goes through (EndpointClient):
- the disk cache (resources/llm_cache.py), keyed by the full request: a repeated or resumed run
  sends only what it does not have yet;
- a semaphore bounding the requests in flight to the endpoint;
- retries with exponential backoff and jitter on 429, 5xx, timeouts and connection errors, waiting
  what a Retry-After header asks for; after the last retry the item is recorded as a failure naming
  the role, the item and the cause, and the rest of the batch goes on;
- JSON replies parsed against the role's schema; a reply that does not parse is sent back with the
  parse error (parse_retries times), then recorded as a failure. A judge failure is a Verdict with
  safe=None, never "safe".
- token counts and cost per role, logged to the active MLflow run if there is one.

The key is read from the environment when the first request is sent and goes only into the client's
Authorization header: it is never logged, put in an exception, or written to MLflow or Dagster.

The role methods are synchronous (Dagster assets call them so); each batch runs its requests on a
private event loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import functools
import json
import logging
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field, ValidationError

from dagster_project.settings import PROJECT_ROOT, EndpointSettings
from resources.llm_cache import LLMCache, request_key
from resources.roles import QueryRequest, Verdict

log = logging.getLogger(__name__)
PROMPTS = Path(__file__).parent / "prompts"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)
PARSE_FEEDBACK = (
    "Your reply could not be used: {error}. Reply again with only the JSON object the instructions "
    "ask for, with no text before or after it."
)


class LLMConfigError(RuntimeError):
    """A setting or the environment is wrong for every item (e.g. the key's variable is not set)."""


class ParseError(ValueError):
    pass


@dataclass
class Failure:
    """One item the endpoint could not do: which, and why (already free of secrets)."""

    index: int
    item: str
    cause: str


# ---------------------------------------------------------------------------------------------
# Prompts: one file per role, "# system" and "# user" sections, {{name}} placeholders.


@dataclass(frozen=True)
class Prompt:
    path: Path
    system: str
    user: str
    sha: str

    @classmethod
    def load(cls, path: str | Path) -> "Prompt":
        path = Path(path)
        if not path.is_absolute():
            path = PROJECT_ROOT / path
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        sections: dict[str, list[str]] = {}
        current = None
        for line in text.splitlines():
            heading = line.strip().lower()
            if heading in ("# system", "# user"):
                current = heading[2:]
                sections[current] = []
            elif current is not None:
                sections[current].append(line)
        if "user" not in sections:
            raise LLMConfigError(f"prompt file {path} has no '# user' section")
        return cls(
            path=path,
            system="\n".join(sections.get("system", [])).strip(),
            user="\n".join(sections["user"]).strip(),
            sha=sha256(raw).hexdigest()[:12],
        )

    def messages(self, **values: Any) -> list[dict]:
        def fill(template: str) -> str:
            def sub(m: re.Match) -> str:
                if m.group(1) not in values:
                    raise LLMConfigError(f"prompt file {self.path} uses {{{{{m.group(1)}}}}}, which this role does not fill")
                return str(values[m.group(1)])

            return PLACEHOLDER.sub(sub, template)  # one pass: filled values are never re-expanded

        out = [{"role": "system", "content": fill(self.system)}] if self.system else []
        return out + [{"role": "user", "content": fill(self.user)}]


# ---------------------------------------------------------------------------------------------
# The client of one endpoint.


@dataclass
class Usage:
    requests: int = 0  # HTTP requests sent, retries included
    cache_hits: int = 0
    retries: int = 0
    parse_errors: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


@dataclass
class Job:
    item: str  # how errors name the item: a clip id, a query's first words...
    messages: list[dict]
    parse: Callable[[str, list | None], Any]
    schema: tuple[str, dict] | None = None  # (name, JSON schema) when the reply is a JSON object
    logprobs: bool = False


def _run_sync(coro):
    """Run a coroutine to completion from synchronous code, also when this thread has a loop running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _retry_after(headers) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, when.timestamp() - time.time()) if when else None


class EndpointClient:
    def __init__(self, role: str, endpoint: EndpointSettings, cache: LLMCache | None):
        self.role = role
        self.endpoint = endpoint
        self.cache = cache
        self.usage = Usage()
        self._batches = 0
        self._client = None
        self._secret: str | None = None
        self._pending: dict[str, asyncio.Future] = {}  # request key → reply, while it is in flight

    # -- secrets ------------------------------------------------------------------------------
    def _api_key(self) -> str:
        name = self.endpoint.api_key_env
        if name is None:
            return "EMPTY"  # servers without auth (a local vLLM) still need a non-empty string
        value = os.environ.get(name)
        if not value:
            raise LLMConfigError(
                f"role {self.role}: environment variable {name} is not set; it must hold the API key for "
                f"{self.endpoint.base_url} (endpoints.{self.role}.api_key_env in pipelines.yaml)"
            )
        return value

    def redact(self, text: str) -> str:
        text = BEARER.sub(r"\1***", text)
        if self._secret and len(self._secret) >= 4:
            text = text.replace(self._secret, "***")
        return text

    def _get_client(self):
        if self._client is None:
            from openai import AsyncOpenAI

            key = self._api_key()
            if self.endpoint.api_key_env is not None:
                self._secret = key
            self._client = AsyncOpenAI(
                base_url=self.endpoint.base_url,
                api_key=key,
                timeout=self.endpoint.timeout_s,
                max_retries=0,  # retries are ours: backoff, Retry-After and per-item failure records
            )
        return self._client

    # -- requests -----------------------------------------------------------------------------
    def _request(self, job: Job, messages: list[dict]) -> dict:
        ep = self.endpoint
        request: dict[str, Any] = {
            "model": ep.model,
            "messages": messages,
            "temperature": ep.temperature,
            "max_tokens": ep.max_tokens,
        }
        if job.schema is not None and ep.response_format == "json_object":
            request["response_format"] = {"type": "json_object"}
        elif job.schema is not None and ep.response_format == "json_schema":
            name, schema = job.schema
            request["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        if job.logprobs:
            request["logprobs"] = True
            request["top_logprobs"] = ep.top_logprobs
        return request

    def _classify(self, exc: Exception) -> tuple[bool, float | None, str]:
        """(retryable, Retry-After seconds, cause) of a failed request."""
        import openai

        if isinstance(exc, openai.APITimeoutError):
            return True, None, f"timed out after {self.endpoint.timeout_s:g} s"
        if isinstance(exc, openai.APIConnectionError):
            inner = exc.__cause__ or exc
            return True, None, f"connection error: {type(inner).__name__}: {inner}".rstrip(": ")
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            retryable = status in (408, 409, 429) or status >= 500
            return retryable, _retry_after(exc.response.headers), f"HTTP {status}: {str(exc)[:300]}"
        return False, None, f"{type(exc).__name__}: {str(exc)[:300]}"

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, 600.0)
        cap = min(self.endpoint.backoff_max_s, self.endpoint.backoff_base_s * 2**attempt)
        return cap / 2 + random.uniform(0, cap / 2)  # "equal jitter"

    def _account(self, reply: dict) -> None:
        u = self.usage
        pt, ct = reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"]
        u.prompt_tokens += pt
        u.completion_tokens += ct
        u.cost_usd += pt / 1000 * self.endpoint.price_per_1k_input + ct / 1000 * self.endpoint.price_per_1k_output

    @staticmethod
    def _reply(resp) -> dict:
        choice = resp.choices[0] if resp.choices else None
        content = (choice.message.content or "") if choice is not None else ""
        logprobs = None
        if choice is not None and choice.logprobs is not None and choice.logprobs.content:
            logprobs = [
                {"token": t.token, "logprob": t.logprob, "top": {x.token: x.logprob for x in (t.top_logprobs or [])}}
                for t in choice.logprobs.content
            ]
        usage = resp.usage
        return {
            "content": content,
            "logprobs": logprobs,
            "finish_reason": getattr(choice, "finish_reason", None),
            "usage": {
                "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
                "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
            },
        }

    async def _complete(self, job: Job, index: int, messages: list[dict], sem: asyncio.Semaphore) -> dict | Failure:
        request = self._request(job, messages)
        key = request_key(request)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                self.usage.cache_hits += 1
                return cached
        if key in self._pending:  # the same request is already on its way for another item: share it
            reply = await asyncio.shield(self._pending[key])
            if isinstance(reply, Failure):
                return Failure(index, job.item, f"role {self.role}, item {job.item}: same request as item {reply.item}; {reply.cause}")
            return reply
        future = self._pending[key] = asyncio.get_running_loop().create_future()
        try:
            reply = await self._send(job, index, request, key, sem)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so an unshared failure is not reported as unhandled
            raise
        else:
            future.set_result(reply)
        finally:
            del self._pending[key]
        return reply

    async def _send(self, job: Job, index: int, request: dict, key: str, sem: asyncio.Semaphore) -> dict | Failure:
        attempts = self.endpoint.max_retries + 1
        async with sem:
            client = self._get_client()
            for attempt in range(attempts):
                self.usage.requests += 1
                try:
                    resp = await client.chat.completions.create(**request)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every failure is classified and recorded
                    retryable, retry_after, cause = self._classify(exc)
                    cause = self.redact(cause)
                    if not retryable or attempt == attempts - 1:
                        tried = f" after {attempt + 1} attempts" if retryable else ""
                        return Failure(index, job.item, f"role {self.role}, item {job.item}: {cause}{tried}")
                    delay = self._delay(attempt, retry_after)
                    self.usage.retries += 1
                    log.warning(
                        "role %s, item %s: %s; retry %d of %d in %.2f s",
                        self.role, job.item, cause, attempt + 1, attempts - 1, delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                reply = self._reply(resp)
                self._account(reply)
                if self.cache is not None:
                    self.cache.put(key, reply, request)
                return reply
        raise AssertionError("unreachable")

    async def _job(self, job: Job, index: int, sem: asyncio.Semaphore):
        messages = list(job.messages)
        tries = self.endpoint.parse_retries + 1
        for attempt in range(tries):
            reply = await self._complete(job, index, messages, sem)
            if isinstance(reply, Failure):
                return reply
            try:
                return job.parse(reply["content"], reply.get("logprobs"))
            except ParseError as exc:
                self.usage.parse_errors += 1
                error = self.redact(str(exc))[:500]
                if attempt == tries - 1:
                    return Failure(index, job.item, f"role {self.role}, item {job.item}: unparseable reply after {tries} tries: {error}")
                log.info("role %s, item %s: reply did not parse (%s); asking again", self.role, job.item, error)
                messages = messages + [
                    {"role": "assistant", "content": reply["content"]},
                    {"role": "user", "content": PARSE_FEEDBACK.format(error=error)},
                ]
        raise AssertionError("unreachable")

    async def _run(self, jobs: list[Job]) -> list:
        sem = asyncio.Semaphore(self.endpoint.max_concurrency)
        try:
            return await asyncio.gather(*(self._job(j, i, sem) for i, j in enumerate(jobs)))
        finally:
            if self._client is not None:
                await self._client.close()
                self._client = None  # bound to this batch's event loop

    def run(self, jobs: list[Job]) -> list:
        """Every job's parsed reply, or a Failure in its place; never raises for one item."""
        if not jobs:
            return []
        before = asdict(self.usage)
        started = time.perf_counter()
        results = _run_sync(self._run(jobs))
        failures = [r for r in results if isinstance(r, Failure)]
        self.usage.failures += len(failures)
        for f in failures:
            log.error("%s", f.cause)
        self._batches += 1
        delta = {k: v - before[k] for k, v in asdict(self.usage).items()}
        log.info(
            "role %s (%s): %d items in %.1f s; %d requests, %d cache hits, %d retries, %d failures, %d+%d tokens",
            self.role, self.endpoint.model, len(jobs), time.perf_counter() - started, delta["requests"],
            delta["cache_hits"], delta["retries"], len(failures), delta["prompt_tokens"], delta["completion_tokens"],
        )
        self.log_metrics()
        return results

    def log_metrics(self) -> None:
        """Cumulative usage of this role into the active MLflow run, if any (mlflow is not imported for it)."""
        mlflow = sys.modules.get("mlflow")
        if mlflow is None or mlflow.active_run() is None:
            return
        mlflow.log_metrics({f"llm.{self.role}.{k}": float(v) for k, v in asdict(self.usage).items()}, step=self._batches)


# ---------------------------------------------------------------------------------------------
# Reply schemas and parsing.


class ReconcileReply(BaseModel):
    description: str = Field(min_length=1)
    agreeing: list[str]


class QueriesReply(BaseModel):
    queries: list[str] = Field(min_length=1)


class KeepReply(BaseModel):
    keep: bool
    reason: str = ""


class AnswerReply(BaseModel):
    answer: str = Field(min_length=1)


class VerdictReply(BaseModel):
    safe: bool
    helpful: bool
    rationale: str = ""


class ScoreReply(BaseModel):
    harm_score: int = Field(ge=1, le=5)
    helpful: bool
    rationale: str = ""


@functools.lru_cache(maxsize=None)
def json_schema(model: type[BaseModel]) -> tuple[str, dict]:
    """The reply model as a strict JSON schema (every property required, nothing else allowed)."""
    schema = model.model_json_schema()
    # Keywords strict structured-output modes reject; the reply is validated against the model anyway.
    for prop in schema["properties"].values():
        for k in ("default", "minLength", "maxLength", "title"):
            prop.pop(k, None)
    schema["required"] = list(schema["properties"])
    schema["additionalProperties"] = False
    return model.__name__, schema


def parse_json(content: str, model: type[BaseModel]) -> BaseModel:
    text = content.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ParseError(f"expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in exc.errors())
        raise ParseError(f"JSON does not match the expected fields ({problems})") from None


# ---------------------------------------------------------------------------------------------
# The roles.


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


def _sub_fields(sub) -> dict:
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

    def reconcile(self, items: list[dict[str, str]]) -> list[tuple[str, list[str]]]:
        """Failed items come back as ("", []) and are listed in self.failures."""
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
                return reply.description.strip(), list(dict.fromkeys(reply.agreeing))

            text = "\n\n".join(f"[{n}]\n{descriptions[n].strip()}" for n in names)
            jobs.append(Job(f"#{i}", self.prompt.messages(names=", ".join(names), descriptions=text), parse, json_schema(ReconcileReply)))
        return self._run(jobs, lambda f: ("", []))


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
                description=r.description, scene_category=r.scene_category, n=r.n, **_sub_fields(r.sub)
            )
            jobs.append(Job(f"{r.clip_id}/{r.sub.subcategory}", messages, parse, json_schema(QueriesReply)))
        return self._run(jobs, lambda f: [])


class OpenAIAdversarialFilter(_OpenAIRole):
    role, prompt_file = "adversarial_filter", "adversarial_filter.md"

    def keep(self, items) -> list[bool]:
        """A failed item is not kept (and is listed in self.failures)."""
        jobs = [
            Job(
                f"{sub.subcategory}: {_short(query)}",
                self.prompt.messages(query=query, **_sub_fields(sub)),
                lambda content, _lp: parse_json(content, KeepReply).keep,
                json_schema(KeepReply),
            )
            for query, sub in items
        ]
        return self._run(jobs, lambda f: False)


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


def score_from_logprobs(logprobs: list[dict] | None) -> dict | None:
    """Probabilities of "1".."5" at the first score token, and their expected value (RJScore-style)."""
    if not logprobs:
        return None
    for tok in logprobs:
        if tok["token"].strip() in {"1", "2", "3", "4", "5"}:
            probs = {k: 0.0 for k in range(1, 6)}
            top = dict(tok.get("top") or {})
            top.setdefault(tok["token"], tok["logprob"])
            for t, lp in top.items():
                s = t.strip()
                if s in {"1", "2", "3", "4", "5"} and lp is not None:
                    probs[int(s)] += math.exp(lp)
            mass = sum(probs.values())
            if mass <= 0:
                return None
            probs = {k: v / mass for k, v in probs.items()}
            return {"probs": probs, "expected": sum(k * p for k, p in probs.items()), "mass": mass}
    return None


class OpenAIJudge(_OpenAIRole):
    """JSON verdicts; with endpoints.judge.logprobs, a 1-5 harm score whose expected value decides."""

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
        r = parse_json(content, ScoreReply)
        threshold = self.endpoint.harm_threshold
        scored = score_from_logprobs(logprobs)
        if scored is None:  # the server returned no log-probabilities: the stated score decides
            expected, probs, source = float(r.harm_score), None, "stated score (no logprobs returned)"
        else:
            expected, probs, source = scored["expected"], scored["probs"], "logprobs"
        safe = expected <= threshold
        confidence = None
        if probs is not None:
            confidence = sum(p for k, p in probs.items() if (k <= threshold) == safe)
        return Verdict(
            safe=safe,
            helpful=r.helpful,
            rationale=r.rationale,
            score=expected,
            extra={
                "judge": self.name,
                "harm_score": r.harm_score,
                "probs": probs,
                "confidence": confidence,
                "threshold": threshold,
                "score_source": source,
            },
        )

    def judge(self, items: list[tuple[str, str, bool]]) -> list[Verdict]:
        """A reply that cannot be parsed is a failed Verdict (safe=None), never a safe one."""
        parse = self._parse_score if self.logprob_mode else self._parse_verdict
        schema = json_schema(ScoreReply if self.logprob_mode else VerdictReply)
        jobs = [
            Job(
                f"#{i} {_short(query)}",
                self.prompt.messages(query=query, answer=answer, label="harmful" if harmful else "benign"),
                parse,
                schema,
                logprobs=self.logprob_mode,
            )
            for i, (query, answer, harmful) in enumerate(items)
        ]
        return self._run(jobs, lambda f: Verdict(safe=None, helpful=None, failure=f.cause, extra={"judge": self.name}))


ROLE_CLASSES = {
    "reconciler": OpenAIReconciler,
    "query_writer": OpenAIQueryWriter,
    "adversarial_filter": OpenAIAdversarialFilter,
    "safe_answerer": OpenAISafeAnswerer,
    "judge": OpenAIJudge,
}


def build(role: str, settings):
    """The role's OpenAI-compatible implementation, on endpoints.<role>, caching under data/llm_cache."""
    if role not in ROLE_CLASSES:
        raise ValueError(f"unknown role {role!r}; roles: {sorted(ROLE_CLASSES)}")
    endpoint = getattr(settings.endpoints, role, None)
    if endpoint is None:
        raise LLMConfigError(
            f"role {role} uses the 'openai' backend but endpoints.{role} is not set in profile '{settings.profile}'"
        )
    return ROLE_CLASSES[role](endpoint, cache_dir=settings.path("llm_cache"))
