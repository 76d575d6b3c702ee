"""MLflow: one run per materialization, on a sqlite store in the project folder by default.

dagster-mlflow is an old op-style resource that needs pandas < 3, so this small resource replaces it.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import dagster as dg

from ground.secrets import is_secret_key
from ground.settings import PROJECT_ROOT


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def safe_params(params: dict) -> dict[str, str]:
    """Drop anything that looks like a secret; MLflow params are visible to everyone with the UI."""
    out = {}
    for k, v in params.items():
        if is_secret_key(str(k)):
            continue
        out[str(k)[:250]] = str(v)[:6000]
    return out


class MlflowTracker(dg.ConfigurableResource):
    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else sqlite in the project folder
    artifact_root: str = ""  # empty: mlruns/ beside the sqlite file (or the project folder)
    experiment_prefix: str = "safevid"

    def _uri(self) -> str:
        return self.tracking_uri or default_tracking_uri()

    def _artifact_root(self) -> Path:
        if self.artifact_root:
            return Path(self.artifact_root)
        uri = self._uri()
        if uri.startswith("sqlite:///"):
            return Path(uri[len("sqlite:///"):]).parent / "mlruns"
        return PROJECT_ROOT / "mlruns"

    def client(self):
        import mlflow

        mlflow.set_tracking_uri(self._uri())
        return mlflow.MlflowClient(self._uri())

    def experiment_id(self, profile: str) -> str:
        import mlflow

        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        mlflow.set_tracking_uri(self._uri())
        name = f"{self.experiment_prefix}-{profile}"
        exp = mlflow.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # An explicit artifact location: otherwise artifacts land in ./mlruns of the caller's cwd.
        location = (self._artifact_root() / name).resolve().as_uri()
        try:
            return mlflow.create_experiment(name, artifact_location=location)
        except Exception:  # another process created it first
            return mlflow.get_experiment_by_name(name).experiment_id

    @contextlib.contextmanager
    def run(
        self,
        context: dg.AssetExecutionContext,
        profile: str,
        params: dict | None = None,
        tags: dict | None = None,
        inputs: dict[str, Path] | None = None,
    ) -> Iterator["object"]:
        """Start an MLflow run tagged with the asset, partition, Dagster run and git commit, with its
        input tables (name → Parquet path) logged as MLflow datasets; yields mlflow.ActiveRun."""
        import mlflow

        exp_id = self.experiment_id(profile)
        asset = context.asset_key.to_user_string() if context.has_assets_def else context.op.name
        partition = context.partition_key if context.has_partition_key else ""
        run_tags = {
            "dagster.asset": asset,
            "dagster.partition": partition,
            "dagster.run_id": context.run_id,
            "git.commit": git_commit(),
            "profile": profile,
            **(tags or {}),
        }
        name = f"{asset}[{partition}]" if partition else asset
        with mlflow.start_run(experiment_id=exp_id, run_name=name, tags=run_tags) as active:
            if params:
                mlflow.log_params(safe_params(params))
            for input_name, path in (inputs or {}).items():
                log_table_input(input_name, Path(path))
            yield active

    def tag(self, run_id: str, tags: dict[str, str]) -> None:
        client = self.client()
        for k, v in tags.items():
            client.set_tag(run_id, k, v)


def log_table_input(name: str, path: Path) -> None:
    """An upstream table as an MLflow dataset input, so MLflow shows the lineage too."""
    import mlflow
    import mlflow.data
    import pandas as pd

    if not path.exists():
        return
    df = pd.read_parquet(path)
    if df.empty:  # MLflow's digest of an empty Arrow-string frame raises (mlflow 3.x); nothing to record anyway
        return
    dataset = mlflow.data.from_pandas(df, source=str(path), name=name)
    mlflow.log_input(dataset, context="input")
