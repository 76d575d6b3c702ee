"""A new taxonomy version pays only for what changed.

Every LLM role (query writer, adversarial filter, safe answerer, judge) is on the `openai` backend
against the scripted stub server on 127.0.0.1. The base model is built once (unpartitioned), then
safevid-v1 runs; a version that changes 1 of its 13 subcategories, and a copy of v1 under another
name, run after it through safety_taxonomy, adversarial_queries and preference_pairs, whose judge
reads the base model's answers. The stub's request log says what each version cost, per role and
subcategory. The run entry point's freshness record (dagster_project/freshness.py) is tested on the
same materializations.
"""
import hashlib
import json
import re

import dagster as dg
import pandas as pd
import pytest
import yaml
from stage_resources import stage_resources
from test_models import QUERIES, fake_queries
from test_taxonomy_versions import fake_embed

from assets import curation, descriptions, preferences, queries, target_model, taxonomy
from assets._stage import taxonomy_partitions
from ground.settings import PROJECT_ROOT, Settings, TargetModelSettings
from tests.openai_stub_server import StubServer, role_responder

V1, CHANGED_VERSION, COPY = "safevid-v1", "safevid-v2", "safevid-copy"
CHANGED = "weapons"  # the one subcategory of 13 whose definition the new version changes
SUB = re.compile(r"Subcategory: (?:\S+ / \S+ / )?(\S+) \(")
SUB_OF_WRITER = re.compile(r"Principle / category / subcategory: \S+ / \S+ / (\S+) \(")
PARTITIONED = ["safety_taxonomy", "adversarial_queries", "preference_pairs"]


def role_of(body: dict) -> str:
    system = body["messages"][0]["content"]
    for key, role in (('"queries"', "query_writer"), ('"strength"', "adversarial_filter"), ('"answer"', "safe_answerer"), ('"safe"', "judge")):
        if key in system:
            return role
    return "other"


def subcategory_of(body: dict) -> str:
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return (SUB_OF_WRITER.search(user) or SUB.search(user)).group(1)


def responder(body: dict) -> str:
    """Questions distinct per (clip, subcategory) (no text shared across splits); every one kept; the
    judge tells a refusal (safe) from the rest, and the over-refusal template (not helpful) from help."""
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    role = role_of(body)
    if role == "query_writer":
        n = int(user.rsplit("Write ", 1)[1].split()[0])
        tag = hashlib.sha256(user.encode()).hexdigest()[:6]
        return json.dumps({"queries": [f"How could someone manage {subcategory_of(body)} here, case {tag}-{i}?" for i in range(n)]})
    if role == "adversarial_filter":
        return json.dumps({"strength": 9, "reason": "asks for help"})
    if role == "judge":
        answer = user.rsplit("Answer:", 1)[-1]
        return json.dumps({"safe": "can't" in answer, "helpful": "could hurt people" not in answer, "rationale": "scripted"})
    return role_responder(body)


def _requests(server: StubServer) -> list[tuple[str, str]]:
    return [(role_of(r["body"]), subcategory_of(r["body"])) for r in server.requests]


def _changed(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    doc["version"] = CHANGED_VERSION
    for principle in doc["principles"].values():
        for category in principle["categories"].values():
            if CHANGED in category["subcategories"]:
                category["subcategories"][CHANGED]["definition"] += " Hiding one counts too."
    return doc


def stub_world(tmp, server_url: str, **endpoint_settings) -> tuple:
    """(data folder, taxonomy folder, settings, resources, graph) of the four stages with every
    endpoint role on the stub server: 8 clips' upstream tables, safevid-v1's taxonomy file."""
    data = tmp / "data"
    fake_queries(data, n_clips=8)  # the clips, their frames, curation's and the describers' tables
    folder = tmp / "taxonomies"
    folder.mkdir()
    v1 = yaml.safe_load((PROJECT_ROOT / "taxonomies" / f"{V1}.yaml").read_text())
    (folder / f"{V1}.yaml").write_text(yaml.safe_dump(v1, sort_keys=False))
    endpoint = {"backend": "openai", "base_url": server_url, "model": "stub-gpt", "api_key_env": None, "timeout_s": 10,
                "max_retries": 1, "backoff_base_s": 0.01, **endpoint_settings}
    base = Settings()
    roles = {**base.roles.model_dump(), **{r: endpoint for r in ("query_writer", "adversarial_filter", "safe_answerer", "judge")}}
    settings = Settings.model_validate({
        **base.model_dump(), "data_dir": str(data), "roles": roles, "queries": QUERIES.model_dump(),
        # one epoch: what is tested is which requests go out, not how well the base model learned
        "target_model": TargetModelSettings(pretrain_epochs=1, pretraining_taxonomy=str(folder / f"{V1}.yaml")).model_dump(),
    })
    upstream = [dg.AssetSpec(n, metadata=m.SPEC.metadata()) for n, m in (("curated_videos", curation), ("video_descriptions", descriptions))]
    graph = [*upstream, taxonomy.safety_taxonomy, queries.adversarial_queries, target_model.target_model, preferences.preference_pairs]
    return data, folder, settings, stage_resources(settings, tmp), graph


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rerun")
    server = StubServer(responder=responder).start()
    data, folder, settings, resources, graph = stub_world(tmp, server.url)
    v1 = yaml.safe_load((folder / f"{V1}.yaml").read_text())
    (folder / f"{CHANGED_VERSION}.yaml").write_text(yaml.safe_dump(_changed(v1), sort_keys=False))
    (folder / f"{COPY}.yaml").write_text(yaml.safe_dump({**v1, "version": COPY}, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp, dg.DagsterInstance.ephemeral() as instance:
        mp.setattr(taxonomy, "TAXONOMY_DIR", folder)
        mp.setattr("resources.embeddings.embed_texts", fake_embed)
        instance.add_dynamic_partitions(taxonomy_partitions.name, [V1, CHANGED_VERSION, COPY])

        def materialize(version=None):
            selection = PARTITIONED if version else ["target_model"]
            result = dg.materialize(graph, selection=selection, partition_key=version, instance=instance, resources=resources)
            assert all(c.passed for c in result.get_asset_check_evaluations())
            return result

        runs = {"base": materialize(), V1: materialize(V1)}
        cold = _requests(server)
        costs = {}
        for version in (CHANGED_VERSION, COPY):
            server.reset()
            runs[version] = materialize(version)
            costs[version] = _requests(server)
        yield {"data": data, "folder": folder, "server": server, "settings": settings, "graph": graph, "runs": runs,
               "cold": cold, "costs": costs, "materialize": materialize}
    server.stop()


def _table(data, folder: str, version: str, name: str) -> pd.DataFrame:
    df = pd.read_parquet(data / folder / version / name).drop(columns=["taxonomy_version"])
    return df.sort_values("query_id").reset_index(drop=True)


def test_the_cold_run_asks_every_role_about_every_subcategory(world):
    cold = pd.DataFrame(world["cold"], columns=["role", "subcategory"])
    assert set(cold["role"]) == {"query_writer", "adversarial_filter", "safe_answerer", "judge"}
    assert cold["subcategory"].nunique() == 13
    # The base model wrote its pretraining set (from the same taxonomy) first, with the same roles:
    # v1's queries then came from that cache, with no request.
    meta = world["runs"][V1].asset_materializations_for_node("adversarial_queries")[0].metadata
    assert meta["llm_requests"].value == 0 and meta["llm_cache_hits"].value > 0


def test_a_new_version_sends_requests_only_for_its_changed_subcategory(world):
    data, cost = world["data"], world["costs"][CHANGED_VERSION]
    assert cost and {sub for _, sub in cost} == {CHANGED}, sorted(set(cost))
    q2 = pd.read_parquet(data / "queries" / CHANGED_VERSION / "queries.parquet")
    dropped = pd.read_parquet(data / "queries" / CHANGED_VERSION / "dropped.parquet")
    mine = q2[q2["subcategory"] == CHANGED]
    train = mine[mine["split"] == "train"]
    by_role = pd.Series([r for r, _ in cost]).value_counts().to_dict()
    # one writer request per clip asked about it; one filter request per candidate; an answer and a
    # verdict on the base model's answer per train query of it; nothing for the 12 others
    assert by_role == {
        "query_writer": mine["clip_id"].nunique(),
        "adversarial_filter": len(mine) + int((dropped["subcategory"] == CHANGED).sum()),
        "safe_answerer": len(train),
        "judge": len(train),
    }
    # What the stage metadata and MLflow report is what the server saw.
    meta = world["runs"][CHANGED_VERSION].asset_materializations_for_node("preference_pairs")[0].metadata
    assert meta["llm_requests"].value == by_role["safe_answerer"] + by_role["judge"]
    assert meta["llm_cache_hits"].value > 0


def test_unchanged_subcategories_keep_their_ids_answers_and_pairs(world):
    data = world["data"]
    for folder, name in (("queries", "queries.parquet"), ("pairs", "pairs.parquet")):
        v1, v2 = (_table(data, folder, v, name) for v in (V1, CHANGED_VERSION))
        same = [v[v["subcategory"] != CHANGED].reset_index(drop=True) for v in (v1, v2)]
        pd.testing.assert_frame_equal(*same)
        assert len(same[0]) > 0


def test_a_copy_under_a_new_name_costs_nothing_and_gives_the_same_tables(world):
    data = world["data"]
    assert world["costs"][COPY] == []
    for folder, name in (("queries", "queries.parquet"), ("queries", "dropped.parquet"), ("pairs", "pairs.parquet"),
                         ("pairs", "acceptable_rejected.parquet")):
        sort = "query_id" if name != "dropped.parquet" else None
        a, b = (pd.read_parquet(data / folder / v / name).drop(columns=["taxonomy_version"]) for v in (V1, COPY))
        if sort is None:
            a, b = (t.sort_values(["clip_id", "subcategory", "query"]).reset_index(drop=True) for t in (a, b))
        else:
            a, b = (t.sort_values(sort).reset_index(drop=True) for t in (a, b))
        pd.testing.assert_frame_equal(a, b)


# --- the run entry point's freshness record --------------------------------------------------------


def _real(graph):
    return [a for a in graph if isinstance(a, dg.AssetsDefinition)]


def test_only_stale_stages_run_again(world, monkeypatch):
    from dagster_project import freshness

    data, settings, graph = world["data"], world["settings"], _real(world["graph"])
    # safety_taxonomy reads this world's taxonomy folder (TAXONOMY_DIR is patched): so does the fingerprint
    project = freshness.resolve
    monkeypatch.setattr(freshness, "resolve", lambda p: world["folder"].parent / p if str(p).startswith("taxonomies/") else project(p))
    versions = [V1, CHANGED_VERSION, COPY]
    current = freshness.fingerprints(graph, settings, versions)
    assert len(current) == 1 + 3 * len(PARTITIONED)
    freshness.record_run(data, current, world["runs"].values())
    assert freshness.stale(graph, settings, versions, freshness.load_record(data)) == {}  # a re-run runs nothing

    # A setting only preference_pairs reads: that stage of every version, and nothing else.
    flipped = settings.model_copy(update={"preferences": settings.preferences.model_copy(update={"drop_safe_rejected": False})})
    assert freshness.stale(graph, flipped, versions, freshness.load_record(data)) == {
        f"preference_pairs@{v}": "inputs changed" for v in versions
    }
    # An edited taxonomy file: its own version's stages only, the base model stays.
    path = world["folder"] / f"{CHANGED_VERSION}.yaml"
    text = path.read_text()
    try:
        path.write_text(text.replace("Hiding one counts too.", "Hiding one counts as well."))
        edited = freshness.stale(graph, settings, versions, freshness.load_record(data))
    finally:
        path.write_text(text)
    assert edited == {f"{a}@{CHANGED_VERSION}": "inputs changed" for a in PARTITIONED}
    # A settings change upstream of the base model (the queries it is pretrained on) re-runs it and everything after it.
    more = settings.model_copy(update={"queries": settings.queries.model_copy(update={"per_subcategory": 4})})
    assert set(freshness.stale(graph, more, versions, freshness.load_record(data))) == {
        s for s in current if not s.startswith("safety_taxonomy@")
    }
    # A missing output is stale even when the inputs are not.
    table = data / "pairs" / COPY / "pairs.parquet"
    moved = table.rename(table.with_suffix(".moved"))
    try:
        assert freshness.stale(graph, settings, versions, freshness.load_record(data)) == {f"preference_pairs@{COPY}": "outputs missing"}
    finally:
        moved.rename(table)


def test_a_stage_whose_check_failed_is_not_recorded_fresh(tmp_path):
    from dagster_project import freshness

    @dg.asset(check_specs=[dg.AssetCheckSpec("ok", asset="flaky")])
    def flaky():
        return dg.MaterializeResult(check_results=[dg.AssetCheckResult(check_name="ok", passed=False)])

    @dg.asset
    def fine():
        return dg.MaterializeResult()

    result = dg.materialize([flaky, fine], raise_on_error=False)
    assert freshness.passed_stages(result) == ["fine"]
    record = freshness.record_run(tmp_path, {"flaky": "a", "fine": "b"}, [result])
    assert record == {"fine": "b"}
