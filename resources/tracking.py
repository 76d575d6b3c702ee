"""MLflow: one run per materialization, on a sqlite store in the project folder by default.

dagster-mlflow is an old op-style resource that needs pandas < 3, so this small resource replaces it.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

import dagster as dg
from pydantic import Field

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


# The experiment kind MLflow 3's UI reads from this tag; without it the UI may infer or ask for one.
# MLflow 3.17's UI no longer decides its view from the tag alone: a global "workflow type" (the
# URL's `workflowType` query, else the browser's localStorage, default "genai") picks the traces
# view or the runs table, so every link into the UI carries UI_QUERY as well.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
UI_QUERY = "workflowType=machine_learning"


def data_folder(context) -> Path | None:
    """The settings' data folder when the run's resources have settings (every stage's do)."""
    settings = getattr(getattr(context, "resources", None), "settings", None)
    return settings.path() if settings is not None and hasattr(settings, "path") else None


def _path_param(value, data_root: Path | None) -> tuple[object, bool]:
    """(value, stays a param): an absolute path inside the data folder becomes relative to it, one under
    the project root relative to that; any other absolute path is machine-specific, so it goes to a tag."""
    if isinstance(value, (list, tuple)):
        parts = [_path_param(v, data_root) for v in value]
        return type(value)(v for v, _ in parts), all(keep for _, keep in parts)
    if not isinstance(value, (str, Path)) or "\n" in str(value) or not os.path.isabs(str(value)):
        return str(value) if isinstance(value, Path) else value, True
    path = Path(os.path.normpath(str(value)))
    for root in [r for r in (data_root, PROJECT_ROOT) if r is not None]:
        for base in {Path(os.path.normpath(str(root))), Path(root).resolve()}:
            # the data folder itself is no path *in* it: it falls through to the project root
            if path.is_relative_to(base) and (path != base or root == PROJECT_ROOT):
                return path.relative_to(base).as_posix(), True
    return str(value), False


def split_params(params: dict, data_root: Path | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(params, tags) for an MLflow run: secrets dropped (params are visible to everyone with the UI),
    paths made relative to the data folder or the project root so the compare view shows what differs,
    not where the checkout lives; absolute paths elsewhere become `path.<key>` tags."""
    params_out, tags = {}, {}
    for k, v in params.items():
        if is_secret_key(str(k)):
            continue
        value, keep = _path_param(v, data_root)
        if keep:
            params_out[str(k)[:250]] = str(value)[:6000]
        else:
            tags[f"path.{k}"[:250]] = str(value)[:8000]
    return params_out, tags


def safe_params(params: dict, data_root: Path | None = None) -> dict[str, str]:
    """The params split_params keeps (use split_params to keep the machine-specific paths as tags)."""
    return split_params(params, data_root)[0]


class MlflowTracker(dg.ConfigurableResource):
    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else sqlite in the project folder
    artifact_root: str = ""  # empty: mlruns/ beside the sqlite file (or the project folder)
    experiment_prefix: str = "safevid"
    ui_url: str = Field(
        "http://127.0.0.1:5000",
        description="Base URL of the MLflow UI (`mlflow ui`) that the Dagster UI links each stage's run to.",
    )

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
        if exp is None:
            # An explicit artifact location: otherwise artifacts land in ./mlruns of the caller's cwd.
            location = (self._artifact_root() / name).resolve().as_uri()
            try:
                return mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
            except Exception:  # another process created it first
                exp = mlflow.get_experiment_by_name(name)
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made before the tag was set, or by hand
            mlflow.MlflowClient(self._uri()).set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id

    def experiment_url(self, experiment_id: str) -> str:
        """The experiment's runs table in the MLflow UI (see UI_QUERY for why the query is needed)."""
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{UI_QUERY}"

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
        data_root = data_folder(context)
        if data_root is not None:  # what the params' relative paths are relative to
            run_tags["data_dir"] = str(data_root)
        param_values, path_tags = split_params(params or {}, data_root)
        with mlflow.start_run(experiment_id=exp_id, run_name=name, tags={**run_tags, **path_tags}) as active:
            if param_values:
                mlflow.log_params(param_values)
            for input_name, path in (inputs or {}).items():
                log_table_input(input_name, Path(path))
            yield active

    def tag(self, run_id: str, tags: dict[str, str]) -> None:
        client = self.client()
        for k, v in tags.items():
            client.set_tag(run_id, k, v)

    def run_url(self, run, artifact: str | None = None) -> str:
        """The run's page in the MLflow UI (or one of its artifacts' page); `run` is an mlflow Run or ActiveRun."""
        url = f"{self.ui_url.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        return f"{url}/artifacts/{artifact}?{UI_QUERY}" if artifact else f"{url}?{UI_QUERY}"

    def artifact_url(self, run, path: str) -> str:
        """The artifact file itself, as the MLflow server serves it: an image URL a browser can show inline."""
        from urllib.parse import urlencode

        return f"{self.ui_url.rstrip('/')}/get-artifact?{urlencode({'path': path, 'run_uuid': run.info.run_id})}"


RATES = ("safety_rate", "helpful_rate")
OVERALL = "ALL"  # ground.evaluation.rollup's row of a checkpoint's overall rates


def metric_part(value) -> str:
    """One part of a metric name. MLflow allows alphanumerics, `_ - . : /` and spaces; dots separate the
    parts here and a slash would make a path of the name, so anything but `\\w` and `-` becomes `_`."""
    return re.sub(r"[^\w\-]+", "_", str(value)).strip("_") or "_"


def rate_metrics(rates_frame, by: Sequence[str] = ("checkpoint", "category"), rates: Sequence[str] = RATES) -> dict[str, float]:
    """`<checkpoint>.<rate>.<category>` (more `by` columns: more parts) → value, for the compare view.

    `rates_frame` has a row per group: the `by` columns and the rate columns (ground.evaluation.rollup's
    frame; per split or language, the same rates grouped by those columns). A row that is "ALL" in
    every breakdown column is skipped (the overall rates are metrics of their own), and so are undefined rates (a group without
    harmful or without benign items). The rate comes before the breakdown, not last, so no name ends
    in `.<rate>` the way the overall `<checkpoint>.<rate>` does, which is what assets/comparison.py
    reads back as a checkpoint's rate.
    """
    import pandas as pd

    by = list(by)
    out: dict[str, float] = {}
    for row in rates_frame[[*by, *rates]].itertuples(index=False):
        keys, values = row[: len(by)], row[len(by):]
        if all(str(k) == OVERALL for k in keys[1:]):
            continue
        for rate, value in zip(rates, values):
            if value is None or pd.isna(value):
                continue
            out[".".join([metric_part(keys[0]), rate, *(metric_part(k) for k in keys[1:])])] = float(value)
    return out


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
