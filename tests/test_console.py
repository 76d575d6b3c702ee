"""What the run CLI's console shows: the progress line, the compact log line, the time table."""
import logging
from pathlib import Path

from dagster_project.instance import ensure_instance_yaml
from dagster_project.run import ConsoleFormatter, stage_times, time_table
from resources.progress import ProgressReporter, duration


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def reporter(**kw):
    clock, lines = Clock(), []
    return ProgressReporter("pretraining", lines.append, clock=clock, **kw), clock, lines


def test_the_line_has_step_loss_rate_and_eta():
    rep, clock, lines = reporter(unit="step")
    clock.now += 2.0
    rep(10, 1000, loss=2.5)  # the first call: rate since the reporter was made
    assert lines == ["pretraining: step 10/1000 (1%) loss 2.5000 | 5.0 step/s | ETA 3m18s"]
    clock.now += 10.0
    rep(110, 1000, loss=1.23456)  # then since the first call, so setup time is not the rate
    assert lines[-1] == "pretraining: step 110/1000 (11%) loss 1.2346 | 10.0 step/s | ETA 1m29s"


def test_a_loop_that_says_it_starts_is_timed_from_there():
    rep, clock, lines = reporter(unit="step")
    clock.now += 30.0  # encoding the batches, loading the model
    rep(0, 100)
    clock.now += 5.0
    rep(10, 100, loss=1.0)
    assert lines == ["pretraining: step 0/100 (0%)", "pretraining: step 10/100 (10%) loss 1.0000 | 2.0 step/s | ETA 45s"]


def test_a_slow_loop_shows_seconds_per_item_and_no_loss_when_none_is_given():
    rep, clock, lines = reporter()
    clock.now += 8.0
    rep(2, 10)
    assert lines == ["pretraining: 2/10 (20%) | 4.0 s/it | ETA 32s"]


def test_lines_come_at_most_every_few_seconds_and_once_at_the_end():
    rep, clock, lines = reporter(every=5.0)
    for step in range(1, 101):
        clock.now += 0.5
        rep(step, 100, loss=1.0 / step)
    # the first step, then one line per 5 s of steps (10 steps each), and the end
    assert len(lines) == 11, lines
    assert lines[-1] == "pretraining: 100/100 (100%) loss 0.0100 | 2.0 it/s | took 50s"
    rep(100, 100)  # the end is said once
    assert len(lines) == 11


def test_loss_is_kept_between_calls_that_do_not_give_it():
    rep, clock, lines = reporter(every=0.0)
    rep(1, 4, loss=0.5)
    clock.now += 1
    rep(2, 4)
    assert "loss 0.5000 " in lines[-1]


def test_durations():
    assert [duration(s) for s in (0, 49.4, 111, 3720)] == ["0s", "49s", "1m51s", "1h02m"]


def test_stage_times_from_step_events():
    events = [
        (None, "video_manifest", "STEP_START", 10.0),
        (None, "video_manifest", "STEP_SUCCESS", 12.5),
        ("v1", "dpo_checkpoint", "STEP_UP_FOR_RETRY", 30.0),
        ("v1", "dpo_checkpoint", "STEP_START", 20.0),
        ("v1", "dpo_checkpoint", "STEP_START", 31.0),  # the retry
        ("v1", "dpo_checkpoint", "STEP_FAILURE", 40.0),
        ("v2", "dpo_checkpoint", "STEP_START", 50.0),
        ("v2", "dpo_checkpoint", "STEP_SUCCESS", 53.0),
        ("v1", "benchmark_scores", "STEP_SKIPPED", 41.0),
    ]
    assert stage_times(events) == [
        {"asset": "video_manifest", "partition": "-", "seconds": 2.5, "status": "success"},
        {"asset": "dpo_checkpoint", "partition": "v1", "seconds": 20.0, "status": "failed"},
        {"asset": "benchmark_scores", "partition": "v1", "seconds": None, "status": "skipped"},
        {"asset": "dpo_checkpoint", "partition": "v2", "seconds": 3.0, "status": "success"},
    ]


def test_time_table_lines_up_and_totals():
    rows = [
        {"asset": "video_manifest", "partition": "-", "seconds": 2.5, "status": "success"},
        {"asset": "dpo_checkpoint", "partition": "safevid-v1", "seconds": 120.25, "status": "success"},
        {"asset": "comparison", "partition": "-", "seconds": None, "status": "skipped"},
    ]
    lines = time_table(rows).splitlines()
    assert lines[1].split() == ["asset", "partition", "seconds", "status"]
    assert lines[3].split() == ["dpo_checkpoint", "safevid-v1", "120.2", "success"]
    assert lines[4].split() == ["comparison", "-", "skipped"]
    assert lines[-1].split() == ["total", "122.8"]
    end = lines[1].index("seconds") + len("seconds")  # the seconds column is right-aligned under its header
    assert lines[2][:end].endswith(" 2.5") and lines[3][:end].endswith(" 120.2")


def record(msg, meta=None, level=logging.INFO):
    rec = logging.LogRecord("dagster", level, __file__, 1, msg, (), None)
    rec.created = 1_700_000_000.0  # 22:13:20 UTC
    if meta is not None:
        rec.dagster_meta = meta
    return rec


def meta(**kw):
    base = {"run_id": "0123456789abcdef", "job_name": "__ephemeral_asset_job__", "job_tags": {}, "step_key": None,
            "dagster_event": None, "orig_message": "hello"}
    return {**base, **kw}


def test_console_line_is_time_step_partition_message(monkeypatch):
    import time

    monkeypatch.setattr(ConsoleFormatter, "converter", time.gmtime)
    fmt = ConsoleFormatter()
    full = "__ephemeral_asset_job__ - 0123456789abcdef - target_model - loss 1.2"
    line = fmt.format(record(full, meta(step_key="target_model", orig_message="loss 1.2", job_tags={"dagster/partition": "v1"})))
    assert line == "22:13:20 target_model [v1] | loss 1.2"
    assert fmt.format(record(full, meta(orig_message="Started execution of run."))) == "22:13:20 run 01234567 | Started execution of run."
    warn = fmt.format(record("x", meta(step_key="judge", orig_message="retrying batch 2"), level=logging.WARNING))
    assert warn == "22:13:20 judge | WARNING retrying batch 2"
    assert fmt.format(record("plain")) == "22:13:20 dagster | plain"


def test_console_line_carries_a_failed_steps_error(monkeypatch):
    from types import SimpleNamespace

    error = SimpleNamespace(to_string=lambda: "ValueError: no pairs")
    event = SimpleNamespace(event_specific_data=SimpleNamespace(error=error))
    line = ConsoleFormatter().format(record("x", meta(step_key="dpo_checkpoint", orig_message="Execution failed.", dagster_event=event), logging.ERROR))
    assert line.endswith("dpo_checkpoint | ERROR Execution failed.\nValueError: no pairs")


def test_instance_yaml_gets_the_project_loggers_once(tmp_path):
    import yaml

    path = tmp_path / "dagster.yaml"
    path.write_text("# mine\ntelemetry:\n  enabled: false")
    ensure_instance_yaml(str(tmp_path))
    ensure_instance_yaml(str(tmp_path))
    config = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("# mine\n") and path.read_text().count("python_logs") == 1
    assert config["python_logs"]["python_log_level"] == "INFO" and "resources" in config["python_logs"]["managed_python_loggers"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    config = yaml.safe_load(Path(ensure_instance_yaml(str(fresh))).read_text())
    assert config["telemetry"] == {"enabled": False} and config["python_logs"]["python_log_level"] == "INFO"


def test_the_dpo_step_logger_reports_each_logged_step_with_its_loss():
    from types import SimpleNamespace

    from resources.training import make_step_logger

    calls = []
    logger = make_step_logger(lambda done, total, loss=None: calls.append((done, total, loss)))
    logger.on_train_begin(None, SimpleNamespace(global_step=0, max_steps=150), None)
    logger.on_log(None, SimpleNamespace(global_step=3, max_steps=150), None, logs={"loss": 0.69, "rewards/margins": 0.1})
    logger.on_log(None, SimpleNamespace(global_step=150, max_steps=150), None, logs={"train_runtime": 9.0})  # the summary
    assert calls == [(0, 150, None), (3, 150, 0.69)]


def test_the_console_shows_info_and_the_step_start_and_success_events():
    from types import SimpleNamespace

    from dagster_project.run import ConsoleFilter

    shown = ConsoleFilter("INFO").filter
    event = lambda kind: SimpleNamespace(event_type_value=kind, event_specific_data=None)  # noqa: E731
    assert shown(record("x", meta(orig_message="loss 1.2")))
    assert not shown(record("x", meta(orig_message="a debug line"), logging.DEBUG))
    assert shown(record("x", meta(step_key="dpo", dagster_event=event("STEP_SUCCESS")), logging.DEBUG))
    assert not shown(record("x", meta(step_key="dpo", dagster_event=event("LOADED_INPUT")), logging.DEBUG))


def test_project_loggers_reach_the_console_and_the_run_log(tmp_path, capsys):
    """The instance's managed python loggers (dagster.yaml) route `logging.getLogger(__name__)` INFO
    lines of the project's packages through the run's loggers: the compact console and the event log."""
    import dagster as dg

    from dagster_project.run import _materialize

    @dg.asset
    def probe():
        logging.getLogger("resources.llm_client").info("batch 1/2: 16 prompts, 0 retries")
        logging.getLogger("resources.llm_client").debug("not at INFO")

    ensure_instance_yaml(str(tmp_path))  # the instance reads it from its home, as project_instance's does
    # Dagster sets the managed loggers' levels for the process: put them back for the other tests.
    levels = {n: logging.getLogger(n).level for n in ("dagster", "ground", "resources", "assets", "dagster_project")}
    try:
        with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
            result = _materialize([probe], {}, None, instance)
            logged = [e.user_message for e in instance.all_logs(result.run_id)]
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    err = capsys.readouterr().err
    assert any(line.endswith("probe | batch 1/2: 16 prompts, 0 retries") for line in err.splitlines()), err
    assert "not at INFO" not in err and 'Finished execution of step "probe"' in err
    assert "batch 1/2: 16 prompts, 0 retries" in logged


def test_a_failed_run_is_returned_not_raised(tmp_path):
    """The run CLI records what passed before it stops (dagster_project/run.py): _materialize hands
    back a failed run instead of raising out of it."""
    import dagster as dg

    from dagster_project.run import _materialize

    @dg.asset
    def fine():
        return 1

    @dg.asset
    def broken(fine):
        raise ValueError("clip_007.mp4: corrupt")

    with dg.DagsterInstance.ephemeral() as instance:
        result = _materialize([fine, broken], {}, None, instance)
    assert not result.success
    assert [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()] == ["fine"]
    assert [e.step_key for e in result.all_events if e.is_step_failure] == ["broken"]
