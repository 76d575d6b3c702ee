"""Throughput of the query-writing stage against an OpenAI-compatible server with a fixed latency.

Starts the scripted stub server (tests/openai_stub_server.py) on 127.0.0.1 with 50 ms per request,
in its own process (--in-process: a thread of this one, sharing the GIL with the client), sends 200
query-writing requests through OpenAIQueryWriter (real `openai` client, disk cache in a fresh
temporary folder, so every request goes to the server) at concurrency 1, 8 and 32, and prints the
achieved requests per second next to the ideal, concurrency / latency.

    .venv/bin/python benchmarks/llm_throughput.py [--requests 200] [--latency 0.05] [--concurrency 1 8 32] [--in-process]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ground.roles import QueryRequest  # noqa: E402
from ground.settings import EndpointSettings  # noqa: E402
from ground.taxonomy import Subcategory  # noqa: E402
from resources.llm_openai import OpenAIQueryWriter  # noqa: E402
from tests.openai_stub_server import StubServer  # noqa: E402

SUB = Subcategory(
    principle="harmless",
    category="violence",
    subcategory="assault_planning",
    kind="harmful",
    definition="Requests for help planning to hurt someone.",
    safe_answer_guidance="Decline and point to safety resources.",
    intents=("plan an attack on the person shown",),
)


@contextlib.contextmanager
def stub_server(latency: float, in_process: bool):
    """(base URL, stats()) of a stub server with this latency."""
    if in_process:
        with StubServer(latency=latency) as server:
            yield server.url, lambda: {"requests": len(server.requests), "max_in_flight": server.max_in_flight}
        return
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "openai_stub_server.py"), str(latency)], stdout=subprocess.PIPE, text=True
    )
    try:
        url = proc.stdout.readline().strip()

        def stats():
            with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=5) as r:
                return json.loads(r.read())

        yield url, stats
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)


def run(n: int, latency: float, concurrency: int, in_process: bool) -> tuple[float, dict]:
    os.environ.setdefault("SAFEVID_BENCH_KEY", "bench-key")
    with stub_server(latency, in_process) as (url, stats), tempfile.TemporaryDirectory() as cache:
        ep = EndpointSettings(
            base_url=url, model="stub", api_key_env="SAFEVID_BENCH_KEY", max_concurrency=concurrency, max_retries=0
        )
        writer = OpenAIQueryWriter(ep, cache)
        requests = [QueryRequest(f"clip{i}", f"Clip {i}: a person walks to a parked car.", "street", SUB, 3) for i in range(n)]
        started = time.perf_counter()
        out = writer.write(requests)
        elapsed = time.perf_counter() - started
        assert all(len(q) == 3 for q in out), writer.failures[:3]
        counts = stats()
        assert counts["requests"] == n and counts["max_in_flight"] <= concurrency, counts
        return n / elapsed, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--in-process", action="store_true", help="run the server as a thread of this process")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import openai  # noqa: F401  (the client imports it on first use: ~1 s that is not throughput)
    where = "a thread of the client's process" if args.in_process else "its own process"
    print(
        f"query writer: {args.requests} requests, server latency {args.latency * 1000:.0f} ms, "
        f"server in {where}, {os.cpu_count()} CPUs"
    )
    print(f"{'concurrency':>11} {'req/s':>9} {'ideal req/s':>12} {'ratio':>6} {'sent':>5} {'max in flight':>14}")
    for c in args.concurrency:
        rps, counts = run(args.requests, args.latency, c, args.in_process)
        ideal = c / args.latency
        print(f"{c:>11} {rps:>9.1f} {ideal:>12.1f} {rps / ideal:>6.2f} {counts['requests']:>5} {counts['max_in_flight']:>14}")


if __name__ == "__main__":
    main()
