"""A disk cache of LLM replies, keyed by a hash of the full request, that survives a killed process.

One file per request under data/llm_cache/<first two hex digits>/<sha256>.json. A reply is written
to a temporary file in the same folder and renamed over the final name, so a reader sees either no
entry or a whole one even when the process is killed mid-write: an interrupted run resumes with what
it already has and a repeated run sends no request at all. There is no fsync (it cost ~4 ms a write
here, on the event loop that drives all requests); after a power loss an entry may come back empty
or torn, and an entry that does not parse is a miss, so the worst case is one repeated request. The key covers the model, the messages and every parameter
that changes the reply (never the API key or the server address: the same request to a moved
server is the same request).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def request_key(request: dict) -> str:
    """sha256 of the request in a canonical JSON form (sorted keys, no whitespace)."""
    blob = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class LLMCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))["reply"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # Torn by a power loss, or edited by hand: a miss, so the request is sent again.
            return None

    def put(self, key: str, reply: dict, request: dict | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "reply": reply}
        if request is not None:
            entry["model"] = request.get("model")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # A request that failed for good, per Dagster run: a file, not a dict, because each step of a
    # multiprocess run is its own process.
    def _failed_path(self, key: str, scope: str) -> Path:
        safe = "".join(c for c in scope if c.isalnum() or c in "-_")[:64] or "run"
        return self.root / "failed" / safe / f"{key}.txt"

    def mark_failed(self, key: str, scope: str, cause: str) -> None:
        path = self._failed_path(key, scope)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cause, encoding="utf-8")

    def failed(self, key: str, scope: str) -> str | None:
        try:
            return self._failed_path(key, scope).read_text(encoding="utf-8")
        except OSError:
            return None

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0
