"""The target model's answers from a vLLM OpenAI-compatible server (target_model.server), or in process.

`answers_for` is what the stages call: with target_model.server null it loads the checkpoint
(resources/models.py) and generates greedily in process, as before; with a server it sends each
(clip, query) as one chat request, the clip's frames as images (or one vLLM video part) and then the
query text, the in-process prompt's shape. A checkpoint's LoRA adapter is asked for by name, as
`vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER_FOLDER` serves it (`served_name`).

Requests go through the LLM roles' client (resources/llm_client.py): the disk cache (a repeated run
sends nothing), at most server.max_concurrency in flight, retries with backoff, usage per role
("target_model"), the key only in the Authorization header. An answer that fails for good comes
back as "" and is listed in `ServedGenerator.failures`; `answers_for` stops the stage when more
than server.max_failure_rate of a batch failed (default 0: a missing answer is never judged).

Checkpoints with alarm tokens (AT-SFT, and the CoT and GRPO checkpoints trained on it) always answer
in process: their alarm embeddings replace token embeddings through a forward hook and their heads
read hidden states, which a LoRA served by vLLM cannot carry.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ground.checkpoints import CheckpointRecord, replicate_folder
from ground.settings import GenerationServerSettings
from resources.describers_remote import frame_parts
from resources.llm_cache import LLMCache
from resources.llm_client import EndpointClient, Failure, Job

log = logging.getLogger(__name__)
ROLE = "target_model"


class GenerationError(RuntimeError):
    """More of a batch's answers failed for good than target_model.server.max_failure_rate allows."""


def _is_replicate(record: CheckpointRecord) -> bool:
    # A replicate is the same recipe's adapter from another seed's folder (CheckpointRecord.replicate).
    return record.seed is not None and record.adapter_path is not None and (
        Path(record.adapter_path).as_posix().rstrip("/").endswith(replicate_folder(record.seed))
    )


def served_name(record: CheckpointRecord, settings) -> str:
    """The model name a request for this checkpoint sends: its entry in server.adapters, else its own
    name (with -seed<k> for a replicate seed's adapter), else the server's base model when it has no adapter."""
    server = settings.target_model.server
    key = f"{record.name}/seed{record.seed}" if _is_replicate(record) else record.name
    if key in server.adapters:
        return server.adapters[key]
    if record.adapter_path is None:
        return server.model
    return f"{record.name}-seed{record.seed}" if _is_replicate(record) else record.name


def served(settings, record: CheckpointRecord) -> bool:
    """Whether the server answers for this checkpoint (a server is set and it has no alarm tokens)."""
    return settings.target_model.server is not None and not record.alarm_tokens


def _short(text: str, n: int = 40) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _parse(content: str, _logprobs) -> str:
    # Any text is an answer, an empty one too (as in process): nothing to send back.
    return content.strip()


class ServedGenerator:
    """Greedy answers from the server; one client per (served name, budget), all sharing the cache."""

    def __init__(self, server: GenerationServerSettings, cache_dir: str | Path | None = None):
        self.server = server
        self.cache = LLMCache(cache_dir) if cache_dir is not None else None
        self.failures: list[Failure] = []  # of the last batch
        self._clients: dict[tuple[str, int], EndpointClient] = {}

    def _client(self, model_name: str, max_new_tokens: int) -> EndpointClient:
        key = (model_name, max_new_tokens)
        if key not in self._clients:
            # The request carries the adapter's name and the stage's budget; temperature 0 is greedy.
            endpoint = self.server.model_copy(update={"model": model_name, "max_tokens": max_new_tokens, "temperature": 0.0})
            self._clients[key] = EndpointClient(ROLE, endpoint, self.cache, settings_key="target_model.server")
        return self._clients[key]

    def messages(self, frames: np.ndarray, query: str) -> list[dict]:
        """One user turn: the frames, then the query (models._messages: the video, then the text)."""
        return [{"role": "user", "content": [*frame_parts(frames, self.server), {"type": "text", "text": query}]}]

    def generate(self, videos: Sequence[np.ndarray], queries: Sequence[str], max_new_tokens: int, model_name: str) -> list[str]:
        """One answer per (frames, query); a failed one is "" and listed in self.failures."""
        if len(videos) != len(queries):
            raise ValueError(f"{len(videos)} videos but {len(queries)} queries")
        jobs = [Job(f"#{i} {_short(q)}", self.messages(v, q), _parse) for i, (v, q) in enumerate(zip(videos, queries))]
        results = self._client(model_name, max_new_tokens).run(jobs)
        self.failures = [r for r in results if isinstance(r, Failure)]
        return ["" if isinstance(r, Failure) else r for r in results]


def _check_failures(failures: list[Failure], total: int, server: GenerationServerSettings, name: str) -> None:
    if not failures:
        return
    if len(failures) > server.max_failure_rate * total:
        raise GenerationError(
            f"{len(failures)} of {total} answers of {name} failed for good on {server.base_url} (more than "
            f"target_model.server.max_failure_rate {server.max_failure_rate:g}); first: {failures[0].cause}. "
            "The answers that succeeded are cached: a re-run sends only the failed ones."
        )
    log.warning("%d of %d answers of %s failed for good and are empty (within max_failure_rate)", len(failures), total, name)


def answers_for(
    settings,
    record: CheckpointRecord,
    videos: Sequence[np.ndarray],
    queries: Sequence[str],
    max_new_tokens: int,
    progress: Callable[[int, int], None] | None = None,
    cache_dir: str | Path | None = None,
    loaded: tuple | None = None,
) -> list[str]:
    """The checkpoint's greedy answers, from the server when `served`, else in process with
    `loaded` (model, processor) or the checkpoint loaded here."""
    tm = settings.target_model
    queries = list(queries)
    if not served(settings, record):
        from resources import models  # lazy: torch and transformers load only to generate in process

        model, processor = loaded if loaded is not None and loaded[0] is not None else load_in_process(settings, record)
        return models.generate_answers(model, processor, videos, queries, max_new_tokens, tm.batch_size, progress=progress)
    name = served_name(record, settings)
    if progress is not None:
        progress(0, len(queries))
    generator = ServedGenerator(tm.server, cache_dir)
    answers = generator.generate(videos, queries, max_new_tokens, name)
    if progress is not None:
        progress(len(answers), len(queries))
    _check_failures(generator.failures, len(queries), tm.server, name)
    return answers


def load_in_process(settings, record: CheckpointRecord):
    """(model, processor) of the checkpoint, as the stages load it."""
    from resources import models

    adapter = record.adapter()
    return models.load_video_llm(record.weights(), device=settings.target_model.device, adapter=str(adapter) if adapter else None)


def load_for(settings, record: CheckpointRecord):
    """(model, processor) for a stage that also counts tokens: the model is None when the server
    answers (only the processor's small files are read then)."""
    if not served(settings, record):
        return load_in_process(settings, record)
    from transformers import AutoProcessor

    return None, AutoProcessor.from_pretrained(record.weights())
