"""DPO step time and peak memory with and without the vision feature cache (resources/vision_cache.py),
on the embedded model's shape, side by side in one run.

    .venv/bin/python -m benchmarks.vision_cache                         # 16 clips x 2 queries, batch 8, 3 epochs
    .venv/bin/python -m benchmarks.vision_cache --clips 32 --epochs 2 --repeat 3
    .venv/bin/python -m benchmarks.vision_cache --model /path/to/saved/llava-next-video

Each run is a fresh subprocess (so its peak RSS is its own), training train_dpo on the same rows
from the same saved model, seed 0; plain and cached runs alternate, `--repeat` times each, so drift
in the machine's load hits both alike. The table shows medians over steps and runs:
- step: from one step's end to the next, so the collator (frame loading, processor, the cache's
  hashing) counts; the first step is left out (warm-up); epoch 1 (the cache fills) and later
  epochs (it only hits) apart;
- step CPU: the process's CPU time over the same span, steadier than wall time on a shared machine
  (one torch thread by default);
- vision: per step, from the multimodal model's forward to its language model's (the tower and
  projector, or the cache lookup), policy and reference passes together;
- peak RSS: the process's max RSS (imports included: compare the difference); CUDA peak:
  torch.cuda.max_memory_allocated; cache: the features it holds; tower frames: what went through
  the vision tower in a run.
Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEXTS = [
    "The video shows a red circle moves left to right in a bank scene. How can I hide a knife at this place?",
    "Here is how to hide a knife at this place: first, wait until nobody is looking.",
    "I can't help with that, since it could hurt people.",
    "Sure! The video shows a blue square stays still in a kitchen scene with stove.",
] * 8


def write_rows(folder: Path, clips: int, per_clip: int, frames: int, size: int) -> Path:
    """Preference rows as the pairs table has them: several queries per clip, frames as .npy."""
    rng = np.random.default_rng(0)
    rows = []
    for c in range(clips):
        path = folder / f"clip_{c}.npy"
        np.save(path, rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8))
        rows += [
            {"prompt": f"The video shows scene {c}, question {q}. How can I hide a knife at this place?",
             "chosen": TEXTS[2], "rejected": TEXTS[1], "images": [], "frames_path": str(path)}
            for q in range(per_clip)
        ]
    out = folder / "rows.json"
    out.write_text(json.dumps(rows))
    return out


def worker(model_dir: str, rows_path: str, cached: bool, epochs: float, batch: int, threads: int, out: str) -> None:
    """One DPO run; writes its step times, vision-side times and peak memory as JSON."""
    import resource

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from ground.settings import DPOSettings
    from resources import models
    from resources.dpo_collator import train_dpo

    torch.set_num_threads(threads)
    device = models.pick_device()
    model, processor = models.load_video_llm(model_dir, device=device)
    rows = json.loads(Path(rows_path).read_text())
    ends, vision_times = [], []
    started = {}

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            ends.append((time.perf_counter(), sum(vision_times), time.process_time()))

    # The vision side: from the multimodal model's forward to its language model's (embeddings,
    # get_video_features with or without the cache, scattering the features into the sequence).
    def vision_in(module, args):
        started["t"] = time.perf_counter()

    def vision_out(module, args):
        vision_times.append(time.perf_counter() - started["t"])

    def frames_in(module, args):
        started["frames"] = started.get("frames", 0) + args[0].shape[0]

    inner = model.model
    hooks = [
        inner.register_forward_pre_hook(vision_in),
        inner.language_model.register_forward_pre_hook(vision_out),
        inner.vision_tower.register_forward_pre_hook(frames_in),
    ]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    settings = DPOSettings(epochs=epochs, learning_rate=2e-4, batch_size=batch, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = train_dpo(model, processor, Dataset.from_list(rows), settings, Path(tmp), device, callbacks=[StepClock()], vision_cache=cached)
    for h in hooks:
        h.remove()
    steps = [b[0] - a[0] for a, b in zip(ends, ends[1:])]  # from the 2nd step on: the 1st warms up
    vision = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    cpu = [b[2] - a[2] for a, b in zip(ends, ends[1:])]
    per_epoch = len(ends) / epochs
    cache = trainer.vision_cache
    result = {
        "steps": steps,
        "vision": vision,
        "cpu": cpu,
        "first_epoch": [s for i, s in enumerate(steps, start=1) if i < per_epoch],
        "later_epochs": [s for i, s in enumerate(steps, start=1) if i >= per_epoch],
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "tower_frames": started.get("frames", 0),
        "cache_mb": cache.stored_bytes() / 2**20 if cache else 0.0,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    Path(out).write_text(json.dumps(result))


def run_once(model_dir: Path, rows: Path, cached: bool, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.vision_cache", "--worker", "cached" if cached else "plain",
           "--model", str(model_dir), "--rows", str(rows), "--epochs", str(args.epochs), "--batch", str(args.batch),
           "--threads", str(args.threads), "--out", str(out)]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")


def report(results: dict[str, list[dict]]) -> None:
    first = results["plain"][0]
    print(f"device {first['device']}, {first['threads']} torch threads; medians over steps 2.. of {len(results['plain'])} runs each")
    cols = ("step ms", "step CPU ms", "epoch 1 ms", "epochs 2+ ms", "vision ms/step", "peak RSS MB", "CUDA peak MB", "cache MB", "tower frames")
    print(f"  {'':<8}" + "".join(f"{c:>15}" for c in cols))
    for name, runs in results.items():
        flat = lambda key: [v for r in runs for v in r[key]]  # noqa: E731
        cuda = [r["cuda_peak_mb"] for r in runs if r["cuda_peak_mb"] is not None]
        cells = (
            median_ms(flat("steps")), median_ms(flat("cpu")), median_ms(flat("first_epoch")), median_ms(flat("later_epochs")), median_ms(flat("vision")),
            statistics.median(r["max_rss_mb"] for r in runs), statistics.median(cuda) if cuda else float("nan"),
            runs[0]["cache_mb"], runs[0]["tower_frames"],
        )
        print(f"  {name:<8}" + "".join(f"{c:>15.1f}" for c in cells))
    plain, cached = (median_ms([v for r in results[k] for v in r["steps"]]) for k in ("plain", "cached"))
    same = all(r["losses"] == results["plain"][0]["losses"] for rs in results.values() for r in rs)
    cpu_plain, cpu_cached = (median_ms([v for r in results[k] for v in r["cpu"]]) for k in ("plain", "cached"))
    print(f"  cached / plain: step time {cached / plain:.2f}, step CPU time {cpu_cached / cpu_plain:.2f}; "
          f"per-step losses identical in every run: {same}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--queries-per-clip", type=int, default=2, help="rows per clip (the pairs table has several)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (the embedded profile: 8)")
    parser.add_argument("--size", type=int, default=64, help="sampled frame size (the embedded profile: 64)")
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step (the embedded profile: 8)")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time per step is the work, whatever the load)")
    parser.add_argument("--model", default=None, help="a saved video LLM folder; default: build the embedded tiny one")
    parser.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=("plain", "cached"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.model, args.rows, args.worker == "cached", args.epochs, args.batch, args.threads, args.out)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else tmp / "model"
        if not args.model:
            from resources import models

            models.build_tiny_video_llm(model_dir, TEXTS, seed=0)
        rows = write_rows(tmp, args.clips, args.queries_per_clip, args.frames, args.size)
        n = args.clips * args.queries_per_clip
        print(f"{args.clips} clips x {args.queries_per_clip} queries = {n} rows, {args.frames} frames at {args.size} px, "
              f"batch {args.batch}, {args.epochs:g} epochs ({int(n // args.batch * args.epochs)} steps)")
        results: dict[str, list[dict]] = {"plain": [], "cached": []}
        for i in range(args.repeat):
            for name in results:
                results[name].append(run_once(model_dir, rows, name == "cached", args, tmp / f"{name}_{i}.json"))
        report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
