"""Training as launched jobs: `accelerate launch -m jobs.<method> <spec.json>` through Dagster Pipes.

A training stage writes its job's spec (settings, records, dataset folder, seeds, MLflow run) and
calls `launch_training`; the job's log lines, one message per logged step, and its result come back
through Pipes (jobs/_job.py), and rank 0 alone writes MLflow. The launch options are the settings'
`launch` block (pipelines.yaml): processes, machines, mixed precision, a DeepSpeed JSON. On a machine
without a GPU, more than one process means CPU processes over gloo (accelerate's MULTI_CPU). The same
command runs in a pod through resources/k8s.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from ground.settings import PROJECT_ROOT


class JobFailed(RuntimeError):
    """A launched training job exited with an error or without its result."""


def cpu_threads(launch) -> int:
    """Threads per process: accelerate would set OMP_NUM_THREADS to 1, which halves a CPU run on two cores."""
    if launch.cpu_threads_per_process:
        return launch.cpu_threads_per_process
    per_machine = max(1, launch.num_processes // launch.num_machines)
    return max(1, (os.cpu_count() or 1) // per_machine)


def accelerate_command(launch, module: str, spec_path: Path) -> list[str]:
    """The `accelerate launch` command line of a job, from the settings' launch block."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.num_processes),
           "--num_machines", str(launch.num_machines), "--machine_rank", str(launch.machine_rank),
           "--main_process_port", str(launch.main_process_port), "--mixed_precision", launch.mixed_precision,
           "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(cpu_threads(launch))]
    if launch.main_process_ip:
        cmd += ["--main_process_ip", launch.main_process_ip]
    if launch.deepspeed_config:
        config = PROJECT_ROOT / launch.deepspeed_config
        if not config.is_file():
            raise FileNotFoundError(f"launch.deepspeed_config: {config} does not exist (the JSONs are in deploy/deepspeed/)")
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(config)]
    elif launch.num_processes > 1:
        # accelerate's multi-process launcher (torchrun); without a GPU the trainers' use_cpu makes it gloo
        cmd += ["--multi_gpu"]
    return [*cmd, *launch.extra_args, "-m", module, str(spec_path)]


def write_spec(folder: Path, spec: dict, dataset=None) -> Path:
    """The job's spec file, with the in-memory training dataset saved beside it."""
    if dataset is not None:
        dataset.save_to_disk(str(folder / "dataset"))
        spec = {**spec, "dataset": str(folder / "dataset")}
    path = folder / "spec.json"
    path.write_text(json.dumps(spec, default=str))
    return path


def job_spec(st, method: str, seeds: list[tuple[int, Path]], device: str, **records) -> dict:
    """What every job needs: the settings, the seeds with their adapter folders, the stage's MLflow run."""
    import mlflow

    return {
        "method": method, "device": device, "settings": st.settings.model_dump(mode="json"),
        "seeds": [[int(k), str(folder)] for k, folder in seeds],
        "mlflow": {"tracking_uri": mlflow.get_tracking_uri(), "run_id": st.run.info.run_id},
        **{k: str(v) for k, v in records.items()},
    }


def step_messages(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m.get("kind") == "step"]


def result_of(messages: list[dict], module: str) -> list[dict]:
    results = [m["results"] for m in messages if m.get("kind") == "result"]
    if not results:
        raise JobFailed(f"the launched job {module} ended without reporting its result (its log above says why)")
    return results[-1]


@contextlib.contextmanager
def job_folder(st, module: str) -> Iterator[Path]:
    """Where the spec goes: a scratch folder, or, when the job runs in a pod of its own, a folder on
    the shared data volume (the pod must read it); removed afterwards either way."""
    from resources.k8s import training_launcher

    if training_launcher() == "k8s":
        folder = st.settings.path(".jobs", f"{st.context.run_id}-{module}")
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix=f"{module.replace('.', '_')}_"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_job(st, command: list[str]) -> list[dict]:
    """The job's custom messages, from a local subprocess or from a training pod (resources/k8s.py)."""
    import dagster as dg
    from dagster._core.errors import DagsterPipesExecutionError

    from resources.k8s import run_training_in_k8s, training_launcher

    if training_launcher() == "k8s":
        return run_training_in_k8s(st.context, command, extras={}, gpus=st.settings.launch.num_processes)
    try:
        invocation = dg.PipesSubprocessClient(cwd=str(PROJECT_ROOT)).run(command=command, context=st.context)
    except DagsterPipesExecutionError as exc:
        raise JobFailed(f"the launched job {command[-2]} failed: {exc}; the job's own error is in the stage's stderr above") from None
    return invocation.get_custom_messages()


def launch_training(st, module: str, spec: dict, dataset=None) -> tuple[list[dict], list[dict]]:
    """Run `module` under accelerate through Pipes; (one result per seed, the per-step messages)."""
    launch = st.settings.launch
    with job_folder(st, module) as scratch:
        command = accelerate_command(launch, module, write_spec(scratch, spec, dataset))
        st.log.info(f"launching {module}: {launch.num_processes} process(es) on {launch.num_machines} machine(s)")
        messages = run_job(st, command)
    results, steps = result_of(messages, module), step_messages(messages)
    lost = lost_steps(results, steps)
    if lost:
        raise JobFailed(f"the launched job {module} logged steps that never reached Dagster: {lost}")
    st.log.info(f"{module}: the result of {len(results)} seed(s) and {len(steps)} step messages came back through Pipes")
    return results, steps


def steps_logged(history) -> int:
    """A result's logged steps: a list of steps, or one list per phase (AT-SFT's two stages)."""
    return sum(len(h) for h in history.values()) if isinstance(history, dict) else len(history)


def lost_steps(results: list[dict], steps: list[dict]) -> dict[int, str]:
    """Seeds whose logged steps (the result's history) and Pipes step messages disagree."""
    sent = {}
    for m in steps:
        sent[m["seed"]] = sent.get(m["seed"], 0) + 1
    return {r["seed"]: f"{steps_logged(r['history'])} logged, {sent.get(r['seed'], 0)} received" for r in results
            if steps_logged(r["history"]) != sent.get(r["seed"], 0)}
