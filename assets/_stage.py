"""What every stage does around its own compute, written once: the stage shell.

A stage module declares its StageSpec (ground/catalog.py) and one function
`def <asset>(st: Stage, <upstream asset>: StageData, ...) -> dg.MaterializeResult`.
`stage_asset` turns it into a Dagster asset whose inputs are those parameters (so Dagster's
lineage is the real one), opens the stage's MLflow run around the call (params: the settings
sections the spec names; inputs: the upstream tables), and `Stage.finish` ends it the same way for
every stage: metrics and check outcomes into MLflow, DVC lineage, the MaterializeResult.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import dagster as dg
import pandas as pd

from assets.common import display_metadata, markdown_table
from ground.catalog import StageData, StageSpec, stage_folder
from ground.settings import Settings

# One partition per taxonomy version (a file name under taxonomies/).
taxonomy_partitions = dg.DynamicPartitionsDefinition(name="taxonomy_version")
RESOURCES = {"settings", "mlflow", "dvc"}
MODULE_KEY = "safevid/module"
# A stage that measures its upstream's result (judge agreement, an ablation) rather than building
# on it: the upstream checks named here may have failed, and it runs in a run after its upstream's.
MEASURES_KEY = "safevid/measures_despite"


class Stage:
    """One materialization of a stage: its settings, partition, output folder and MLflow run."""

    def __init__(self, context: dg.AssetExecutionContext, spec: StageSpec):
        self.context = context
        self.log = context.log
        self.name = context.asset_key.to_user_string()
        self.settings: Settings = context.resources.settings
        self.version: str | None = context.partition_key if context.has_partition_key else None
        self.out = StageData(self.name, spec, stage_folder(self.settings.path(), spec, self.version), self.version)
        self.run = None
        from resources.llm_client import usage_snapshot

        self._usage_before = usage_snapshot()  # what the endpoint roles had done before this stage

    def path(self, name: str) -> Path:
        path = self.out.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_table(self, df: pd.DataFrame, name: str) -> Path:
        """A Parquet output, written atomically; partitioned stages stamp the taxonomy version on every row."""
        if self.version is not None:
            df = df.assign(taxonomy_version=self.version)
        path = self.path(name)
        tmp = path.with_suffix(".tmp")
        df.to_parquet(tmp, index=False)
        tmp.replace(path)  # a crash never leaves half a table behind
        return path

    def log_params(self, params: dict) -> None:
        """Params of the stage's run: paths relative to the data folder (or the project root), other
        absolute paths as `path.<key>` tags (resources.tracking.split_params)."""
        import mlflow

        from resources.tracking import split_params

        values, path_tags = split_params(params, self.settings.path())
        if values:
            mlflow.log_params(values)
        if path_tags:
            mlflow.set_tags(path_tags)

    def progress(self, what: str, unit: str = "it") -> Callable[..., None]:
        """progress(done, total, loss=None) for a long loop: a line with rate and ETA every few seconds."""
        from resources.progress import ProgressReporter

        return ProgressReporter(what, self.log.info, unit=unit)

    def llm_usage(self) -> dict[str, dict]:
        """Per endpoint role: items asked, requests sent, cache hits and cold_share, in this stage."""
        from resources.llm_client import usage_since

        return usage_since(self._usage_before)

    def finish(
        self, metadata: dict, checks: Sequence[dg.AssetCheckResult] = (), metrics: dict | None = None
    ) -> dg.MaterializeResult:
        """Metrics and check outcomes into the MLflow run, outputs into DVC, everything into Dagster
        (floats rounded for display there: the exact values are the tables' and the metrics')."""
        import mlflow

        usage = self.llm_usage()
        metrics = {**(metrics or {}), **{f"llm_stage.{role}.{k}": v for role, u in usage.items() for k, v in u.items()}}
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)}
        if numeric:
            mlflow.log_metrics(numeric)
        for check in checks:
            mlflow.set_tag(f"check.{check.check_name}", str(check.passed))
        from resources.dvc import record_outputs

        # Shared folders are declared outputs, and `dvc commit` fails on a missing one: the rendered
        # corpus's folder does not exist when the clips are the user's own.
        for shared in self.out.spec.shared:
            self.settings.path(shared).mkdir(parents=True, exist_ok=True)
        tracker, dvc = self.context.resources.mlflow, self.context.resources.dvc
        lineage = record_outputs(self.context, dvc, self.name)
        outs = lineage.get("dvc/outs")
        if outs is not None:
            tracker.tag(self.run.info.run_id, {"dvc.stage": lineage["dvc/stage"], "dvc.outs": json.dumps(outs.data)})
        run = {"mlflow_run": dg.MetadataValue.url(tracker.run_url(self.run)), "mlflow_run_id": self.run.info.run_id}
        meta = {**display_metadata(metadata), **run, **lineage, **usage_metadata(usage)}
        return dg.MaterializeResult(metadata=meta, check_results=list(checks))


USAGE_COLUMNS = ("items", "requests", "cache_hits", "retries", "failures", "cold_share")


def usage_metadata(usage: dict[str, dict]) -> dict:
    """What the stage cost at the endpoints, per role, for the UI: a re-run on a new taxonomy version
    should send requests only for what changed (cold_share 1.0: as costly as an empty cache)."""
    if not usage:
        return {}
    rows = pd.DataFrame([{"role": r, **{k: u[k] for k in USAGE_COLUMNS}} for r, u in sorted(usage.items())])
    return {
        "llm_requests": int(rows["requests"].sum()),
        "llm_cache_hits": int(rows["cache_hits"].sum()),
        "llm_usage": dg.MetadataValue.md(markdown_table(rows)),
    }


def _input_tables(inputs: dict) -> dict[str, Path]:
    """Every Parquet table of the upstream outputs, for MLflow's dataset inputs."""
    tables = {}
    for data in inputs.values():
        for d in data.values() if isinstance(data, dict) else [data]:
            for f in d.spec.files:
                if f.endswith(".parquet") and (d.folder / f).exists():
                    tables[f"{d.asset}.{f.removesuffix('.parquet')}"] = d.folder / f
    return tables


# The project's own loggers (batch summaries, "asking again", retries): shown in the run's log.
PROJECT_LOGGERS = ("resources", "assets", "ground")


class _ToDagsterLog(logging.Handler):
    def __init__(self, log):
        super().__init__(logging.INFO)
        self.dagster_log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= logging.ERROR else "warning" if record.levelno >= logging.WARNING else "info"
        getattr(self.dagster_log, level)(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def project_logs_to(context) -> Iterator[None]:
    """The project's loggers into the step's log, unless the instance already manages them
    (the project's dagster.yaml: dagster_project/instance.py), which would show every line twice."""
    if set(PROJECT_LOGGERS) <= set(context.instance.managed_python_loggers or []):
        yield
        return
    handler = _ToDagsterLog(context.log)
    loggers = [logging.getLogger(n) for n in PROJECT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


# Every stage asset made in this process: (partitioned, its checks). A job of a few selected stages
# sees the others as plain sources, without their checks.
STAGES: dict[str, tuple[bool, tuple[str, ...]]] = {}
# Per stage, the upstream checks whose failure it reads through (stage_asset's `measures_despite`).
MEASURES: dict[str, tuple[str, ...]] = {}


class UpstreamNotReady(RuntimeError):
    """An upstream's data is not what its checks passed: building on it would score a stale table."""


def upstream_problems(context: dg.AssetExecutionContext) -> list[str]:
    """Why an upstream's current data is unfit to build on: a check of its latest materialization
    failed, or its latest attempt failed after it (so its files may be older than its code). Within
    one run Dagster's blocking checks already stop the stage; this covers a stage run on its own later."""
    from dagster._core.event_api import PartitionKeyFilter
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

    instance = context.instance
    partition = context.partition_key if context.has_partition_key else None
    problems = []
    for dep in sorted(context.assets_def.asset_deps[context.asset_key], key=lambda k: k.to_user_string()):
        if dep.to_user_string() not in STAGES:
            continue  # not a stage of this process (a test's stand-in)
        partitioned, checks = STAGES[dep.to_user_string()]
        checks = tuple(c for c in checks if c not in MEASURES.get(context.asset_key.to_user_string(), ()))
        if partitioned and partition is None:
            continue  # a stage across versions reads every version
        key = partition if partitioned else None
        name = dep.to_user_string() + (f" [{key}]" if key else "")
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dep, c) for c in checks], partition_filter=PartitionKeyFilter(key=key)
        ) if checks else {}
        failed = sorted(k.name for k, r in latest.items() if r.status == AssetCheckExecutionRecordStatus.FAILED)
        if failed:
            problems.append(f"{name}: its latest materialization failed its check(s) {failed}")
            continue
        planned = instance.get_latest_planned_materialization_info(dep, key)
        done = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dep, asset_partitions=[key] if key else None), limit=1)
        done_run = done.records[0].run_id if done.records else None
        if planned is not None and planned.run_id not in (done_run, context.run_id):
            run = instance.get_run_by_id(planned.run_id)
            if run is not None and run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
                problems.append(f"{name}: its latest materialization (run {planned.run_id[:8]}) failed")
    return problems


@contextlib.contextmanager
def open_stage(context: dg.AssetExecutionContext, spec: StageSpec, inputs: dict) -> Iterator[Stage]:
    from resources.llm_client import set_run_scope

    problems = upstream_problems(context)
    if problems:
        raise UpstreamNotReady(
            f"{context.asset_key.to_user_string()} would read data its upstream's checks did not pass: {'; '.join(problems)}. "
            "Materialize that upstream again (`python -m dagster_project.run` does it in order) and fix what its check says"
        )
    st = Stage(context, spec)
    params = st.settings.flat(*spec.params) if spec.params else {}
    tags = {"taxonomy_version": st.version} if st.version else {}
    set_run_scope(context.run_id)
    try:
        with project_logs_to(context), context.resources.mlflow.run(
            context, st.settings.profile, params, tags=tags, inputs=_input_tables(inputs)
        ) as run:
            st.run = run
            yield st
    finally:
        set_run_scope(None)


def stage_asset(
    spec: StageSpec,
    *,
    group: str,
    partitioned: bool = False,
    checks: dict[str, str] | None = None,
    code_version: str = "1",
    more_ins: Sequence[str] = (),
    kinds: set[str] | None = None,
    op_tags: dict | None = None,
    measures_despite: Sequence[str] = (),
):
    """Make `fn(st, **upstream)` a Dagster asset; `checks` maps each blocking check to what it guards;
    `op_tags` are the step's (a GPU step's `dagster-k8s/config`, resources/k8s.py). `measures_despite`
    names upstream checks the stage reads through: it measures that result (a failed alignment gate
    is when judge agreement matters most), so it runs in a run of its own after its upstream's,
    where Dagster's blocking checks do not stop it, and upstream_problems does not count those."""

    def decorate(fn):
        name = fn.__name__
        STAGES[name] = (partitioned, tuple(checks or {}))
        MEASURES[name] = tuple(measures_despite)
        upstream = [p for p, v in inspect.signature(fn).parameters.items() if v.kind is v.POSITIONAL_OR_KEYWORD][1:]

        @dg.asset(
            name=name,
            description=inspect.getdoc(fn),
            ins={u: dg.AssetIn(u) for u in [*upstream, *more_ins]},
            partitions_def=taxonomy_partitions if partitioned else None,
            group_name=group,
            code_version=code_version,
            metadata={**spec.metadata(), MODULE_KEY: fn.__module__, **({MEASURES_KEY: list(measures_despite)} if measures_despite else {})},
            check_specs=[
                dg.AssetCheckSpec(check, asset=name, blocking=True, description=text) for check, text in (checks or {}).items()
            ],
            required_resource_keys=RESOURCES,
            kinds=kinds,
            op_tags=op_tags,
        )
        def _asset(context, **inputs):  # no annotation: this module postpones them (future import)
            with open_stage(context, spec, inputs) as st:
                return fn(st, **inputs)

        return _asset

    return decorate
