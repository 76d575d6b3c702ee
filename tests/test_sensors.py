"""The taxonomy-file sensor, the jobs and the nightly schedule."""
import hashlib
import json
import shutil

import dagster as dg
import pytest

from dagster_project.definitions import ASSETS, defs
from assets._stage import taxonomy_partitions
from assets.taxonomy import TAXONOMY_DIR
from dagster_project.sensors import (
    CURATION_JOB,
    EXPERIMENTS_JOB,
    TAXONOMY_JOB,
    build_automation,
    measuring,
    split_by_partitioning,
    taxonomy_files_sensor,
)

V1 = TAXONOMY_DIR / "safevid-v1.yaml"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def folder(tmp_path):
    shutil.copy(V1, tmp_path / "safevid-v1.yaml")
    return tmp_path


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as inst:
        inst.add_dynamic_partitions(taxonomy_partitions.name, ["safevid-v1"])
        yield inst


def _sensor(folder):
    automation = build_automation(ASSETS, taxonomy_dir=folder)
    return automation["sensors"][0], split_by_partitioning(ASSETS)


def _tick(sensor, instance, cursor):
    return sensor(dg.build_sensor_context(instance=instance, cursor=cursor))


def _write_v2(folder):
    text = V1.read_text().replace("version: safevid-v1", "version: safevid-v2")
    assert "safevid-v2" in text
    (folder / "safevid-v2.yaml").write_text(text)


def test_new_taxonomy_file_adds_partition_and_requests_only_partitioned_assets(folder, instance):
    sensor, (plain, by_taxonomy) = _sensor(folder)
    assert by_taxonomy and dg.AssetKey("safety_taxonomy") in by_taxonomy
    assert dg.AssetKey("video_manifest") in plain
    _write_v2(folder)

    result = _tick(sensor, instance, json.dumps({"safevid-v1": _sha(folder / "safevid-v1.yaml")}))

    [add] = result.dynamic_partitions_requests
    assert add.partitions_def_name == "taxonomy_version" and list(add.partition_keys) == ["safevid-v2"]
    [request] = result.run_requests
    assert request.partition_key == "safevid-v2"
    assert set(request.asset_selection) == set(by_taxonomy)
    assert not set(request.asset_selection) & set(plain)
    assert request.tags["safevid/reason"] == "new"

    # The daemon applies the partition request; a tick without changes then requests nothing.
    instance.add_dynamic_partitions(taxonomy_partitions.name, list(add.partition_keys))
    again = _tick(sensor, instance, result.cursor)
    assert not again.run_requests and not again.dynamic_partitions_requests
    assert again.cursor == result.cursor


def test_changed_taxonomy_file_requests_its_partition_again(folder, instance):
    sensor, _ = _sensor(folder)
    first = _tick(sensor, instance, None)  # partition exists already: seeds the cursor only
    assert not first.run_requests

    path = folder / "safevid-v1.yaml"
    path.write_text(path.read_text() + "\n# edited\n")
    result = _tick(sensor, instance, first.cursor)
    [request] = result.run_requests
    assert request.partition_key == "safevid-v1" and request.tags["safevid/reason"] == "changed"
    assert not result.dynamic_partitions_requests  # the partition is there already


def test_invalid_taxonomy_file_is_skipped_until_it_changes(folder, instance):
    sensor, _ = _sensor(folder)
    (folder / "broken.yaml").write_text("version: broken\nprinciples: []\n")
    cursor = json.dumps({"safevid-v1": _sha(folder / "safevid-v1.yaml")})
    result = _tick(sensor, instance, cursor)
    assert not result.run_requests and not result.dynamic_partitions_requests
    assert json.loads(result.cursor)["broken"].startswith("invalid:")


def test_sensor_result_is_accepted_by_dagster(folder):
    """evaluate_tick resolves the run requests against the job and the pending partition, as the daemon does."""
    _, by_taxonomy = split_by_partitioning(ASSETS)
    automation = build_automation(ASSETS, taxonomy_dir=folder)
    sensor = automation["sensors"][0]
    _write_v2(folder)
    job_defs = dg.Definitions(assets=ASSETS, resources=defs.resources, **automation)
    with dg.instance_for_test() as instance:  # a persistent instance: resolving needs its ref
        instance.add_dynamic_partitions(taxonomy_partitions.name, ["safevid-v1"])
        context = dg.build_sensor_context(instance=instance, definitions=job_defs, instance_ref=instance.get_ref())
        data = sensor.evaluate_tick(context)
    [request] = data.run_requests
    assert request.partition_key == "safevid-v2"
    assert set(request.asset_selection) == set(by_taxonomy)
    assert request.tags["dagster/partition"] == "safevid-v2"


def test_jobs_and_schedule_select_by_partitioning():
    plain, by_taxonomy = split_by_partitioning(ASSETS)
    curation = defs.resolve_job_def(CURATION_JOB)
    taxonomy = defs.resolve_job_def(TAXONOMY_JOB)
    assert set(curation.asset_layer.executable_asset_keys) == set(plain)
    assert set(taxonomy.asset_layer.executable_asset_keys) == set(by_taxonomy)
    assert taxonomy.partitions_def == taxonomy_partitions
    schedule = defs.resolve_schedule_def("nightly_curation_schedule")
    assert schedule.cron_schedule == "0 2 * * *" and schedule.job_name == CURATION_JOB
    assert defs.resolve_sensor_def("taxonomy_files_sensor").job_name == TAXONOMY_JOB


def test_register_cli_adds_partitions_to_the_instance(tmp_path, monkeypatch):
    from dagster_project import sensors

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert sensors.main(["register", "safevid-v1"]) == 0
    assert sensors.main(["register", "safevid-v1"]) == 0  # idempotent
    assert sensors.main(["register", "no-such-version"]) == 2
    with dg.DagsterInstance.from_config(str(tmp_path)) as inst:
        assert inst.get_dynamic_partitions(taxonomy_partitions.name) == ["safevid-v1"]


def test_a_new_version_gets_its_dvc_stages_before_its_run(folder, instance, monkeypatch):
    """dvc.yaml's stage list follows taxonomies/: the sensor writes it when it adds a version, so the
    run's `dvc commit` finds the version's stages (an untracked version is an error there)."""
    from dagster_project import dvc_stages, sensors

    written = []
    monkeypatch.setattr(sensors, "TAXONOMY_DIR", folder)  # the folder watched is the project's
    monkeypatch.setattr(dvc_stages, "main", lambda: written.append(sorted(p.name for p in folder.glob("*.yaml"))))
    sensor, _ = _sensor(folder)
    cursor = json.dumps({"safevid-v1": _sha(folder / "safevid-v1.yaml")})
    assert not _tick(sensor, instance, cursor).run_requests and written == []  # nothing new: dvc.yaml left alone
    _write_v2(folder)
    result = _tick(sensor, instance, cursor)
    assert [r.partition_key for r in result.run_requests] == ["safevid-v2"]
    assert written == [["safevid-v1.yaml", "safevid-v2.yaml"]]


def test_generated_dvc_yaml_has_stages_for_every_taxonomy_file():
    import yaml

    from dagster_project.dvc_stages import generate

    doc = yaml.safe_load(generate(ASSETS, ["safevid-v1", "dropped-in"]))
    assert doc["vars"][0] == {"taxonomy_versions": ["safevid-v1", "dropped-in"]}
    assert "foreach" in doc["stages"]["adversarial_queries"] and "foreach" not in doc["stages"]["target_model"]


def test_the_measuring_stages_are_a_job_of_their_own_requested_however_the_version_run_ended():
    measured = {k.to_user_string() for k in measuring(ASSETS)}
    assert measured == {"judge_agreement", "data_scale_ablation"}
    _, by_taxonomy = split_by_partitioning(ASSETS)
    assert not measured & {k.to_user_string() for k in by_taxonomy}
    experiments = defs.resolve_job_def(EXPERIMENTS_JOB)
    assert {k.to_user_string() for k in experiments.asset_layer.executable_asset_keys} == measured
    for status in ("success", "failure"):
        sensor = defs.resolve_sensor_def(f"measure_after_taxonomy_run_{status}")
        assert sensor.job_name == EXPERIMENTS_JOB and sensor.default_status == dg.DefaultSensorStatus.RUNNING
