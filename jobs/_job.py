"""What every training job does around its own training, written once.

A job reads its spec (a JSON file the stage wrote: the settings, the records to start from, the
dataset folder, the seeds and where their adapters go, the MLflow run), trains each seed, and
reports back. Under `accelerate launch` every process runs this; only rank 0 talks to Dagster
(Pipes: log lines, one message per logged step, the result) and to MLflow, since several writers on
one Pipes channel or one MLflow run would interleave. Run outside Dagster (a test, a shell), the
lines go to stdout and the result to the spec's `result_path`.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

RESULT = "result"
STEP = "step"


def rank() -> int:
    """This process's global rank (torchrun and accelerate set RANK; a plain run is rank 0)."""
    return int(os.environ.get("RANK", "0"))


class Reporter:
    """Where rank 0's lines and messages go: Dagster Pipes when launched by Dagster, else stdout."""

    def __init__(self, pipes=None):
        self.pipes = pipes

    def log(self, line: str) -> None:
        if rank() != 0:
            return
        if self.pipes is not None:
            self.pipes.log.info(line)
        else:
            print(line, flush=True)

    def message(self, payload: dict) -> None:
        if rank() == 0 and self.pipes is not None:
            self.pipes.report_custom_message(payload)

    def step_callback(self, seed: int, phase: str):
        """A TrainerCallback sending each logged step (loss, rewards...) back as a Pipes message."""
        from transformers import TrainerCallback

        reporter = self

        class PipesSteps(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
                    reporter.message({"kind": STEP, "seed": seed, "phase": phase, "step": state.global_step, **metrics})

        return PipesSteps()

    def progress(self, what: str, unit: str = "step"):
        from resources.progress import ProgressReporter

        return ProgressReporter(what, self.log, unit=unit)


def load_spec(argv: list[str]) -> dict:
    if len(argv) != 2:
        raise SystemExit(f"usage: python -m {argv[0]} <job spec JSON>")
    return json.loads(Path(argv[1]).read_text())


@contextlib.contextmanager
def reporting() -> Iterator[Reporter]:
    """Rank 0 of a Dagster-launched job opens Pipes; every other case reports to stdout."""
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    if rank() == 0 and DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ:
        with open_dagster_pipes() as pipes:
            yield Reporter(pipes)
    else:
        yield Reporter()


@contextlib.contextmanager
def mlflow_run(spec: dict) -> Iterator[None]:
    """Rank 0 logs its steps into the stage's MLflow run (resumed by id); the others log nothing."""
    run_id = (spec.get("mlflow") or {}).get("run_id")
    if rank() != 0 or not run_id:
        yield
        return
    import mlflow

    mlflow.set_tracking_uri(spec["mlflow"]["tracking_uri"])
    with mlflow.start_run(run_id=run_id):
        yield


def settings_of(spec: dict):
    from ground.settings import Settings

    return Settings.model_validate(spec["settings"])


def load_base(spec: dict, method: str, seed: int):
    """(record, model, processor) of the full-weights base the spec names, seeded for `seed`."""
    import torch

    from ground.checkpoints import CheckpointRecord
    from resources import models

    base = CheckpointRecord.load(Path(spec["base"]))
    if base.adapter_path:
        raise ValueError(f"checkpoint {base.name!r} is an adapter on {base.base_model}: {method} trains on full weights")
    torch.manual_seed(seed)
    return (base, *models.load_video_llm(base.weights(), device=spec["device"]))


def jsonable(value):
    """The result as JSON: paths as text, tuples as lists, dict keys as text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def run(argv: list[str], train_seed: Callable[[dict, object, Reporter, int, Path], dict]) -> None:
    """The job: train_seed(spec, settings, reporter, seed, adapter_dir) for each of the spec's seeds,
    then the results back to the stage (Pipes, and the spec's result_path for a run outside Dagster)."""
    spec = load_spec(argv)
    settings = settings_of(spec)
    with reporting() as reporter, mlflow_run(spec):
        results = []
        for seed, adapter_dir in spec["seeds"]:
            reporter.log(f"{spec['method']}: training seed {seed} on {spec['device']} (process {rank()} of {os.environ.get('WORLD_SIZE', '1')})")
            results.append(jsonable(train_seed(spec, settings, reporter, int(seed), Path(adapter_dir))))
        if rank() == 0:
            reporter.message({"kind": RESULT, "results": results})
            if spec.get("result_path"):
                Path(spec["result_path"]).write_text(json.dumps(results))

