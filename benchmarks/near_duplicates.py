"""Seconds of the query stage's near-duplicate filter (assets/common.py, near_duplicate_mask: blocked
matrix products) against the one-candidate-at-a-time filter it replaced, on the same embeddings, in
one run.

    .venv/bin/python -m benchmarks.near_duplicates                       # 1k, 4k and 16k items, 3 passes
    .venv/bin/python -m benchmarks.near_duplicates --sizes 1000 --repeat 5
    .venv/bin/python -m benchmarks.near_duplicates --threads 1           # BLAS on one thread
    .venv/bin/python -m benchmarks.near_duplicates --groups 50           # items spread over 50 groups

The embeddings are random unit vectors of all-MiniLM-L6-v2's dimension (384) with a share of near
copies of earlier items planted, all in one group by default: the worst case, since the old filter
compares each candidate with every kept item of its group. The two filters run interleaved (old,
new, old, new, ...) so a machine that slows down mid-run slows both; the table shows medians, and
the run fails if the two ever disagree. Not a test: numbers depend on the machine.
"""
import argparse
import statistics
import time

import numpy as np

from resources.embeddings import DIM


def one_at_a_time(embeddings: np.ndarray, groups: list[str], threshold: float) -> np.ndarray:
    """The filter before the blocked one: each candidate against a fresh copy of its group's kept rows."""
    keep = np.ones(len(groups), dtype=bool)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for idx in by_group.values():
        kept: list[int] = []
        for i in idx:
            if kept and float((embeddings[kept] @ embeddings[i]).max()) >= threshold:
                keep[i] = False
            else:
                kept.append(i)
    return keep


def planted(n: int, n_groups: int, copy_share: float, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """n unit vectors, a copy_share of them a slightly noisy copy of an earlier one in its group."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((n, DIM)).astype(np.float32)
    groups = [f"g{g}" for g in rng.integers(n_groups, size=n)]
    for i in rng.choice(np.arange(1, n), int(copy_share * n), replace=False):
        j = int(rng.integers(i))
        e[i] = e[j] + 0.1 * rng.standard_normal(DIM).astype(np.float32) / np.sqrt(DIM)
        groups[i] = groups[j]
    return e / np.linalg.norm(e, axis=1, keepdims=True), groups


def blas_threads() -> str:
    from threadpoolctl import threadpool_info

    pools = [f"{p['internal_api']} {p['num_threads']}" for p in threadpool_info() if p["user_api"] == "blas"]
    return ", ".join(pools) or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="items per run")
    parser.add_argument("--groups", type=int, default=1, help="groups the items fall in (the stage: one per clip and subcategory)")
    parser.add_argument("--copies", type=float, default=0.1, help="share of items planted as near copies")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--repeat", type=int, default=3, help="passes of each filter; the median is shown")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: the library's own choice)")
    args = parser.parse_args(argv)

    from threadpoolctl import threadpool_limits

    from assets.common import near_duplicate_mask

    with threadpool_limits(limits=args.threads, user_api="blas"):
        print(f"near_duplicate_mask: dim {DIM}, {args.groups} group(s), threshold {args.threshold}, "
              f"median of {args.repeat}, BLAS threads: {blas_threads()}")
        print(f"{'items':>7} {'dropped':>8} {'old s':>9} {'new s':>9} {'speed-up':>9}")
        for n in args.sizes:
            e, groups = planted(n, args.groups, args.copies)
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.repeat):
                for name, fn in (("old", one_at_a_time), ("new", near_duplicate_mask)):
                    t = time.perf_counter()
                    mask = fn(e, groups, args.threshold)
                    times[name].append(time.perf_counter() - t)
                    if name == "old":
                        want = mask
                    elif not np.array_equal(mask, want):
                        raise SystemExit(f"{n} items: the filters disagree on {int((mask != want).sum())} item(s)")
            old, new = statistics.median(times["old"]), statistics.median(times["new"])
            print(f"{n:>7} {int((~want).sum()):>8} {old:>9.3f} {new:>9.3f} {old / new:>8.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
