"""`python -m dagster_project.run`: materialize every asset of the pipeline, then print the result.

The same assets `dagster dev` shows; this runs them in process against the project's Dagster
instance (.dagster/), one run for the unpartitioned stages and one per taxonomy version. The console
(stderr) gets one compact line per message, `HH:MM:SS <asset> [<partition>] | <message>`; stdout
gets the time per stage (from the runs' step events) and the summary.
"""
import argparse
import logging
import os
import sys
import uuid
from typing import Iterable

from dagster_project.instance import project_instance, taxonomy_versions
from ground.settings import load_settings

# The name dg.materialize gives its runs: the UI shows them as plain materializations.
JOB = "__ephemeral_asset_job__"
STEP_EVENTS = {"STEP_START", "STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED", "STEP_UP_FOR_RETRY"}


class ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS <step> [<partition>] | <message>`: Dagster's default line repeats the job name and
    run id on every line; here the run id shows only on the run's own lines."""

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None) or {}
        where = meta.get("step_key") or (f"run {meta['run_id'][:8]}" if meta.get("run_id") else record.name)
        partition = (meta.get("job_tags") or {}).get("dagster/partition")
        if partition:
            where += f" [{partition}]"
        level = "" if record.levelno < logging.WARNING else f"{record.levelname} "
        line = f"{self.formatTime(record, '%H:%M:%S')} {where} | {level}{meta.get('orig_message', record.getMessage())}"
        error = getattr(getattr(meta.get("dagster_event"), "event_specific_data", None), "error", None)
        return line + (f"\n{error.to_string()}" if error is not None else "")


class ConsoleFilter(logging.Filter):
    """Messages at `level` and up, and the run and step start / success events, which Dagster logs at
    DEBUG: without them the console never says which stage starts, nor how long one took."""

    SHOWN = {"RUN_START", "RUN_SUCCESS", "STEP_START", "STEP_SUCCESS"}

    def __init__(self, level: int | str = logging.INFO):
        super().__init__()
        self.level = logging.getLevelName(level) if isinstance(level, str) else level

    def filter(self, record: logging.LogRecord) -> bool:
        event = (getattr(record, "dagster_meta", None) or {}).get("dagster_event")
        return record.levelno >= self.level or getattr(event, "event_type_value", None) in self.SHOWN


def console_logger():
    """The run CLI's console: ConsoleFormatter lines on stderr (stdout keeps the results)."""
    import dagster as dg

    @dg.logger(
        config_schema={"log_level": dg.Field(str, is_required=False, default_value="INFO")},
        description="One compact line per log message: time, step [partition] | message.",
    )
    def compact_console(init_context) -> logging.Logger:
        logger = logging.Logger("safevid", level=logging.DEBUG)  # ConsoleFilter applies the level
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(ConsoleFormatter())
        handler.addFilter(ConsoleFilter(init_context.logger_config["log_level"].upper()))
        logger.addHandler(handler)
        return logger

    return compact_console


class RunFailed(RuntimeError):
    """A run of the pipeline failed (a step, or a blocking check such as the alignment gates); the
    console already showed why."""


def _materialize(assets, resources, selection, instance, partition_key=None, tags=None):
    """dg.materialize, with the compact console: dg.materialize takes no loggers, Definitions does.
    A failed step or blocking check fails the run instead of raising, so what passed is recorded."""
    import dagster as dg

    defs = dg.Definitions(
        assets=assets, resources=resources, loggers={"console": console_logger()},
        jobs=[dg.define_asset_job(JOB, selection=selection)],
    )
    # INFO, not Dagster's default DEBUG: a person reads this console.
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    job = defs.resolve_job_def(JOB)
    return job.execute_in_process(run_config=quiet, instance=instance, partition_key=partition_key, tags=tags, raise_on_error=False)


def settings_of(resources: dict):
    """The Settings object the run's assets get: the one tests pass, or the resource's own loading."""
    from ground.settings import Settings, load_settings

    given = resources.get("settings")
    return given if isinstance(given, Settings) else load_settings()


def selected_keys(assets, select: Iterable[str]) -> set:
    """The asset keys a `--select` names: asset names or group names (video_data, evaluation, ...)."""
    wanted, keys = set(select), set()
    for a in assets:
        for key in a.keys:
            if key.to_user_string() in wanted or a.group_names_by_key.get(key) in wanted:
                keys.add(key)
    known = {k.to_user_string() for a in assets for k in a.keys} | {g for a in assets for g in a.group_names_by_key.values()}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"--select names no asset or group: {unknown}; assets and groups: {sorted(known)}")
    return keys


def materialize_all(
    versions: list[str] | None = None, instance=None, resources: dict | None = None, tags: dict | None = None,
    force: bool = False, keep_going: bool = False, select: Iterable[str] | None = None,
) -> list:
    """The stale assets (dagster_project/freshness.py; every one with `force`): the unpartitioned
    ones, each taxonomy version, then those across versions; `tags` go on every run (the run CLI
    finds its runs by them). Returns the runs made; a phase with nothing stale makes none. The
    stages of a failed run that passed are recorded fresh; then RunFailed is raised, unless
    `keep_going` (the later phases run and the failed run is in the list). `select` limits the run to
    those assets or groups (their upstream must be materialized and have passed its checks)."""
    from assets._stage import taxonomy_partitions
    from dagster_project import freshness
    from dagster_project.definitions import defs
    from dagster_project.sensors import after_partitions, measuring, split_by_partitioning

    instance = instance or project_instance()
    versions = versions or taxonomy_versions()
    instance.add_dynamic_partitions(taxonomy_partitions.name, versions)
    assets = list(defs.assets)
    resources = {**defs.resources, **(resources or {})}
    settings = settings_of(resources)
    current = freshness.fingerprints(assets, settings, versions)
    why = {sid: "forced" for sid in current} if force else freshness.stale(assets, settings, versions, freshness.load_record(settings.path()))
    fresh = sorted(set(current) - set(why))
    if fresh:
        print(f"up to date, not materialized again: {', '.join(fresh)}", file=sys.stderr, flush=True)
    unpartitioned, partitioned = split_by_partitioning(assets)
    late = after_partitions(assets)
    # A version's measuring stages in a run after its own, so a failed alignment gate does not stop them.
    measured = measuring(assets)
    phases = [(unpartitioned, None)] + [(keys, v) for v in versions for keys in (partitioned, measured)] + [(late, None)]
    results = []
    chosen = selected_keys(assets, select) if select else None
    for keys, version in phases:
        selection = [k for k in keys if freshness.stage_id(k.to_user_string(), version) in why and (chosen is None or k in chosen)]
        if not selection:
            continue
        results.append(_materialize(assets, resources, selection, instance, partition_key=version, tags=tags))
        freshness.record_run(settings.path(), current, results[-1:])
        if not results[-1].success and not keep_going:
            raise RunFailed(run_failure(results[-1]))
    return results


def run_failure(result) -> str:
    """`run <id> [<partition>] failed in [<steps>]`."""
    version = result.dagster_run.tags.get("dagster/partition")
    failed = [e.step_key for e in result.all_events if e.is_step_failure]
    return f"run {result.run_id[:8]}{f' [{version}]' if version else ''} failed in {failed or 'its setup'}"


def stage_times(events: Iterable[tuple[str | None, str, str, float]]) -> list[dict]:
    """One row per (step, partition) from (partition, step key, event type, timestamp) step events:
    seconds from STEP_START to its success or failure, in the order the steps started."""
    rows: dict[tuple, dict] = {}
    for partition, step, kind, ts in sorted(events, key=lambda e: e[3]):
        row = rows.setdefault((step, partition), {"asset": step, "partition": partition or "-", "start": None, "seconds": None, "status": "started"})
        if kind == "STEP_START":
            row["start"] = ts if row["start"] is None else row["start"]  # a retry keeps the first start
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE"):
            row["seconds"] = round(ts - row["start"], 1) if row["start"] is not None else None
            row["status"] = "success" if kind == "STEP_SUCCESS" else "failed"
        elif kind == "STEP_SKIPPED":
            row["status"] = "skipped"
        elif kind == "STEP_UP_FOR_RETRY":
            row["status"] = "retrying"
    return [{k: v for k, v in r.items() if k != "start"} for r in rows.values()]


def time_table(rows: list[dict]) -> str:
    """The per-stage time table the run CLI prints before its summary."""
    head = ("asset", "partition", "seconds", "status")
    cells = [(r["asset"], r["partition"], "" if r["seconds"] is None else f"{r['seconds']:.1f}", r["status"]) for r in rows]
    total = sum(r["seconds"] or 0 for r in rows)
    cells.append(("total", "", f"{total:.1f}", ""))
    width = [max(len(c[i]) for c in [head, *cells]) for i in range(4)]

    def fmt(c):
        return f"{c[0]:<{width[0]}}  {c[1]:<{width[1]}}  {c[2]:>{width[2]}}  {c[3]}".rstrip()

    return "\n".join(["Time per stage:", fmt(head), *map(fmt, cells[:-1]), "-" * len(fmt(head)), fmt(cells[-1])])


def step_events(instance, tags: dict) -> list[tuple[str | None, str, str, float]]:
    """The step events of every run with these tags, as stage_times reads them."""
    import dagster as dg

    events = []
    for run in instance.get_runs(filters=dg.RunsFilter(tags=tags)):
        partition = run.tags.get("dagster/partition")
        for entry in instance.all_logs(run.run_id):
            kind = entry.dagster_event_type
            if kind is not None and kind.value in STEP_EVENTS:
                events.append((partition, entry.step_key, kind.value, entry.timestamp))
    return events


def summary(settings) -> str:
    """Where to look, and the checkpoints-compared table of every taxonomy version scored."""
    from resources.tracking import default_tracking_uri

    data = settings.path()
    lines = [
        f"\nDone. Outputs: {data}",
        "Browse assets, checks and lineage: DAGSTER_HOME=$PWD/.dagster .venv/bin/dagster dev -p 3300   (then http://127.0.0.1:3300)",
        f"MLflow runs: .venv/bin/mlflow ui --backend-store-uri {default_tracking_uri()}",
    ]
    for table in sorted(data.glob("scores/*/scores.md")):
        lines.append(f"\nCheckpoints compared ({table.parent.name}):\n{table.read_text()}")
    for table in sorted(data.glob("judge_agreement/*/agreement.md")):
        lines.append(f"\nThe benchmark's answers under two judges ({table.parent.name}):\n{table.read_text()}")
    for table in sorted(data.glob("data_scale/*/data_scale.md")):
        lines.append(f"\nDPO by share of the preference pairs ({table.parent.name}):\n{table.read_text()}")
    comparison = data / "comparison" / "comparison.md"
    if comparison.exists():
        lines.append(f"\nTaxonomy versions compared:\n{comparison.read_text()}")
    return "\n".join(lines)


def usage_table(usage: dict[str, dict]) -> str:
    """What the run cost at the endpoints, per role (the stages' own tables are in their metadata)."""
    if not usage:
        return "LLM endpoints: no request and no cache hit in this run (every role offline, or nothing stale)."
    head = ("role", "items", "requests", "cache hits", "share of a cold run")
    cells = [(r, str(u["items"]), str(u["requests"]), str(u["cache_hits"]), f"{u['cold_share']:.0%}") for r, u in sorted(usage.items())]
    width = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    return "\n".join(["LLM endpoints in this run:", *("  ".join(f"{c:<{w}}" for c, w in zip(row, width)).rstrip() for row in [head, *cells])])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--taxonomy", action="append", help="taxonomy version(s); default: every file in taxonomies/")
    parser.add_argument("--force", action="store_true", help="materialize every asset, up to date or not")
    parser.add_argument("--select", help="comma-separated assets or groups to materialize (e.g. video_data); default: every asset")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # datasets' progress bars come out as one long line in a log; the stages report their own progress.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from dagster_project import dvc_stages

    dvc_stages.main()  # a new file in taxonomies/ gets its DVC stages before its run records them
    instance = project_instance()
    tags = {"safevid/cli_run": uuid.uuid4().hex[:12]}
    from resources.llm_client import usage_since, usage_snapshot

    before = usage_snapshot()
    failure = None
    try:
        select = [s.strip() for s in args.select.split(",") if s.strip()] if args.select else None
        # Every version runs even when one fails (a gate of one taxonomy version says nothing of the next);
        # the CLI fails at the end, naming each failed run.
        results = materialize_all(args.taxonomy, instance=instance, tags=tags, force=args.force, select=select, keep_going=True)
        failed = [run_failure(r) for r in results if not r.success]
        if failed:
            failure = RunFailed("; ".join(failed))
    except RunFailed as exc:  # its error is on the console already; no traceback of ours on top
        failure = exc
    finally:  # a failed run (a gate that failed, too) still says where the time went and what it scored
        print("\n" + time_table(stage_times(step_events(instance, tags))), flush=True)
        print("\n" + usage_table(usage_since(before)), flush=True)
        print(summary(load_settings()), flush=True)
    if failure is not None:
        print(f"\nFAILED: {failure}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
