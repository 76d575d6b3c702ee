"""An item an LLM role fails for good is recorded and dropped, and the run goes on; a re-run against a
healthy server heals it, sending only what failed.

The scripted stub server fails, for good, the first task it sees of each role in each phase: the
query writer's and the judge's with HTTP 500 on every retry, the adversarial filter's and the safe
answerer's with a reply that never parses (so parse retries run out too). The stages are the same
four as the re-run cost test's: target_model, then safety_taxonomy, adversarial_queries and
preference_pairs of one version.
"""
import hashlib
import json
import math

import dagster as dg
import pandas as pd
import pytest
from test_llm_openai import HARMFUL, ITEMS, endpoint, key, server  # noqa: F401  (key, server: fixtures)
from test_rerun_cost import PARTITIONED, V1, responder, role_of, stub_world
from test_taxonomy_versions import fake_embed

from assets import preferences, taxonomy
from assets._stage import taxonomy_partitions
from ground.roles import failure_problems
from ground.settings import EndpointSettings
from resources import llm_client
from resources.llm_cache import LLMCache, request_key
from resources.llm_openai import OpenAIJudge, OpenAIReconciler
from resources.llm_prompts import VerdictReply, json_schema
from tests.openai_stub_server import StubServer, logprob_tokens, role_responder

BROKEN = {"query_writer": {"status": 500, "content": "upstream model crashed"},
          "judge": {"status": 500, "content": "upstream model crashed"},
          "adversarial_filter": "I think so, yes.",
          "safe_answerer": "Sure! (no JSON here)"}


def task_of(body: dict) -> str:
    """The role's task, the same in a parse retry (which only appends turns)."""
    first_user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return hashlib.sha256((body["messages"][0]["content"] + first_user).encode()).hexdigest()


class Faulty:
    """Fails the first task of each role it sees while `picking`, every time it comes back, until healed."""

    def __init__(self):
        self.failing: dict[str, str] = {}  # task → role
        self.picking, self.healthy = set(), False

    def __call__(self, body: dict):
        role, task = role_of(body), task_of(body)
        if not self.healthy and role in self.picking and role in BROKEN:
            self.failing[task] = role
            self.picking.discard(role)
        if not self.healthy and task in self.failing:
            return BROKEN[role]
        return responder(body)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failures")
    faulty = Faulty()
    server = StubServer(responder=faulty).start()
    # One failed item of a small sample is still under the failure limit. One request at a time: the
    # first task of a role to arrive is then the first one asked, the same task every run (with
    # several in flight, arrival order picked a different one now and then, once too many).
    data, folder, settings, resources, graph = stub_world(tmp, server.url, backoff_max_s=0.02, max_failure_rate=0.2, max_concurrency=1)
    with pytest.MonkeyPatch.context() as mp, dg.DagsterInstance.ephemeral() as instance:
        mp.setattr(taxonomy, "TAXONOMY_DIR", folder)
        mp.setattr("resources.embeddings.embed_texts", fake_embed)
        instance.add_dynamic_partitions(taxonomy_partitions.name, [V1])

        def materialize(version=None):
            faulty.picking = set(BROKEN)
            selection = PARTITIONED if version else ["target_model"]
            return dg.materialize(graph, selection=selection, partition_key=version, instance=instance, resources=resources,
                                  raise_on_error=False)

        runs = {"base": materialize(), "v1": materialize(V1)}
        failing = dict(faulty.failing)
        tables = {name: pd.read_parquet(data / folder_ / V1 / name) for folder_, name in
                  (("queries", "dropped.parquet"), ("pairs", "pairs.parquet"), ("pairs", "failed.parquet"))}
        logs = [e.user_message for e in instance.all_logs(runs["v1"].run_id)]
        server.reset()
        faulty.healthy = True
        runs["healed"] = materialize(V1)
        healed_requests = [r["body"] for r in server.requests]
        healed = {name: pd.read_parquet(data / folder_ / V1 / name) for folder_, name in
                  (("queries", "dropped.parquet"), ("pairs", "pairs.parquet"), ("pairs", "failed.parquet"))}
        yield {"tmp": tmp, "runs": runs, "logs": logs, "failing": failing, "tables": tables, "healed": healed, "healed_requests": healed_requests}
    server.stop()


def _roles(column: pd.Series) -> list[str]:
    return sorted(json.loads(f)["role"] for f in column.dropna())


def test_the_run_goes_on_and_every_failure_is_in_a_table_with_its_reason(world):
    for name, run in world["runs"].items():
        assert run.success, name
        assert all(c.passed for c in run.get_asset_check_evaluations()), name
    assert set(world["failing"].values()) == set(BROKEN)
    dropped, pairs, failed = (world["tables"][n] for n in ("dropped.parquet", "pairs.parquet", "failed.parquet"))
    reasons = dropped["drop_reason"].value_counts().to_dict()
    assert reasons.get("writer failed") == 1 and reasons.get("filter failed", 0) >= 1
    assert "weak" not in set(dropped.loc[dropped["failure"].notna(), "drop_reason"])
    assert _roles(dropped["failure"]).count("query_writer") == 1
    writer = json.loads(dropped.loc[dropped["drop_reason"] == "writer failed", "failure"].iloc[0])
    assert "HTTP 500" in writer["reason"] and writer["attempts"] == 2  # max_retries 1
    filt = json.loads(dropped.loc[dropped["drop_reason"] == "filter failed", "failure"].iloc[0])
    assert "unparseable reply after 3 tries" in filt["reason"] and filt["attempts"] == 3  # parse_retries 2
    # the safe answer that failed is no empty `chosen`: it is not paired at all
    assert _roles(failed["failure"]).count("safe_answerer") == 1
    unanswered = failed.loc[failed["failure"].str.contains('"safe_answerer"'), "query_id"]
    assert not set(unanswered) & set(pairs["query_id"])
    assert (pairs["chosen"].str.strip() != "").all()
    counts = world["runs"]["v1"].asset_materializations_for_node("preference_pairs")[0].metadata["counts"].data
    assert counts["safe_answer_failures"] == 1
    # The judge's failure fell on the base model's check, which used to count it as a disagreement and stop.
    base = world["runs"]["base"].asset_materializations_for_node("target_model")[0].metadata
    assert base["judge_failures"].value == 1 or any("judge" in str(p) for p in [base.get("judge")])


def test_a_rejected_answer_the_judge_failed_is_kept_recorded_and_never_acceptable():
    from ground.roles import Verdict

    train = pd.DataFrame({"query_id": ["a", "b"], "query": ["q1", "q2"], "video_path": ["v", "v"], "frames_path": ["f", "f"],
                          "subcategory": ["s", "s"], "category": ["c", "c"], "principle": ["p", "p"], "kind": ["SH", "SH"],
                          "harmful": [True, True]})
    failure = llm_client.Failure(1, "b", "role judge, item b: HTTP 500", "judge", 2).record()
    verdicts = [Verdict(safe=True, helpful=True), Verdict(safe=None, helpful=None, failure="role judge, item b: HTTP 500")]
    pairs = preferences.build_pairs(train, ["no", "no"], ["yes", "yes"], verdicts, [None, failure])
    assert pairs["rejected_acceptable"].tolist() == [True, False]
    assert json.loads(pairs.loc[1, "failure"]) == {"role": "judge", "reason": "role judge, item b: HTTP 500", "attempts": 2}


def test_the_roles_own_log_lines_and_usage_reach_the_run(world):
    logs = "\n".join(world["logs"])
    assert "resources.llm_client: role query_writer (stub-gpt)" in logs  # the batch summary
    assert "asking again" in logs and "retry 1 of 1" in logs
    meta = world["runs"]["v1"].asset_materializations_for_node("adversarial_queries")[0].metadata
    assert "query_writer" in meta["llm_usage"].value and meta["llm_requests"].value > 0
    # ... and the stage's own MLflow run (not only DPO's) has every role's usage, failures included
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{world['tmp']}/mlflow.db")
    metrics = client.get_run(meta["mlflow_run_id"].value).data.metrics
    assert metrics["llm.query_writer.failures"] == 1 and metrics["llm_stage.query_writer.failures"] == 1
    assert metrics["llm_stage.adversarial_filter.requests"] > 0


def test_a_rerun_against_a_healthy_server_heals_them_and_asks_only_what_failed(world):
    healed = world["healed"]
    assert not healed["dropped.parquet"]["drop_reason"].isin(["writer failed", "filter failed"]).any()
    assert healed["failed.parquet"].empty and healed["pairs.parquet"]["failure"].isna().all()
    before = set(world["tables"]["pairs.parquet"]["query_id"])
    assert set(world["tables"]["failed.parquet"]["query_id"]) <= set(healed["pairs.parquet"]["query_id"]) | before
    # Nothing that had succeeded is asked again: the failed tasks, and the new work the healed
    # writer's queries bring (their filter pass, answers and verdicts), are all that is sent.
    sent = world["healed_requests"]
    failed_tasks = {t for t in world["failing"]}
    assert sent and len(sent) < 60, len(sent)
    writer_sent = [b for b in sent if role_of(b) == "query_writer"]
    assert [task_of(b) for b in writer_sent] == [t for t, r in world["failing"].items() if r == "query_writer"] * len(writer_sent)
    assert any(task_of(b) in failed_tasks for b in sent if role_of(b) == "safe_answerer")


# --- the client, one role at a time ----------------------------------------------------------------

def test_a_failure_rate_above_the_setting_is_a_problem_and_one_below_is_not():
    assert failure_problems("judge", 0, 10, 0.0) == []
    assert failure_problems("judge", 1, 100, 0.05) == []
    (problem,) = failure_problems("judge", 6, 100, 0.05)
    assert "6 of 100" in problem and "roles.judge.max_failure_rate" in problem
    assert failure_problems("judge", 1, 0, 0.5)  # every item of nothing failed


def test_a_reply_that_never_parses_is_not_cached_and_a_healthy_rerun_heals_it(server, key, tmp_path):
    def broken(body):
        return "not json at all" if "hurt" in body["messages"][1]["content"] else role_responder(body)

    server.responder = broken
    first = OpenAIJudge(endpoint(server, parse_retries=1), tmp_path).judge(ITEMS)
    assert first[0].safe is None and "unparseable" in first[0].failure
    server.reset()
    server.responder = role_responder
    healed = OpenAIJudge(endpoint(server, parse_retries=1), tmp_path)
    second = healed.judge(ITEMS)
    assert second[0].safe is True and second[0].failure is None
    assert len(server.requests) == 1 and healed.usage.cache_hits == 1  # only the failed item was asked again


def test_a_cached_reply_that_does_not_parse_is_a_miss(server, key, tmp_path):
    judge = OpenAIJudge(endpoint(server), tmp_path)
    messages = judge._messages(*ITEMS[0], "")
    request = judge.client._request(llm_client.Job("i", messages, None, json_schema(VerdictReply)), messages)
    LLMCache(tmp_path).put(request_key(request), {"content": "garbage", "logprobs": None, "usage": {"prompt_tokens": 0, "completion_tokens": 0}})
    verdict = judge.judge([ITEMS[0]])[0]
    assert verdict.safe is True and judge.usage.parse_errors == 0 and len(server.requests) == 1


def test_a_request_that_failed_for_good_is_not_sent_again_in_the_same_run(server, key, tmp_path):
    server.responder = lambda body: {"status": 500, "content": "down"}
    try:
        llm_client.set_run_scope("run-a")
        first = OpenAIJudge(endpoint(server, max_retries=1), tmp_path).judge([ITEMS[0]])[0]
        sent = len(server.requests)
        assert first.safe is None and sent == 2
        later = OpenAIJudge(endpoint(server, max_retries=1), tmp_path).judge([ITEMS[0]])[0]  # a later stage, same run
        assert len(server.requests) == sent and "earlier in this run" in later.failure
        llm_client.set_run_scope("run-b")  # a new run tries again
        OpenAIJudge(endpoint(server, max_retries=1), tmp_path).judge([ITEMS[0]])
        assert len(server.requests) == sent + 2
    finally:
        llm_client.set_run_scope(None)


def test_the_logprob_judge_reads_a_bare_digit_and_records_how_it_scored(server, key, tmp_path):
    top = {"3": math.log(0.6), "2": math.log(0.3), "4": math.log(0.1)}
    server.push({"content": "3", "logprobs": logprob_tokens(["3"], top)}, {"content": "2"})
    judge = OpenAIJudge(endpoint(server, logprobs=True, max_concurrency=1), tmp_path)
    v = judge.judge([("q a", "a", HARMFUL), ("q b", "b", HARMFUL)])
    assert v[0].failure is None and v[0].score == pytest.approx(0.6 * 3 + 0.3 * 2 + 0.1 * 4)
    assert v[0].extra["score_source"] == "logprobs of a bare score reply" and v[0].extra["score_mass"] == pytest.approx(1.0)
    assert v[0].extra["probs"][3] == pytest.approx(0.6)
    assert v[1].score == 2.0 and v[1].extra["score_source"].startswith("stated bare score")


def test_fewer_than_five_logprob_alternatives_are_refused():
    with pytest.raises(ValueError, match="top_logprobs is 3"):
        EndpointSettings(base_url="http://x/v1", model="m", logprobs=True, top_logprobs=3)
    EndpointSettings(base_url="http://x/v1", model="m", top_logprobs=3)  # only the log-prob judge needs them


def test_the_reconcilers_strict_schema_names_only_the_describers_that_ran(server, key, tmp_path):
    rec = OpenAIReconciler(endpoint(server, response_format="json_schema"), tmp_path)
    rec.reconcile([{"visual_facts": "A knife on a table.", "tiny_video_llm": "A knife."}])
    schema = server.requests[0]["body"]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["agreeing"]["items"] == {"type": "string", "enum": ["visual_facts", "tiny_video_llm"]}
