"""The client of one OpenAI-compatible endpoint (a hosted API, vLLM, Ollama), shared by every LLM
role of the `openai` backend (resources/llm_openai.py) and the `openai` describer
(resources/describers_remote.py).

pipelines.yaml names one endpoint per role (roles.<role> with backend: openai; the describer's is
describer_options.endpoint): base URL, model, the NAME of the environment variable holding the key,
concurrency, retries, temperature, prices, prompt file.

What every request goes through (EndpointClient):
- the disk cache (resources/llm_cache.py), keyed by the full request: a repeated or resumed run
  sends only what it does not have yet;
- a semaphore bounding the requests in flight to the endpoint;
- retries with exponential backoff and jitter on 429, 5xx, timeouts and connection errors, waiting
  what a Retry-After header asks for; after the last retry the item is recorded as a failure naming
  the role, the item and the cause, and the rest of the batch goes on;
- replies parsed by the job's parser (JSON against the role's schema, resources/llm_prompts.py); a
  reply that does not parse is sent back with the parse error (parse_retries times), then recorded
  as a failure (`Failure.record()`: role, reason, attempts, the `failure` column of the role's
  table). A judge failure is a Verdict with safe=None, never "safe". Only replies that parse are
  cached, so a re-run against a healthy server heals the failures; within one Dagster run a request
  that failed for good is not sent again by a later stage.
- token counts and cost per role, logged to the active MLflow run if there is one.

The key is read from the environment when the first request is sent and goes only into the client's
Authorization header: it is never logged, put in an exception, or written to MLflow or Dagster.

Callers are synchronous (Dagster assets call the roles so); each batch runs its requests on a
private event loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import json
import logging
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ground.settings import EndpointSettings
from resources.llm_cache import LLMCache, request_key

log = logging.getLogger(__name__)
BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)
PARSE_FEEDBACK = (
    "Your reply could not be used: {error}. Reply again with only the JSON object the instructions "
    "ask for, with no text before or after it."
)


class LLMConfigError(RuntimeError):
    """A setting or the environment is wrong for every item (e.g. the key's variable is not set)."""


class ParseError(ValueError):
    """A reply the job cannot use; the message goes back to the model, so it must say what is wrong."""


@dataclass
class Failure:
    """One item the endpoint could not do: which, and why (already free of secrets)."""

    index: int
    item: str
    cause: str
    role: str = ""
    attempts: int = 0  # requests sent for the item, parse retries included; 0: it failed earlier in this run

    def record(self) -> str:
        """The `failure` column of the role's table: role, reason and attempts, as JSON."""
        return json.dumps({"role": self.role, "reason": self.cause, "attempts": self.attempts})


@dataclass
class Usage:
    items: int = 0  # jobs asked for
    requests: int = 0  # HTTP requests sent, retries included
    cache_hits: int = 0
    retries: int = 0
    parse_errors: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


# The Dagster run the roles serve (set by the stage shell): a request that failed for good is not
# sent again by a later stage of the same run, but a new run tries it afresh.
_RUN_SCOPE: str | None = None


def set_run_scope(run_id: str | None) -> None:
    global _RUN_SCOPE
    _RUN_SCOPE = run_id


# Every endpoint role's usage in this process, over all its clients: the stage shell and the run CLI
# read what one stage or one run cost as the difference of two snapshots (usage_since).
PROCESS_USAGE: dict[str, Usage] = {}


def usage_snapshot() -> dict[str, dict]:
    return {role: asdict(u) for role, u in PROCESS_USAGE.items()}


def usage_since(before: dict[str, dict]) -> dict[str, dict]:
    """Per role that did anything since the snapshot: its usage since then, with `cold_share`, the share
    of its items that needed the endpoint (1.0: as costly as a run with an empty cache)."""
    out = {}
    for role, now in usage_snapshot().items():
        then = before.get(role, {})
        delta = {k: v - then.get(k, 0) for k, v in now.items()}
        if delta["items"]:
            delta["cold_share"] = round((delta["items"] - delta["cache_hits"]) / delta["items"], 4)
            out[role] = delta
    return out


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
    """Runs batches of jobs against one endpoint; `settings_key` is where pipelines.yaml sets it, for errors."""

    def __init__(self, role: str, endpoint: EndpointSettings, cache: LLMCache | None, settings_key: str | None = None):
        self.role = role
        self.settings_key = settings_key or f"roles.{role}"
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
                f"{self.endpoint.base_url} ({self.settings_key}.api_key_env in pipelines.yaml)"
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

    async def _complete(self, job: Job, index: int, messages: list[dict], sem: asyncio.Semaphore, use_cache: bool = True):
        """(reply or Failure, request, its key, whether it came from the cache, requests sent for it)."""
        request = self._request(job, messages)
        key = request_key(request)
        if use_cache and self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                self.usage.cache_hits += 1
                return cached, request, key, True, 0
        if key in self._pending:  # the same request is already on its way for another item: share it
            reply, _ = await asyncio.shield(self._pending[key])
            if isinstance(reply, Failure):
                reply = Failure(index, job.item, f"role {self.role}, item {job.item}: same request as item {reply.item}; {reply.cause}",
                                self.role, 0)
            return reply, request, key, False, 0
        future = self._pending[key] = asyncio.get_running_loop().create_future()
        try:
            reply, sent = await self._send(job, index, request, sem)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so an unshared failure is not reported as unhandled
            raise
        else:
            future.set_result((reply, sent))
        finally:
            del self._pending[key]
        return reply, request, key, False, sent

    async def _send(self, job: Job, index: int, request: dict, sem: asyncio.Semaphore) -> tuple[dict | Failure, int]:
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
                        return Failure(index, job.item, f"role {self.role}, item {job.item}: {cause}{tried}", self.role), attempt + 1
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
                return reply, attempt + 1
        raise AssertionError("unreachable")

    def _failed_for_good(self, key: str, failure: Failure) -> Failure:
        if self.cache is not None and _RUN_SCOPE is not None:
            self.cache.mark_failed(key, _RUN_SCOPE, failure.cause)
        return failure

    async def _job(self, job: Job, index: int, sem: asyncio.Semaphore):
        messages = list(job.messages)
        first = request_key(self._request(job, messages))
        if self.cache is not None and _RUN_SCOPE is not None and (cause := self.cache.failed(first, _RUN_SCOPE)):
            return Failure(index, job.item, f"{cause} (failed for good earlier in this run, not sent again)", self.role, 0)
        tries, parse_errors, sent, use_cache = self.endpoint.parse_retries + 1, 0, 0, True
        while True:
            reply, request, key, cached, n = await self._complete(job, index, messages, sem, use_cache)
            sent += n
            if isinstance(reply, Failure):
                return self._failed_for_good(first, Failure(index, job.item, reply.cause, self.role, sent))
            try:
                value = job.parse(reply["content"], reply.get("logprobs"))
            except ParseError as exc:
                if cached:  # stored by an older client that cached before parsing: a miss, not a failure
                    use_cache = False
                    continue
                self.usage.parse_errors += 1
                parse_errors += 1
                error = self.redact(str(exc))[:500]
                if parse_errors == tries:
                    failure = Failure(index, job.item, f"role {self.role}, item {job.item}: unparseable reply after {tries} tries: {error}",
                                      self.role, sent)
                    return self._failed_for_good(first, failure)
                log.info("role %s, item %s: reply did not parse (%s); asking again", self.role, job.item, error)
                messages = messages + [
                    {"role": "assistant", "content": reply["content"]},
                    {"role": "user", "content": PARSE_FEEDBACK.format(error=error)},
                ]
                use_cache = True
                continue
            # Only a reply that parsed is kept: a re-run against a healed server must ask again.
            if not cached and self.cache is not None:
                self.cache.put(key, reply, request)
            return value

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
        self.usage.items += len(jobs)
        for f in failures:
            log.error("%s", f.cause)
        self._batches += 1
        delta = {k: v - before[k] for k, v in asdict(self.usage).items()}
        total = PROCESS_USAGE.setdefault(self.role, Usage())
        for k, v in delta.items():
            setattr(total, k, getattr(total, k) + v)
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
