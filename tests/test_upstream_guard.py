"""A stage materialized on its own refuses an upstream whose latest materialization failed its
check, or failed outright: benchmark_scores once scored a stale benchmark table with exit 0."""
import dagster as dg
import pytest
from stage_resources import stage_resources

from assets._stage import UpstreamNotReady, stage_asset
from ground.catalog import StageSpec
from ground.settings import Settings

STATE = {"check_passes": True, "raise": False}


@stage_asset(StageSpec(folder="toy_up", files=("x.txt",)), group="toy", checks={"up_ok": "the toy's flag"})
def toy_up(st):
    """An upstream whose check and success the test decides."""
    if STATE["raise"]:
        raise RuntimeError("toy upstream broke")
    st.path("x.txt").write_text("x")
    return st.finish({}, [dg.AssetCheckResult(check_name="up_ok", passed=STATE["check_passes"])])


@stage_asset(StageSpec(folder="toy_down", files=("y.txt",)), group="toy")
def toy_down(st, toy_up):
    """Reads the upstream."""
    st.path("y.txt").write_text("y")
    return st.finish({})


@stage_asset(StageSpec(folder="toy_measure", files=("z.txt",)), group="toy", measures_despite=("up_ok",))
def toy_measure(st, toy_up):
    """Measures the upstream's result, whatever its check said."""
    st.path("z.txt").write_text("z")
    return st.finish({})


@pytest.fixture
def run(tmp_path):
    resources = stage_resources(Settings(data_dir=str(tmp_path / "data")), tmp_path)
    instance = dg.DagsterInstance.ephemeral()

    def materialize(name):
        result = dg.materialize([toy_up, toy_down, toy_measure], selection=[name], instance=instance, resources=resources, raise_on_error=False)
        errors = [e.event_specific_data.error.to_string() for e in result.all_events if e.is_step_failure]
        return result.success, errors

    yield materialize
    STATE.update(check_passes=True, **{"raise": False})


def test_a_failed_upstream_check_stops_the_downstream_run_alone(run):
    STATE["check_passes"] = False
    run("toy_up")
    ok, errors = run("toy_down")
    assert not ok and UpstreamNotReady.__name__ in errors[0]
    assert "toy_up: its latest materialization failed its check(s) ['up_ok']" in errors[0]
    STATE["check_passes"] = True
    run("toy_up")
    assert run("toy_down") == (True, [])


def test_an_upstream_whose_last_attempt_failed_stops_the_downstream(run):
    assert run("toy_up")[0]
    STATE["raise"] = True
    assert not run("toy_up")[0]  # the old file is still there, from code that ran before
    ok, errors = run("toy_down")
    assert not ok and "its latest materialization (run" in errors[0]


def test_a_measuring_stage_reads_through_the_check_it_names_but_not_a_failed_run(run):
    STATE["check_passes"] = False
    run("toy_up")
    assert run("toy_measure") == (True, [])
    assert not run("toy_down")[0]
    STATE.update(check_passes=True, **{"raise": True})
    assert not run("toy_up")[0]
    ok, errors = run("toy_measure")
    assert not ok and "its latest materialization (run" in errors[0]
