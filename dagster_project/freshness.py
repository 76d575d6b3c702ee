"""Which stages a run must materialize: the stale ones, so a re-run pays only for what changed.

A stage's inputs fingerprint is a sha256 of everything its outputs are a function of:
- its code: every project module it reaches (the list dvc.yaml's deps hold) and its code version;
- the settings it reads (its StageSpec's params), with the values in use, whatever file or
  override they came from;
- the non-code files it names (StageSpec.data_deps) and the outside data its settings point at
  (StageSpec.sources: the manifest file, or a folder of videos, by name, size and mtime);
- its partition (the taxonomy version) and its upstream stages' fingerprints.

A materialization whose checks all passed records its fingerprint in <data>/stage_inputs.json. The
run entry point materializes a stage only when its fingerprint differs from that record or one of
its outputs is missing; the others keep their last materialization. So a re-run with no change runs
nothing (no clip decoded, no request sent), and a new taxonomy version runs only its partition.
Known limit: a clip edited in place behind an unchanged manifest file is not seen (touch the
manifest); a folder source is listed, so there it is.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from dagster_project.dvc_stages import MODULE_DATA, code_closure, in_graph_order
from ground.catalog import StageSpec, stage_folder
from ground.settings import PROJECT_ROOT, resolve

RECORD = "stage_inputs.json"


def stage_id(asset: str, version: str | None) -> str:
    """How DVC and the record name a stage of a partition: `<asset>@<version>`."""
    return f"{asset}@{version}" if version else asset


def _hash_path(h, path: Path) -> None:
    """A file's bytes, a folder's files (sorted, by relative name), or the note that it is absent."""
    if path.is_file():
        h.update(path.read_bytes())
    elif path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\x00" + f.read_bytes())
    else:
        h.update(b"<absent>")


def _hash_source(h, value) -> None:
    """Outside data by listing (a clip folder can be large): names, sizes and mtimes; a keyword as is."""
    path = resolve(str(value)) if value not in (None, "", "synthetic") else None
    if path is None or not path.exists():
        h.update(f"source:{value}".encode())
        return
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f}\x00{st.st_size}\x00{st.st_mtime_ns}\x00".encode())


def _code_files(module: str) -> list[str]:
    code = code_closure(module)
    data = {d for m in code for d in MODULE_DATA.get(m.removesuffix(".py").replace("/", "."), ())}
    return code + sorted(data)


def fingerprints(assets: Sequence, settings, versions: Sequence[str]) -> dict[str, str]:
    """stage id → inputs fingerprint, for every asset and (partitioned ones) every version."""
    out: dict[str, str] = {}
    partitioned = {a.key for a in assets if a.partitions_def is not None}
    code_cache: dict[str, bytes] = {}
    for a in in_graph_order(list(assets)):
        key = a.key
        spec = StageSpec.from_metadata(a.metadata_by_key[key])
        module = a.metadata_by_key[key]["safevid/module"]
        if module not in code_cache:
            h = hashlib.sha256()
            for f in _code_files(module):
                h.update(f.encode() + b"\x00")
                _hash_path(h, PROJECT_ROOT / f)
            code_cache[module] = h.digest()
        for version in versions if key in partitioned else [None]:
            h = hashlib.sha256(code_cache[module])
            h.update(f"{a.code_versions_by_key.get(key)}\x00{version}".encode())
            h.update(json.dumps(settings.flat(*spec.params) if spec.params else {}, sort_keys=True, default=str).encode())
            for dep in spec.data_files(settings, version):
                h.update(dep.encode() + b"\x00")
                _hash_path(h, resolve(dep))
            for name in spec.sources:
                _hash_source(h, settings.section(name))
            for dep in sorted(a.asset_deps[key], key=lambda k: k.to_user_string()):
                name = dep.to_user_string()
                if dep not in partitioned:
                    ups = [stage_id(name, None)]
                else:
                    ups = [stage_id(name, version)] if version else [stage_id(name, v) for v in versions]
                for up in ups:
                    h.update(f"{up}={out.get(up, '<outside the graph>')}\x00".encode())
            out[stage_id(key.to_user_string(), version)] = h.hexdigest()
    return out


def load_record(data_dir: Path) -> dict[str, str]:
    path = Path(data_dir) / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:  # a torn or hand-edited record: every stage counts as stale, nothing is lost
        return {}


def save_record(data_dir: Path, record: dict[str, str]) -> None:
    path = Path(data_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)


def outputs_present(spec: StageSpec, data_dir: Path, version: str | None) -> bool:
    folder = stage_folder(Path(data_dir), spec, version)
    return all((folder / f.rstrip("/")).exists() for f in spec.files)


def stale(assets: Sequence, settings, versions: Sequence[str], record: dict[str, str]) -> dict[str, str]:
    """stage id → why it must run ("never materialized", "inputs changed", "outputs missing"), for the
    stale stages only; a stage downstream of a stale one is stale too (its fingerprint follows)."""
    current = fingerprints(assets, settings, versions)
    specs = {a.key.to_user_string(): StageSpec.from_metadata(a.metadata_by_key[a.key]) for a in assets}
    why = {}
    for sid, fp in current.items():
        asset, _, version = sid.partition("@")
        if sid not in record:
            why[sid] = "never materialized"
        elif record[sid] != fp:
            why[sid] = "inputs changed"
        elif not outputs_present(specs[asset], settings.path(), version or None):
            why[sid] = "outputs missing"
    return why


def passed_stages(result) -> list[str]:
    """Stage ids a run materialized with every check passed: what the record may take."""
    partition = result.dagster_run.tags.get("dagster/partition")
    failed = {c.asset_key.to_user_string() for c in result.get_asset_check_evaluations() if not c.passed}
    done = [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()]
    return [stage_id(a, partition) for a in done if a not in failed]


def record_run(data_dir: Path, current: dict[str, str], results: Iterable) -> dict[str, str]:
    """The record with the fingerprints of every stage these runs materialized and passed."""
    record = load_record(data_dir)
    for result in results:
        for sid in passed_stages(result):
            if sid in current:
                record[sid] = current[sid]
    save_record(data_dir, record)
    return record
