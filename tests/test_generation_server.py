"""The target model's answers on a vLLM OpenAI-compatible server (resources/generation_remote.py), against the
scripted server on 127.0.0.1 (tests/openai_stub_server.py) with the real `openai` client."""
from __future__ import annotations

import base64
import io
import json
import logging

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from ground.checkpoints import CheckpointRecord
from ground.settings import GenerationServerSettings, Settings
from resources import generation_remote
from resources.generation_remote import GenerationError, ServedGenerator, answers_for, served, served_name
from tests.openai_stub_server import StubServer

KEY_ENV = "SAFEVID_TEST_VLLM_KEY"
KEY = "vllm-test-3c2b1a0f-DO-NOT-LEAK"
BASE = "llava-hf/LLaVA-NeXT-Video-7B-hf"


def echo(body: dict) -> str:
    """The served model's name, the images it got and the query: what the test checks came through."""
    parts = body["messages"][0]["content"]
    images = sum(1 for p in parts if p["type"] == "image_url")
    return f" {body['model']} saw {images} frames: {parts[-1]['text']} "


@pytest.fixture
def server():
    s = StubServer(responder=echo).start()
    yield s
    s.stop()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


def server_settings(server, **kw) -> dict:
    base = dict(base_url=server.url, model=BASE, api_key_env=KEY_ENV, max_concurrency=3, timeout_s=5, max_retries=2,
                backoff_base_s=0.01, backoff_max_s=0.02, max_frames=4)
    return {**base, **kw}


def settings(server, tmp_path, **kw) -> Settings:
    return Settings(target_model={"server": server_settings(server, **kw)}, data_dir=str(tmp_path))


def records(tmp_path) -> dict[str, CheckpointRecord]:
    fields = dict(taxonomy_version="safevid-v1")
    base = CheckpointRecord.local(tmp_path / "base", weights=tmp_path / "base" / "model", name="base", method="pretrained", **fields)
    dpo = CheckpointRecord.adapter_on(base, tmp_path / "dpo", replicate_seeds=[1], name="safevid-dpo", method="dpo", seed=0,
                                      parent="base", **fields)
    at_sft = CheckpointRecord.adapter_on(base, tmp_path / "at_sft", name="safevid-at-sft", method="at_sft", seed=0, parent="base",
                                         alarm_tokens=True, **fields)
    return {"base": base, "dpo": dpo, "dpo_seed1": dpo.replicate(1), "at_sft": at_sft}


def clips(n: int, frames: int = 10) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (frames, 16, 16, 3), dtype=np.uint8) for _ in range(n)]


QUERIES = [f"What happens to object {i} in the video?" for i in range(6)]


# ---------------------------------------------------------------------------------------------
# The request: frames as images, then the query; greedy; the stage's budget; the adapter by name.


def test_frames_go_as_images_then_the_query_greedy_with_the_budget(server, key, tmp_path):
    gen = ServedGenerator(GenerationServerSettings(**server_settings(server, max_frames=4)), tmp_path)
    answers = gen.generate(clips(2, frames=10), QUERIES[:2], max_new_tokens=37, model_name="safevid-dpo")
    assert answers == [f"safevid-dpo saw 4 frames: {q}" for q in QUERIES[:2]]  # stripped, as in process
    # Requests run concurrently, so the first to arrive may be either query's.
    [body] = [r["body"] for r in server.requests if r["body"]["messages"][0]["content"][-1].get("text") == QUERIES[0]]
    assert body["temperature"] == 0 and body["max_tokens"] == 37 and "response_format" not in body
    [turn] = body["messages"]
    assert turn["role"] == "user"
    *images, text = turn["content"]
    assert [p["type"] for p in images] == ["image_url"] * 4 and text == {"type": "text", "text": QUERIES[0]}
    from PIL import Image

    url = images[0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (16, 16)
    assert gen.failures == []


def test_a_short_clip_sends_every_frame_and_video_mode_sends_one_part(server, key, tmp_path):
    ServedGenerator(GenerationServerSettings(**server_settings(server, max_frames=8)), tmp_path).generate(
        clips(1, frames=3), QUERIES[:1], 8, BASE)
    assert sum(p["type"] == "image_url" for p in server.requests[-1]["body"]["messages"][0]["content"]) == 3
    ServedGenerator(GenerationServerSettings(**server_settings(server, frames_as="video")), tmp_path).generate(
        clips(1), QUERIES[:1], 8, BASE)
    video, text = server.requests[-1]["body"]["messages"][0]["content"]
    assert video["type"] == "video_url" and video["video_url"]["url"].count(",") == 4  # prefix + 3 between 4 frames
    assert text["text"] == QUERIES[0]


def test_each_checkpoint_is_asked_for_by_its_served_name(server, key, tmp_path):
    r = records(tmp_path)
    cfg = settings(server, tmp_path)
    assert [served_name(r[k], cfg) for k in ("base", "dpo", "dpo_seed1")] == [BASE, "safevid-dpo", "safevid-dpo-seed1"]
    mapped = settings(server, tmp_path, adapters={"safevid-dpo": "dpo-lora", "safevid-dpo/seed1": "dpo-lora-s1", "base": "base-ft"})
    assert [served_name(r[k], mapped) for k in ("base", "dpo", "dpo_seed1")] == ["base-ft", "dpo-lora", "dpo-lora-s1"]

    for k in ("base", "dpo", "dpo_seed1"):
        answers_for(mapped, r[k], clips(1), QUERIES[:1], 8, cache_dir=tmp_path / "cache")
    assert [q["body"]["model"] for q in server.requests] == ["base-ft", "dpo-lora", "dpo-lora-s1"]


# ---------------------------------------------------------------------------------------------
# The client's guarantees: the concurrency bound, the cache, failures per item, the key kept out.


def test_requests_in_flight_stay_within_max_concurrency(server, key, tmp_path):
    server.responder = lambda body: {"content": echo(body), "delay": 0.15}
    gen = ServedGenerator(GenerationServerSettings(**server_settings(server, max_concurrency=3)), tmp_path)
    answers = gen.generate(clips(12), [f"query {i}" for i in range(12)], 8, BASE)
    assert len(server.requests) == 12 and all(a.endswith(f"query {i}") for i, a in enumerate(answers))
    assert 2 <= server.max_in_flight <= 3  # bounded, and the bound is used


def test_a_second_run_is_served_from_the_cache(server, key, tmp_path):
    cfg, r = settings(server, tmp_path), records(tmp_path)
    videos = clips(4)
    first = answers_for(cfg, r["dpo"], videos, QUERIES[:4], 16, cache_dir=tmp_path / "cache")
    assert len(server.requests) == 4
    server.reset()
    ticks = []
    again = answers_for(cfg, r["dpo"], videos, QUERIES[:4], 16, progress=lambda done, total: ticks.append((done, total)),
                        cache_dir=tmp_path / "cache")
    assert again == first and server.requests == []
    assert ticks == [(0, 4), (4, 4)]
    # The cache key is the whole request: another budget, adapter or frames is a new request.
    answers_for(cfg, r["dpo_seed1"], videos, QUERIES[:4], 16, cache_dir=tmp_path / "cache")
    answers_for(cfg, r["dpo"], [np.zeros_like(v) for v in videos], QUERIES[:4], 16, cache_dir=tmp_path / "cache")
    answers_for(cfg, r["dpo"], videos, QUERIES[:4], 17, cache_dir=tmp_path / "cache")
    assert len(server.requests) == 12


def failing_on(query: str):
    return lambda body: {"status": 500, "content": "model crashed"} if body["messages"][0]["content"][-1]["text"] == query else echo(body)


def test_an_answer_that_fails_for_good_is_empty_and_recorded_and_the_rest_succeed(server, key, tmp_path):
    server.responder = failing_on(QUERIES[2])
    gen = ServedGenerator(GenerationServerSettings(**server_settings(server, max_retries=2)), tmp_path)
    answers = gen.generate(clips(5), QUERIES[:5], 8, "safevid-dpo")
    assert answers[2] == "" and [a for i, a in enumerate(answers) if i != 2] == [
        f"safevid-dpo saw 4 frames: {q}" for i, q in enumerate(QUERIES[:5]) if i != 2]
    [failure] = gen.failures
    assert failure.index == 2 and failure.role == "target_model" and failure.attempts == 3
    assert "HTTP 500" in failure.cause and "after 3 attempts" in failure.cause
    assert json.loads(failure.record())["reason"] == failure.cause
    sent = [q["body"]["messages"][0]["content"][-1]["text"] for q in server.requests]
    assert sent.count(QUERIES[2]) == 3 and len(sent) == 4 + 3


def test_answers_for_stops_above_max_failure_rate_and_warns_within_it(server, key, tmp_path, caplog):
    server.responder = failing_on(QUERIES[1])
    r = records(tmp_path)
    with pytest.raises(GenerationError, match=r"1 of 4 answers of safevid-dpo failed for good.*HTTP 500"):
        answers_for(settings(server, tmp_path), r["dpo"], clips(4), QUERIES[:4], 8, cache_dir=tmp_path / "cache")
    server.reset()
    with caplog.at_level(logging.WARNING, logger="resources.generation_remote"):
        answers = answers_for(settings(server, tmp_path, max_failure_rate=0.25), r["dpo"], clips(4), QUERIES[:4], 8,
                              cache_dir=tmp_path / "cache")
    assert answers[1] == "" and all(answers[i] for i in (0, 2, 3))
    assert "1 of 4 answers of safevid-dpo failed for good" in caplog.text
    # Only the failed item went out again: the three answers of the first try were cached.
    assert {q["body"]["messages"][0]["content"][-1]["text"] for q in server.requests} == {QUERIES[1]}


def test_the_key_is_sent_but_never_returned_logged_or_stored(server, key, tmp_path, caplog):
    cfg, r = settings(server, tmp_path, max_failure_rate=1.0), records(tmp_path)
    server.push({"echo_auth": True}, {"echo_auth": True}, {"echo_auth": True})  # a 401 whose body repeats the header
    with caplog.at_level(logging.DEBUG):
        gen = ServedGenerator(cfg.target_model.server, tmp_path / "cache")
        answers = gen.generate(clips(3), QUERIES[:3], 8, "safevid-dpo")
        answers += answers_for(cfg, r["dpo"], clips(2), ["another", "query"], 8, cache_dir=tmp_path / "cache")
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"  # it is sent...
    assert len(gen.failures) == 3 and all("HTTP 401" in f.cause for f in gen.failures)
    shown = [*answers, *(f.cause for f in gen.failures), *(f.record() for f in gen.failures), caplog.text,
             json.dumps(cfg.flat("target_model")), cfg.model_dump_json()]
    shown += [p.read_text() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not [s for s in shown if KEY in s]  # ...and appears nowhere else
    assert "***" in gen.failures[0].cause


def test_no_key_is_sent_unless_one_is_named(server, key, tmp_path):
    cfg = Settings(target_model={"server": {"base_url": server.url, "model": BASE}}, data_dir=str(tmp_path))
    ServedGenerator(cfg.target_model.server, None).generate(clips(1), QUERIES[:1], 8, BASE)
    assert server.requests[0]["headers"]["authorization"] == "Bearer EMPTY"


# ---------------------------------------------------------------------------------------------
# In process or served: which path a checkpoint takes.


def test_without_a_server_answers_are_generated_in_process(tmp_path, monkeypatch):
    from resources import models

    calls = {}

    def load(weights, device, adapter=None):
        calls["load"] = (weights, device, adapter)
        return "model", "processor"

    def generate(model, processor, videos, queries, max_new_tokens, batch_size, progress=None):
        calls["generate"] = (model, processor, len(videos), queries, max_new_tokens, batch_size, progress)
        return [f"in process {q}" for q in queries]

    monkeypatch.setattr(models, "load_video_llm", load)
    monkeypatch.setattr(models, "generate_answers", generate)
    cfg = Settings(target_model={"batch_size": 5, "device": "cpu"}, data_dir=str(tmp_path))
    r = records(tmp_path)
    tick = lambda done, total: None  # noqa: E731
    assert answers_for(cfg, r["dpo"], clips(2), QUERIES[:2], 11, tick, tmp_path) == [f"in process {q}" for q in QUERIES[:2]]
    assert calls["load"] == (r["dpo"].weights(), "cpu", str(r["dpo"].adapter()))
    assert calls["generate"] == ("model", "processor", 2, QUERIES[:2], 11, 5, tick)
    # A model the caller already loaded is used as it is.
    calls.clear()
    answers_for(cfg, r["base"], clips(1), QUERIES[:1], 3, loaded=("loaded", "its processor"))
    assert "load" not in calls and calls["generate"][:2] == ("loaded", "its processor")


def test_alarm_checkpoints_answer_in_process_even_with_a_server(server, key, tmp_path, monkeypatch):
    from resources import models

    monkeypatch.setattr(models, "load_video_llm", lambda weights, device, adapter=None: ("model", "processor"))
    monkeypatch.setattr(models, "generate_answers", lambda m, p, v, q, n, b, progress=None: ["in process"] * len(q))
    cfg, r = settings(server, tmp_path), records(tmp_path)
    assert served(cfg, r["dpo"]) and not served(cfg, r["at_sft"])
    assert answers_for(cfg, r["at_sft"], clips(1), QUERIES[:1], 8, cache_dir=tmp_path) == ["in process"]
    assert server.requests == []


def test_load_for_reads_only_the_processor_when_served(server, key, tmp_path, monkeypatch):
    import transformers

    from resources import models

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda name: f"processor of {name}")
    monkeypatch.setattr(models, "load_video_llm", lambda weights, device, adapter=None: ("model", f"processor of {weights}"))
    r = records(tmp_path)
    assert generation_remote.load_for(settings(server, tmp_path), r["dpo"]) == (None, f"processor of {r['dpo'].weights()}")
    assert generation_remote.load_for(Settings(data_dir=str(tmp_path)), r["dpo"]) == ("model", f"processor of {r['dpo'].weights()}")


def test_benchmark_answers_of_a_served_checkpoint_load_no_weights(server, key, tmp_path, monkeypatch):
    from assets import scores

    def no_weights(*args, **kw):
        raise AssertionError("the weights were loaded for a served checkpoint")

    monkeypatch.setattr(generation_remote, "load_in_process", no_weights)
    paths = []
    for i, v in enumerate(clips(2)):
        np.save(tmp_path / f"clip{i}.npy", v)
        paths.append(str(tmp_path / f"clip{i}.npy"))
    bench = pd.DataFrame({"frames_path": paths, "query": QUERIES[:2]})
    cfg, r = settings(server, tmp_path), records(tmp_path)
    answers, heads = scores.answer(cfg, r["dpo"], bench, "video", None)
    assert answers == [f"safevid-dpo saw 4 frames: {q}" for q in QUERIES[:2]] and heads is None
    assert [q["body"]["max_tokens"] for q in server.requests] == [cfg.target_model.max_new_tokens] * 2
    zeroed, _ = scores.answer(cfg, r["dpo"], bench, "zeroed", None)
    assert len(server.requests) == 4 and zeroed == answers  # the echo ignores pixels; the requests did not
    with pytest.raises(AssertionError, match="weights were loaded"):  # an alarm checkpoint still needs its weights
        scores.answer(cfg, r["at_sft"], bench, "video", None)


# ---------------------------------------------------------------------------------------------
# Settings.


def test_server_settings_refuse_sampling_and_a_pasted_key(server):
    with pytest.raises(ValidationError, match="temperature"):
        GenerationServerSettings(**server_settings(server, temperature=0.7))
    with pytest.raises(ValidationError, match="NAME of an environment variable") as err:
        GenerationServerSettings(**server_settings(server, api_key_env="sk-abc123-pasted"))
    assert "sk-abc123-pasted" not in str(err.value)
    assert Settings().target_model.server is None
