"""Frames/second of the project's frame sampling (resources/video.py, decord2) against PyAV decoding
and sampling the same frames, on the same clips, in one run.

    .venv/bin/python -m benchmarks.decode                      # rendered clips, 16 frames at 224 px
    .venv/bin/python -m benchmarks.decode --frames 8 --size 64 # the embedded profile's sampling
    .venv/bin/python -m benchmarks.decode a.mp4 b.mp4          # your own clips

Both sides decode the frame indices the project's sampling protocol picks and resize with the same
resizer, so only the decoding differs. PyAV decodes the stream in order up to the last index (what
a plain PyAV loader does); decord seeks. Also shown: reading the cached .npy instead of decoding.
Not a test: numbers depend on the machine.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def render_long_clip(path: Path, seconds: int = 10, fps: int = 30, width: int = 640, height: int = 480) -> Path:
    """A longer, larger clip than the embedded corpus: a textured image panning, with noise."""
    from resources.video_writer import write_mp4

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width * 2, 3), dtype=np.uint8)
    frames = np.stack(
        [np.clip(base[:, t * 2 : t * 2 + width].astype(np.int16) + rng.integers(-8, 9, (height, width, 3)), 0, 255).astype(np.uint8)
         for t in range(seconds * fps)]
    )
    return write_mp4(frames, path, fps)


def pyav_sample(path: str, indices: list[int], size: int) -> np.ndarray:
    """Decode in order with PyAV and keep the frames at `indices`, resized like the project does."""
    import av

    from resources.video import resize_frames

    wanted = {}
    for pos, i in enumerate(indices):
        wanted.setdefault(i, []).append(pos)
    out: list[np.ndarray | None] = [None] * len(indices)
    last = max(indices)
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for n, frame in enumerate(container.decode(stream)):
            if n in wanted:
                rgb = frame.to_ndarray(format="rgb24")
                for pos in wanted[n]:
                    out[pos] = rgb
            if n >= last:
                break
    if any(f is None for f in out):
        raise RuntimeError(f"{path}: PyAV ran out of frames before index {last}")
    return resize_frames(np.stack(out), size)


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="clips to measure; default: render some")
    parser.add_argument("--clips", type=int, default=8, help="embedded-corpus clips to render (128x96, 2-4 s)")
    parser.add_argument("--long", type=int, default=2, help="longer clips to render (640x480, 10 s at 30 fps)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many passes")
    args = parser.parse_args(argv)

    from resources.video import decoder_name, probe_and_sample

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        groups: dict[str, list[str]] = {}
        if args.paths:
            groups["given clips"] = list(args.paths)
        else:
            from assets.manifest import render_corpus

            if args.clips:
                groups["embedded corpus, 128x96"] = render_corpus(tmp / "corpus", args.clips, seed=0).path.tolist()
            if args.long:
                groups["long, 640x480, 300 frames"] = [str(render_long_clip(tmp / f"long_{i}.mp4")) for i in range(args.long)]

        print(f"{decoder_name()} vs PyAV: {args.frames} frames per clip, resized to {args.size}x{args.size}, best of {args.repeat}")
        print(f"{'clips':<28} {'n':>3} {'project fps':>12} {'PyAV fps':>10} {'ratio':>6} {'cached fps':>11}")
        for name, paths in groups.items():
            # the indices the project's protocol picks, and a warm cache for the cached column
            probes = [probe_and_sample(p, args.frames, args.size, tmp / "frames", duplicate_frame_fraction=1.01) for p in paths]
            for p, probe in zip(paths, probes):
                ours = probe["frames"]
                theirs = pyav_sample(p, probe["sampling"]["indices"], args.size)
                diff = np.abs(ours.astype(int) - theirs.astype(int)).mean()
                if diff > 8:
                    print(f"  note: {Path(p).name}: decord and PyAV frames differ by {diff:.1f} grey levels on average")
            n_frames = args.frames * len(paths)
            t_ours = timed(lambda: [probe_and_sample(p, args.frames, args.size, None, 1.01) for p in paths], args.repeat)
            t_av = timed(lambda: [pyav_sample(p, pr["sampling"]["indices"], args.size) for p, pr in zip(paths, probes)], args.repeat)
            t_cache = timed(lambda: [probe_and_sample(p, args.frames, args.size, tmp / "frames", 1.01) for p in paths], args.repeat)
            print(
                f"{name:<28} {len(paths):>3} {n_frames / t_ours:>12.0f} {n_frames / t_av:>10.0f} "
                f"{t_av / t_ours:>5.1f}x {n_frames / t_cache:>11.0f}"
            )
    print("ratio = PyAV time / project time (above 1: the project's decord sampling is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
