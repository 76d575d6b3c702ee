"""DVC: content hashes of the asset outputs, recorded from inside Dagster.

dvc pulls hydra/omegaconf, whose antlr4 pin breaks Dagster's string asset selections, so dvc lives
in its own environment (`make dvc` → .venv-dvc) and is called here as a CLI.

An asset calls `record_outputs` at its end: `dvc commit` then stores the outputs in the DVC cache and
writes their hashes (with those of the stage's code, params and inputs) to dvc.lock, so a
materialization started from the Dagster UI leaves `dvc status` clean, and the hashes go into the
asset's metadata. Under `dvc repro` (DVC_STAGE is set) DVC records the stage itself.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

import dagster as dg
import yaml

from ground.settings import PROJECT_ROOT

DEFAULT_DVC_BIN = PROJECT_ROOT / ".venv-dvc" / "bin" / "dvc"


class DvcError(RuntimeError):
    pass


class DvcUnavailable(DvcError):
    """dvc is not installed where the resource looks for it."""


class DvcTracker(dg.ConfigurableResource):
    """The dvc CLI, run in `repo_root` from its own virtual environment."""

    repo_root: str = str(PROJECT_ROOT)
    dvc_bin: str = str(DEFAULT_DVC_BIN)
    data_dir: str = "data"  # where dvc.yaml's outs live, relative to repo_root
    timeout_s: int = 900

    # --- the CLI ----------------------------------------------------------------------------------

    def _root(self) -> Path:
        return Path(self.repo_root)

    def available(self) -> bool:
        return Path(self.dvc_bin).is_file() and os.access(self.dvc_bin, os.X_OK)

    def is_repo(self) -> bool:
        return (self._root() / ".dvc").is_dir()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One dvc command at a time across processes: steps of a run may finish together."""
        if not self.is_repo():  # `dvc init`: nothing to guard yet
            yield
            return
        path = self._root() / ".dvc" / "tmp" / "safevid-dvc.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def run(self, *args: str) -> str:
        """Run `dvc <args>` in the repository; returns stdout, raises DvcError with dvc's message."""
        if not self.available():
            raise DvcUnavailable(
                f"dvc not found at {self.dvc_bin}: run `make dvc` (it installs dvc into .venv-dvc, apart from "
                "the project's .venv, because dvc's antlr4 pin breaks Dagster's asset selections)"
            )
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        with self._lock():
            proc = subprocess.run(
                [self.dvc_bin, *args], cwd=self._root(), env=env, capture_output=True, text=True, timeout=self.timeout_s
            )
        if proc.returncode != 0:
            raise DvcError(f"`dvc {' '.join(args)}` failed in {self._root()} (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def commit(self, stage_or_paths: str | Sequence[str]) -> None:
        """Record the current outputs (and deps, params) of stages or tracked paths in dvc.lock and the cache."""
        targets = [stage_or_paths] if isinstance(stage_or_paths, str) else list(stage_or_paths)
        self.run("commit", "--force", *targets)  # not --quiet: it hides the reason of a failure

    def status(self, *targets: str) -> dict:
        """`dvc status --json`: {} when every stage's recorded hashes match the workspace."""
        out = self.run("status", "--json", *targets).strip()
        return json.loads(out) if out else {}

    def stages(self) -> list[str]:
        """Stage names as DVC addresses them (foreach stages expanded: `safety_taxonomy@safevid-v1`)."""
        return self.run("stage", "list", "--name-only").split()

    def push(self, remote: str | None = None) -> None:
        self.run("push", *(["--remote", remote] if remote else []))

    def pull(self, remote: str | None = None) -> None:
        self.run("pull", *(["--remote", remote] if remote else []))

    # --- what dvc.lock records --------------------------------------------------------------------

    def lock(self) -> dict:
        path = self._root() / "dvc.lock"
        return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}

    def recorded_outs(self, stage: str) -> dict[str, str]:
        """{output path: md5} that dvc.lock records for a stage ({} if it records none)."""
        entry = self.lock().get("stages", {}).get(stage) or {}
        return {o["path"]: o.get("md5", "") for o in entry.get("outs", [])}

    def hash_of(self, path: str | Path) -> str:
        """The md5 DVC records for an output (a folder's ends in `.dir`)."""
        rel = Path(path)
        if rel.is_absolute():
            rel = rel.resolve().relative_to(self._root().resolve())
        for stage, entry in self.lock().get("stages", {}).items():
            for out in entry.get("outs", []):
                if Path(out["path"]) == rel:
                    return out["md5"]
        raise DvcError(f"dvc.lock in {self._root()} records no output {rel}: materialize its asset or run `dvc repro` first")


def _skip_reason(context, dvc: DvcTracker, stage: str) -> str | None:
    if not dvc.available():
        return f"dvc is not installed at {dvc.dvc_bin} (run `make dvc`)"
    if not dvc.is_repo():
        return f"{dvc.repo_root} is not a DVC repository (no .dvc/ folder)"
    settings = getattr(context.resources, "settings", None)
    if settings is not None and hasattr(settings, "path"):
        written = settings.path().resolve()
        tracked = (Path(dvc.repo_root) / dvc.data_dir).resolve()
        if written != tracked:
            return f"the outputs went to {written}, not to the folder dvc.yaml tracks ({tracked})"
        return untracked_settings(dvc, stage, settings)
    return None


def untracked_settings(dvc: DvcTracker, stage: str, settings) -> str | None:
    """Why dvc.lock would record settings other than the run's, or None: dvc.yaml's params name one
    settings file and profile, and a run may read another ($SAFEVID_CONFIG, a test's settings)."""
    from ground.settings import SettingsError, load_settings

    path = Path(dvc.repo_root) / "dvc.yaml"
    if not path.exists():
        return None
    entry = (yaml.safe_load(path.read_text()) or {}).get("stages", {}).get(stage.split("@")[0]) or {}
    entry = entry.get("do", entry)
    for params in entry.get("params", []):
        for file, keys in params.items():
            profile = keys[0].split(".")[0] if keys else settings.profile
            try:
                tracked = load_settings(Path(dvc.repo_root) / file, profile)
            except SettingsError as exc:
                return f"dvc.yaml's params file cannot be read ({exc})"
            sections = [k.split(".", 1)[1] for k in keys]
            ours, theirs = settings.flat(*sections), tracked.flat(*sections)
            differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            if differ:
                return (
                    f"this run's settings differ from those dvc.yaml tracks (profile '{profile}' of {file}) in {differ[:5]}, so "
                    "dvc.lock would record the wrong params: run with SAFEVID_CONFIG naming a settings file inside the repository "
                    "(the run CLI then writes dvc.yaml for it), or edit that file"
                )
    return None


def record_outputs(context: dg.AssetExecutionContext, dvc: DvcTracker, stage_name: str) -> dict:
    """Commit an asset's outputs to DVC and return metadata naming the stage and the recorded hashes.

    Call it last in an asset, after every output file is written:
        return dg.MaterializeResult(metadata={..., **record_outputs(context, dvc, "curated_videos")})
    A partitioned asset's stage is `<stage_name>@<partition key>`. Returns {} with a warning saying why
    when DVC cannot record (dvc not installed, no DVC repository, outputs written outside the tracked
    data folder as in tests, no such stage); a failing `dvc commit` raises.
    """
    stage = f"{stage_name}@{context.partition_key}" if context.has_partition_key else stage_name
    if os.environ.get("DVC_STAGE"):
        context.log.info(f"DVC: `dvc repro` runs stage {os.environ['DVC_STAGE']}; it records the outputs itself")
        return {"dvc/stage": stage}
    why = _skip_reason(context, dvc, stage)
    if why:
        context.log.warning(f"DVC: outputs of stage '{stage}' not recorded: {why}")
        return {"dvc/not_tracked": why}
    if stage not in dvc.stages():
        # The product's re-run path must not lose its lineage quietly: an untracked version is an error.
        raise DvcError(
            f"dvc.yaml in {dvc.repo_root} has no stage '{stage}', so DVC would not track these outputs: its stages are generated "
            "from the files in taxonomies/ by `python -m dagster_project.dvc_stages`, which the run CLI and the taxonomy sensor "
            "run before they materialize a version; run it, then materialize again"
        )
    dvc.commit(stage)
    outs = dvc.recorded_outs(stage)
    context.log.info(f"DVC: recorded stage '{stage}': {outs}")
    return {"dvc/stage": stage, "dvc/outs": dg.MetadataValue.json(outs)}
