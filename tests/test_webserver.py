"""The code location as the UI and the CLI see it: a real dagster-webserver queried over GraphQL, and
`dagster asset materialize --select` run as a subprocess (it breaks if dvc's antlr4 pin leaks into .venv)."""
import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from ground.settings import PROJECT_ROOT

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dagster_home(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return path


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    assert "errors" not in body, body
    return body["data"]


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    port = _free_port()
    home = _dagster_home(tmp_path_factory.mktemp("dagster_home"))
    log = (home / "webserver.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-m", "dagster_project.definitions"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DAGSTER_HOME": str(home)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"webserver exited: {(home / 'webserver.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "webserver did not serve within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _code_location():
    from dagster_project.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = graph.materializable_asset_keys
    return defs, graph, keys


@pytest.mark.slow
def test_webserver_serves_assets_edges_checks_and_partitions(webserver):
    data = _graphql(
        webserver,
        """{ assetNodes { assetKey { path } dependencyKeys { path }
               partitionDefinition { type dimensionTypes { dynamicPartitionsDefinitionName } }
               assetChecksOrError { ... on AssetChecks { checks { name blocking } } } } }""",
    )
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    _, graph, keys = _code_location()
    assert set(nodes) == {k.to_user_string() for k in keys}
    assert {"video_manifest", "safety_taxonomy"} <= set(nodes)
    for key in keys:
        node = nodes[key.to_user_string()]
        assert {"/".join(d["path"]) for d in node["dependencyKeys"]} == {p.to_user_string() for p in graph.get(key).parent_keys}
        checks = {c["name"]: c["blocking"] for c in node["assetChecksOrError"]["checks"]}
        assert set(checks) == {c.name for c in graph.get(key).check_keys}
        partitions = node["partitionDefinition"]
        if graph.get(key).is_partitioned:
            assert partitions["type"] == "DYNAMIC"
            assert partitions["dimensionTypes"][0]["dynamicPartitionsDefinitionName"] == "taxonomy_version"
        else:
            assert partitions is None
    assert nodes["video_manifest"]["assetChecksOrError"]["checks"] == [{"name": "manifest_is_usable", "blocking": True}]
    assert nodes["safety_taxonomy"]["partitionDefinition"]["type"] == "DYNAMIC"


@pytest.mark.slow
def test_webserver_serves_sensor_schedule_and_jobs(webserver):
    data = _graphql(
        webserver,
        """{ repositoriesOrError { ... on RepositoryConnection { nodes {
               sensors { name sensorState { status } targets { pipelineName } }
               schedules { name cronSchedule pipelineName }
               jobs { name } } } } }""",
    )
    [repo] = data["repositoriesOrError"]["nodes"]
    sensors = {s["name"]: s for s in repo["sensors"]}
    assert sensors["taxonomy_files_sensor"]["targets"] == [{"pipelineName": "taxonomy_job"}]
    assert sensors["taxonomy_files_sensor"]["sensorState"]["status"] == "RUNNING"
    assert {"name": "nightly_curation_schedule", "cronSchedule": "0 2 * * *", "pipelineName": "curation_job"} in repo["schedules"]
    assert {"curation_job", "taxonomy_job"} <= {j["name"] for j in repo["jobs"]}


def test_project_venv_keeps_dagsters_antlr4():
    """dvc lives in .venv-dvc: in .venv its antlr4 4.9 pin would break every string selection."""
    assert importlib.metadata.version("antlr4-python3-runtime").startswith("4.13")
    assert importlib.util.find_spec("dvc") is None
    assert dg.AssetSelection.from_string("key:video_manifest or key:safety_taxonomy") is not None


@pytest.mark.slow
def test_cli_materialize_with_string_selection(tmp_path):
    home = _dagster_home(tmp_path / "dagster_home")
    env = {
        **os.environ,
        "SAFEVID_PROFILE": "embedded",
        "DAGSTER_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    env.pop("DVC_STAGE", None)
    # Settings overrides in the run config (no settings file): the run cannot reach the project's own data/.
    overrides = {"data_dir": str(tmp_path / "data"), "manifest": {"synthetic_clips": 3}}
    resources = {"settings": {"config": {"profile": "embedded", "overrides": overrides}}}
    cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "dagster_project.definitions", "--select", "video_manifest"]
    proc = subprocess.run(
        [*cmd, "--config-json", json.dumps({"resources": resources})],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "RUN_SUCCESS" in proc.stderr + proc.stdout
    manifest = pd.read_parquet(tmp_path / "data" / "manifest" / "manifest.parquet")
    assert len(manifest) == 3
    with dg.DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("video_manifest"))
        assert event is not None and event.asset_materialization.metadata["dagster/row_count"].value == 3
