"""Automation: jobs, the taxonomy-file sensor and the nightly curation schedule.

- `taxonomy_job`: the assets partitioned by taxonomy version, for one partition.
- `curation_job`: the unpartitioned assets (manifest → curated clips → descriptions, and the base
  model, which is the same for every taxonomy version);
  `nightly_curation_schedule` runs it at 02:00 (stopped by default: turn it on in the UI).
- `experiments_job`: the stages that measure one version's scores (judge agreement, data scale),
  requested by `measure_after_taxonomy_run_success` / `_failure` when a `taxonomy_job` run ends:
  they run whether or not its alignment gates passed.
- `comparison_job`: assets that read every version (the comparison), requested by
  `compare_after_taxonomy_run` whenever a `taxonomy_job` run succeeds.
- `taxonomy_files_sensor` watches taxonomies/*.yaml: a new, valid file adds its partition and
  requests `taxonomy_job` for it; a file whose content changed (sha256 kept in the cursor) requests
  its partition again. On its first tick, files whose partition already exists (e.g. made by
  `make pipeline`) only seed the cursor. An invalid file is logged and skipped until it changes.
  A new version's stages are written into dvc.yaml (dagster_project/dvc_stages.py) before its run,
  so DVC tracks it with no manual step.

`python -m dagster_project.sensors register [VERSION ...]` adds partitions to the instance in
$DAGSTER_HOME (default .dagster/) without the daemon; dvc.yaml's stages call it before
`dagster asset materialize --partition`, which refuses a partition the instance does not know.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Sequence

import dagster as dg

from assets._stage import MEASURES_KEY, taxonomy_partitions
from assets.taxonomy import TAXONOMY_DIR
from dagster_project.instance import project_instance
from ground.taxonomy import TaxonomyError, load_taxonomy

TAXONOMY_JOB = "taxonomy_job"
CURATION_JOB = "curation_job"
COMPARISON_JOB = "comparison_job"
EXPERIMENTS_JOB = "experiments_job"
INVALID = "invalid:"


def after_partitions(assets: Sequence[dg.AssetsDefinition]) -> list[dg.AssetKey]:
    """Unpartitioned assets that read every taxonomy version (the comparison): they run last."""
    partitioned = {k for a in assets if a.partitions_def is not None for k in a.keys}
    return sorted(
        k for a in assets if a.partitions_def is None for k in a.keys if set(a.asset_deps.get(k, ())) & partitioned
    )


def measuring(assets: Sequence[dg.AssetsDefinition]) -> list[dg.AssetKey]:
    """Partitioned stages that measure their upstream's result despite its failed checks (judge
    agreement, the data-scale ablation; assets/_stage.py MEASURES_KEY): a run of their own, after."""
    return sorted(k for a in assets if a.partitions_def == taxonomy_partitions for k in a.keys
                  if MEASURES_KEY in a.specs_by_key[k].metadata)


def split_by_partitioning(assets: Sequence[dg.AssetsDefinition]) -> tuple[list[dg.AssetKey], list[dg.AssetKey]]:
    """(unpartitioned keys upstream of the taxonomy, keys partitioned by taxonomy version but the measuring ones)."""
    late, measured = set(after_partitions(assets)), set(measuring(assets))
    plain, by_taxonomy = [], []
    for a in assets:
        if a.partitions_def is None:
            plain.extend(k for k in a.keys if k not in late)
        elif a.partitions_def == taxonomy_partitions:
            by_taxonomy.extend(k for k in a.keys if k not in measured)
    return sorted(plain), sorted(by_taxonomy)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def taxonomy_files_sensor(
    job, partitioned: Sequence[dg.AssetKey], folder: Path = TAXONOMY_DIR, name: str = "taxonomy_files_sensor"
) -> dg.SensorDefinition:
    """The sensor over `folder`; tests pass a temporary folder."""
    folder = Path(folder)
    selection = list(partitioned)

    @dg.sensor(
        name=name,
        job=job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"New or changed taxonomy files in {folder} → partitions of {TAXONOMY_JOB} and runs for them.",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        first_tick = context.cursor is None
        known: dict[str, str] = json.loads(context.cursor or "{}")
        existing = set(context.instance.get_dynamic_partitions(taxonomy_partitions.name))
        seen: dict[str, str] = {}
        to_add: list[str] = []
        requests: list[dg.RunRequest] = []
        for path in sorted(folder.glob("*.yaml")):
            version, digest = path.stem, _digest(path)
            before = known.get(version)
            if before == INVALID + digest or (before == digest and version in existing):
                seen[version] = before
                continue
            if first_tick and version in existing:
                seen[version] = digest  # made before the sensor ran: remember it, run nothing
                continue
            try:
                load_taxonomy(path)
            except TaxonomyError as exc:
                context.log.warning(f"skipping {path.name} until it changes: {exc}")
                seen[version] = INVALID + digest
                continue
            seen[version] = digest
            if version not in existing:
                to_add.append(version)
            reason = "new" if before is None else "changed"
            context.log.info(f"{path.name} is {reason}: requesting {TAXONOMY_JOB} for partition {version}")
            requests.append(
                dg.RunRequest(
                    partition_key=version,
                    asset_selection=selection,
                    tags={"safevid/taxonomy_file": path.name, "safevid/taxonomy_sha256": digest, "safevid/reason": reason},
                )
            )
        cursor = json.dumps(seen, sort_keys=True)
        if not requests:
            return dg.SensorResult(skip_reason="no new or changed taxonomy file", cursor=cursor)
        if to_add and folder.resolve() == TAXONOMY_DIR.resolve():
            from dagster_project import dvc_stages

            dvc_stages.main()  # the new versions' DVC stages, before their runs record into them
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[taxonomy_partitions.build_add_request(to_add)] if to_add else [],
            cursor=cursor,
        )

    return _sensor


def measure_after(taxonomy_job, experiments_job, status: dg.DagsterRunStatus):
    """A sensor requesting the experiments for the partition of each taxonomy_job run that ends in `status`."""

    @dg.run_status_sensor(
        name=f"measure_after_taxonomy_run_{status.value.lower()}",
        run_status=status,
        monitored_jobs=[taxonomy_job],
        request_job=experiments_job,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def _sensor(context: dg.RunStatusSensorContext):
        partition = context.dagster_run.tags.get("dagster/partition")
        return dg.RunRequest(run_key=context.dagster_run.run_id, partition_key=partition) if partition else None

    return _sensor


def build_automation(assets: Sequence[dg.AssetsDefinition], taxonomy_dir: Path = TAXONOMY_DIR) -> dict:
    """Jobs, sensors and schedules for `dg.Definitions(**build_automation(assets))`."""
    plain, by_taxonomy = split_by_partitioning(assets)
    curation_job = dg.define_asset_job(
        CURATION_JOB,
        selection=dg.AssetSelection.assets(*plain),
        description="The unpartitioned assets: video manifest, curated clips, descriptions, the base model.",
    )
    taxonomy_job = dg.define_asset_job(
        TAXONOMY_JOB,
        selection=dg.AssetSelection.assets(*by_taxonomy),
        partitions_def=taxonomy_partitions,
        description="Every asset partitioned by taxonomy version, for one version.",
    )
    nightly = dg.ScheduleDefinition(
        name="nightly_curation_schedule",
        job=curation_job,
        cron_schedule="0 2 * * *",
        description="Re-curate every night at 02:00 (picks up new clips in the manifest source).",
    )
    jobs, sensors = [curation_job, taxonomy_job], [taxonomy_files_sensor(taxonomy_job, by_taxonomy, taxonomy_dir)]
    late = after_partitions(assets)
    if late:
        comparison_job = dg.define_asset_job(
            COMPARISON_JOB,
            selection=dg.AssetSelection.assets(*late),
            description="Assets that compare every taxonomy version; run after each taxonomy_job success.",
        )

        @dg.run_status_sensor(
            name="compare_after_taxonomy_run",
            run_status=dg.DagsterRunStatus.SUCCESS,
            monitored_jobs=[taxonomy_job],
            request_job=comparison_job,
            default_status=dg.DefaultSensorStatus.RUNNING,
        )
        def compare_after_taxonomy_run(context: dg.RunStatusSensorContext):
            return dg.RunRequest(run_key=context.dagster_run.run_id)

        jobs.append(comparison_job)
        sensors.append(compare_after_taxonomy_run)
    measured = measuring(assets)
    if measured:
        experiments_job = dg.define_asset_job(
            EXPERIMENTS_JOB,
            selection=dg.AssetSelection.assets(*measured),
            partitions_def=taxonomy_partitions,
            description="Stages that measure a version's scores (judge agreement, data scale), after its taxonomy_job run, "
            "whether or not the alignment gates passed.",
        )
        jobs.append(experiments_job)
        sensors += [measure_after(taxonomy_job, experiments_job, status) for status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)]
    return {"jobs": jobs, "sensors": sensors, "schedules": [nightly]}


def register(versions: Sequence[str]) -> list[str]:
    """Add taxonomy partitions to the instance in $DAGSTER_HOME (default .dagster/); returns those added."""
    instance = project_instance()
    existing = set(instance.get_dynamic_partitions(taxonomy_partitions.name))
    new = [v for v in dict.fromkeys(versions) if v not in existing]
    if new:
        instance.add_dynamic_partitions(taxonomy_partitions.name, new)
    return new


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "register":
        print("usage: python -m dagster_project.sensors register [TAXONOMY_VERSION ...]", file=sys.stderr)
        return 2
    known = set(p.stem for p in TAXONOMY_DIR.glob("*.yaml"))
    unknown = [v for v in args[1:] if v not in known]
    if unknown:
        print(f"no taxonomy file for {unknown} in {TAXONOMY_DIR}; have: {sorted(known)}", file=sys.stderr)
        return 2
    added = register(args[1:])
    if added:
        print(f"added taxonomy partitions: {', '.join(added)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
