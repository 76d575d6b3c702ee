"""DVC: the resource, record_outputs from inside Dagster, dvc.yaml against the asset graph, and
`dvc repro` plus a push/pull round trip through a local remote in a temporary copy of the repo."""
import hashlib
import importlib
import inspect
import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest
import yaml
from checkout import copy_checkout

from dagster_project.instance import taxonomy_versions
from ground.settings import PROJECT_ROOT, Settings
from resources.dvc import DEFAULT_DVC_BIN, DvcTracker, DvcUnavailable, _skip_reason, record_outputs

DVC_YAML = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())


@pytest.fixture(scope="module")
def dvc_bin() -> str:
    if not DEFAULT_DVC_BIN.exists():
        pytest.fail(f"dvc is not installed at {DEFAULT_DVC_BIN}: run `make dvc`")
    return str(DEFAULT_DVC_BIN)


def _git_dvc_repo(path: Path, dvc_bin: str) -> None:
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    subprocess.run([dvc_bin, "init", "-q"], cwd=path, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})


def _settings_for(tmp: Path, data_dir: Path) -> Settings:
    return Settings(data_dir=str(data_dir))


# --- the resource without dvc --------------------------------------------------------------------


def test_missing_binary_says_to_run_make_dvc(tmp_path):
    dvc = DvcTracker(repo_root=str(tmp_path), dvc_bin=str(tmp_path / "nope" / "dvc"))
    with pytest.raises(DvcUnavailable, match="make dvc"):
        dvc.status()
    context = dg.build_asset_context(resources={"settings": _settings_for(tmp_path, tmp_path / "data")})
    assert list(record_outputs(context, dvc, "video_manifest")) == ["dvc/not_tracked"]
    assert "make dvc" in _skip_reason(context, dvc, "video_manifest")


def test_record_outputs_skips_outside_a_dvc_repo(tmp_path, dvc_bin):
    dvc = DvcTracker(repo_root=str(tmp_path), dvc_bin=dvc_bin)
    context = dg.build_asset_context(resources={"settings": _settings_for(tmp_path, tmp_path / "data")})
    assert list(record_outputs(context, dvc, "video_manifest")) == ["dvc/not_tracked"]
    assert "not a DVC repository" in _skip_reason(context, dvc, "video_manifest")


# --- record_outputs for real, in a small DVC repository -------------------------------------------

TOY_DVC_YAML = {
    "stages": {
        "toy": {"cmd": "echo materialized by dagster", "deps": ["code.py"], "outs": ["data/toy"]},
        "part": {"foreach": ["a"], "do": {"cmd": "echo ${item}", "outs": ["data/part/${item}"]}},
    }
}


@pytest.fixture
def toy_repo(tmp_path, dvc_bin):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git_dvc_repo(repo, dvc_bin)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(TOY_DVC_YAML))
    (repo / "code.py").write_text("print('toy')\n")
    return repo, DvcTracker(repo_root=str(repo), dvc_bin=dvc_bin), _settings_for(tmp_path, repo / "data")


@dg.asset
def toy(context: dg.AssetExecutionContext, settings: dg.ResourceParam[Settings], dvc: DvcTracker):
    out = settings.path("toy")
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.txt").write_text(context.run_id)  # new content every run
    return dg.MaterializeResult(metadata={"rows": 1, **record_outputs(context, dvc, "toy")})


@dg.asset(partitions_def=dg.StaticPartitionsDefinition(["a", "b"]))
def part(context: dg.AssetExecutionContext, settings: dg.ResourceParam[Settings], dvc: DvcTracker):
    out = settings.path("part", context.partition_key)
    out.mkdir(parents=True, exist_ok=True)
    (out / "x.txt").write_text(context.partition_key)
    return dg.MaterializeResult(metadata=record_outputs(context, dvc, "part"))


def _materialize(asset, repo_dvc, settings, **kw):
    result = dg.materialize([asset], resources={"settings": settings, "dvc": repo_dvc}, **kw)
    [mat] = result.asset_materializations_for_node(asset.op.name)
    return mat.metadata


def test_materialization_leaves_dvc_status_clean_and_records_the_hash(toy_repo):
    repo, dvc, settings = toy_repo
    assert dvc.status()  # nothing recorded yet: the stage is changed

    meta = _materialize(toy, dvc, settings)
    outs = meta["dvc/outs"].value
    assert meta["dvc/stage"].value == "toy"
    assert set(outs) == {"data/toy"} and outs["data/toy"].endswith(".dir")
    assert dvc.hash_of("data/toy") == outs["data/toy"] == dvc.hash_of(repo / "data" / "toy")
    assert dvc.status("toy") == {}
    assert (repo / ".dvc" / "cache").is_dir()  # the outputs are in the cache, ready to push

    # Someone edits the output by hand: DVC sees it; the next materialization records the new state.
    (repo / "data" / "toy" / "rows.txt").write_text("edited")
    assert dvc.status("toy") == {"toy": [{"changed outs": {"data/toy": "modified"}}]}
    again = _materialize(toy, dvc, settings)
    assert dvc.status("toy") == {}
    assert again["dvc/outs"].value["data/toy"] != outs["data/toy"]


def test_partitioned_asset_records_its_foreach_stage(toy_repo):
    repo, dvc, settings = toy_repo
    meta = _materialize(part, dvc, settings, partition_key="a")
    assert meta["dvc/stage"].value == "part@a"
    assert dvc.status("part@a") == {}
    # A partition dvc.yaml does not list is an error naming the stage and the way to generate it,
    # not a warning: the product's re-run path must not lose its lineage quietly.
    from resources.dvc import DvcError

    with pytest.raises(DvcError, match=r"no stage 'part@b'.*dagster_project.dvc_stages"):
        _materialize(part, dvc, settings, partition_key="b")
    assert "part@b" not in dvc.lock().get("stages", {})


def test_record_outputs_leaves_other_data_folders_alone(toy_repo, tmp_path):
    """A test run writing to a temporary data dir must not commit the repository's data."""
    repo, dvc, _ = toy_repo
    (tmp_path / "other").mkdir()
    elsewhere = _settings_for(tmp_path / "other", tmp_path / "other" / "data")
    meta = _materialize(toy, dvc, elsewhere)
    assert "dvc/stage" not in meta
    assert not (repo / "dvc.lock").exists()


def test_under_dvc_repro_the_stage_is_left_to_dvc(toy_repo, monkeypatch):
    repo, dvc, settings = toy_repo
    monkeypatch.setenv("DVC_STAGE", "toy")
    meta = _materialize(toy, dvc, settings)
    assert meta["dvc/stage"].value == "toy" and "dvc/outs" not in meta
    assert not (repo / "dvc.lock").exists()  # dvc repro writes it after the command


# --- dvc.yaml against the Dagster asset graph -----------------------------------------------------


def _assets_by_name():
    from dagster_project.definitions import ASSETS

    return {key.to_user_string(): a for a in ASSETS for key in a.keys}


def _stage_body(stage: dict) -> dict:
    return stage["do"] if "foreach" in stage else stage


def test_every_asset_has_a_dvc_stage():
    missing = sorted(set(_assets_by_name()) - set(DVC_YAML["stages"]))
    assert not missing, f"assets without a stage in dvc.yaml: {missing}"


def test_committed_dvc_yaml_is_the_generated_one():
    """dvc.yaml is generated from the asset graph; a hand edit or a graph change without
    `python -m dagster_project.dvc_stages` fails here."""
    from dagster_project.dvc_stages import current

    assert (PROJECT_ROOT / "dvc.yaml").read_text() == current(), "run: .venv/bin/python -m dagster_project.dvc_stages"


def test_a_stage_depends_on_every_module_its_code_reaches():
    from dagster_project.dvc_stages import code_closure

    dpo = _stage_body(DVC_YAML["stages"]["dpo_checkpoint"])
    # The modules the issue found missing before, and the shared shell and training module.
    for path in ("resources/dpo_collator.py", "resources/training.py", "resources/models.py", "assets/_stage.py", "ground/checkpoints.py"):
        assert path in dpo["deps"], path
    # the base model is one for every version: its folder has no version
    assert "data/queries/${item}" in dpo["deps"] and "data/models" in dpo["deps"]
    assert "embedded.roles.judge" in dpo["params"][0]["pipelines.yaml"]
    # A backend named only as a string in the role registry is still a dependency.
    assert "resources/offline_llm.py" in code_closure("resources.roles")
    for name, stage in DVC_YAML["stages"].items():
        body = _stage_body(stage)
        module = _assets_by_name()[name].metadata_by_key[_assets_by_name()[name].key]["safevid/module"]
        assert set(code_closure(module)) <= set(body["deps"]), name


def test_generation_follows_the_graph(tmp_path):
    """A stage whose code imports one more module, or whose spec reads one more section, gets it in dvc.yaml."""
    from dagster_project.dvc_stages import generate
    from dagster_project.definitions import ASSETS

    text = generate(ASSETS, ["safevid-v1", "other"])
    doc = yaml.safe_load(text)
    assert doc["vars"][0]["taxonomy_versions"] == ["safevid-v1", "other"]
    assert text != (PROJECT_ROOT / "dvc.yaml").read_text()  # so the drift test above can fail


def test_every_params_key_of_dvc_yaml_is_in_pipelines_yaml():
    """DVC refuses to commit a stage whose params key the file lacks (a section left to defaults)."""
    raw = yaml.safe_load((PROJECT_ROOT / "pipelines.yaml").read_text())
    for name, stage in DVC_YAML["stages"].items():
        for key in (_stage_body(stage).get("params") or [{}])[0].get("pipelines.yaml", []):
            value = raw
            for part in key.split("."):
                assert isinstance(value, dict) and part in value, f"stage {name}: params key {key} is not in pipelines.yaml"
                value = value[part]


def test_partitioned_stages_cover_every_taxonomy_version():
    assert DVC_YAML["vars"][0]["taxonomy_versions"] == taxonomy_versions()


@pytest.mark.parametrize("name", sorted(DVC_YAML["stages"]))
def test_dvc_stage_materializes_its_asset_through_dagster(name):
    assets = _assets_by_name()
    if name not in assets:
        pytest.skip(f"asset {name} is not in the code location yet")
    asset, stage = assets[name], DVC_YAML["stages"][name]
    body = _stage_body(stage)
    partitioned = asset.partitions_def is not None
    assert ("foreach" in stage) == partitioned, "partitioned assets get one stage per taxonomy version"
    cmd = body["cmd"]
    select = f".venv/bin/dagster asset materialize -m dagster_project.definitions --select {name}"
    assert select in cmd
    assert cmd.startswith("${instance} ${item} &&" if partitioned else "${instance} &&")
    assert cmd.endswith("--partition ${item}") == partitioned
    module = asset.metadata_by_key[asset.key]["safevid/module"]
    code = Path(inspect.getsourcefile(importlib.import_module(module))).resolve().relative_to(PROJECT_ROOT)
    assert str(code) in body["deps"], f"stage {name} must depend on its code {code}"
    assert "assets/_stage.py" in body["deps"] and "ground/settings.py" in body["deps"]
    for dep in body["deps"]:
        if not dep.startswith("data/"):
            assert (PROJECT_ROOT / dep.replace("${item}", "safevid-v1")).exists(), f"stage {name}: dep {dep} does not exist"
    assert body["outs"] and all(next(iter(o)).startswith("data/") for o in body["outs"])


# --- dvc repro and a remote, in a temporary copy of the repository --------------------------------


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory, dvc_bin):
    """The working tree (tracked and untracked, not ignored) in a temp dir, with .venv linked in."""
    root = copy_checkout(tmp_path_factory.mktemp("repo"))
    doc = yaml.safe_load((root / "pipelines.yaml").read_text())
    doc["embedded"]["manifest"]["synthetic_clips"] = 6  # keep the render short
    (root / "pipelines.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


def _dvc(root: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"DAGSTER_HOME", "SAFEVID_CONFIG", "SAFEVID_PROFILE", "MLFLOW_TRACKING_URI", "DVC_STAGE"}}
    env.update(PYTHONPATH=str(root), DVC_NO_ANALYTICS="1")  # the copy's code, so its PROJECT_ROOT is the copy
    proc = subprocess.run([str(root / ".venv-dvc" / "bin" / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


FIRST_STAGES = ("video_manifest", "safety_taxonomy@safevid-v1")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dvc_repro_materializes_first_stages_through_dagster(repo_copy):
    root = repo_copy
    out = _dvc(root, "repro", *FIRST_STAGES).stdout
    assert "dagster asset materialize" in out
    assert (root / "data" / "manifest" / "manifest.parquet").exists()
    assert (root / "data" / "taxonomy" / "safevid-v1" / "subcategories.parquet").exists()
    assert len(list((root / "data" / "corpus").glob("recipe-*/*.mp4"))) == 6
    assert _dvc(root, "status", "--json", *FIRST_STAGES).stdout.strip() == "{}"
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert lock["video_manifest"]["params"]["pipelines.yaml"]["embedded.manifest"]["synthetic_clips"] == 6
    assert {o["path"] for o in lock["safety_taxonomy@safevid-v1"]["outs"]} == {"data/taxonomy/safevid-v1"}
    # The runs went through Dagster, into the instance the UI reads (.dagster/ of the copy).
    with dg.DagsterInstance.from_config(str(root / ".dagster")) as instance:
        assert instance.get_latest_materialization_event(dg.AssetKey("video_manifest")) is not None
        assert instance.get_dynamic_partitions("taxonomy_version") == ["safevid-v1"]
        assert instance.get_materialized_partitions(dg.AssetKey("safety_taxonomy")) == {"safevid-v1"}
    # Nothing changed: repro runs nothing.
    assert "didn't change, skipping" in _dvc(root, "repro", *FIRST_STAGES).stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_push_and_pull_through_a_local_remote(repo_copy, tmp_path):
    root = repo_copy
    if not (root / "dvc.lock").exists():
        _dvc(root, "repro", *FIRST_STAGES)
    before = _tree_hashes(root / "data")
    _dvc(root, "remote", "add", "--local", "-f", "-d", "store", str(tmp_path / "remote"))
    _dvc(root, "push", *FIRST_STAGES)
    assert any((tmp_path / "remote").rglob("*"))

    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    _dvc(root, "pull", *FIRST_STAGES)
    assert _tree_hashes(root / "data") == before
    assert _dvc(root, "status", "--json", *FIRST_STAGES).stdout.strip() == "{}"
