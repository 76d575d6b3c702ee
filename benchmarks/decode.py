"""Time of the project's frame sampling (resources/video.py) against bare decord2 and bare PyAV
sampling the same frames, on the same clips, in one run.

    .venv/bin/python -m benchmarks.decode                          # rendered clips, 16 frames at 224 px
    .venv/bin/python -m benchmarks.decode --frames 8 --size 64     # the embedded profile's sampling
    .venv/bin/python -m benchmarks.decode --clips 0 --long 0 --h264 640x480 --h264 1280x720
    .venv/bin/python -m benchmarks.decode a.mp4 b.mp4              # your own clips

Every method decodes the frame indices the project's sampling protocol picks:
- project: probe_and_sample without a cache (hashing, decord with its own resize, the timestamp
  and keyframe checks, the duplicate check);
- decord: bare decord2, VideoReader(path, width=size, height=size).get_batch(indices), no checks;
- decord+PIL: bare decord2 at native size, resized with PIL (how the project sampled before);
- PyAV: decoding in order up to the last index, resized by PyAV (what a plain PyAV loader does);
- PyAV look: what the project adds per clip for the keyframe check and the native size (PyAV
  reads every packet and decodes the first frame), alone;
- cached: probe_and_sample reading the cached .npy instead of decoding.
The methods run round-robin, once each per repetition, so drift in the machine's load hits all of
them alike; the table shows medians. Not a test: numbers depend on the machine.
"""
import argparse
import statistics
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


def render_h264(path: Path, width: int, height: int, seconds: int = 10, fps: int = 30, gop: int | None = None) -> Path:
    """An H.264 mp4 like a camera's or a site's: a blocky texture panning under noise, x264 at crf 20
    (B-frames, keyframes every `gop` frames; None: x264's default of 250)."""
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height // 8, width // 4, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast", **({"g": str(gop)} if gop else {})}
        for t in range(seconds * fps):
            x = (t * 3) % width
            noise = rng.integers(-16, 17, (height, width, 3))
            frame = np.clip(base[:, x : x + width].astype(np.int16) + noise, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def pyav_sample(path: str, indices: list[int], size: int) -> np.ndarray:
    """Decode in order with PyAV and keep the frames at `indices`, resized by PyAV (FFmpeg's swscale)."""
    import av

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
                rgb = frame.to_ndarray(format="rgb24", width=size, height=size)
                for pos in wanted[n]:
                    out[pos] = rgb
            if n >= last:
                break
    if any(f is None for f in out):
        raise RuntimeError(f"{path}: PyAV ran out of frames before index {last}")
    return np.stack(out)


def decord_sample(path: str, indices: list[int], size: int) -> np.ndarray:
    from resources.video import import_decord

    return import_decord().VideoReader(path, width=size, height=size, num_threads=0).get_batch(indices).asnumpy()


def decord_pil_sample(path: str, indices: list[int], size: int) -> np.ndarray:
    from resources.video import import_decord, resize_frames

    reader = import_decord().VideoReader(path, num_threads=0)
    return np.concatenate([resize_frames(reader.get_batch(indices[i : i + 8]).asnumpy(), size) for i in range(0, len(indices), 8)])


def pyav_look_only(path: str, indices: list[int], size: int) -> None:
    """The PyAV look probe_and_sample adds to a decord-decoded clip (packets, first frame), alone."""
    from resources.video import pyav_look

    pyav_look(path)


def methods(paths: list[str], probes: list[dict], frames: int, size: int, cache: Path) -> dict:
    from resources.video import probe_and_sample

    both = list(zip(paths, [p["sampling"]["indices"] for p in probes]))
    out = {
        "project": lambda: [probe_and_sample(p, frames, size, None, 1.01) for p in paths],
        "decord": lambda: [decord_sample(p, i, size) for p, i in both],
        "decord+PIL": lambda: [decord_pil_sample(p, i, size) for p, i in both],
        "PyAV": lambda: [pyav_sample(p, i, size) for p, i in both],
        "PyAV look": lambda: [pyav_look_only(p, i, size) for p, i in both],
        "cached": lambda: [probe_and_sample(p, frames, size, cache, 1.01) for p in paths],
    }
    try:
        out["decord"]()
    except Exception as exc:  # decord2 refuses some sizes; the project falls back to PIL there
        print(f"  note: bare decord can't resize to {size}x{size} ({' '.join(str(exc).split())[-60:]})")
        del out["decord"]
    return out


def round_robin(fns: dict, repeat: int) -> dict[str, float]:
    """Median seconds per method; each repetition runs every method once, in turn."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(name: str, paths: list[str], probes: list[dict], med: dict[str, float], frames: int) -> None:
    paths_taken = sorted({p["sampling"]["decode_path"].split(":")[0] for p in probes})
    print(f"\n{name}: {len(paths)} clips; project decode path: {', '.join(paths_taken)}")
    n = frames * len(paths)
    for method, seconds in med.items():
        ratio = seconds / med["project"]
        print(f"  {method:<12} {seconds * 1e3:>9.1f} ms {n / seconds:>9.0f} frames/s   {ratio:>5.2f}x the project's time")
    for other in ("decord", "decord+PIL", "PyAV"):
        if other in med:
            print(f"  project / {other}: {med['project'] / med[other]:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="clips to measure; default: render some")
    parser.add_argument("--clips", type=int, default=8, help="embedded-corpus clips to render (128x96, 2-4 s)")
    parser.add_argument("--long", type=int, default=2, help="longer clips to render (640x480 MPEG-4, 10 s at 30 fps)")
    parser.add_argument("--h264", action="append", default=[], metavar="WxH", help="render a 10 s H.264 mp4 of this size (repeatable)")
    parser.add_argument("--gop", type=int, default=None, help="keyframe interval of the --h264 clips (default: x264's 250)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions; medians are shown")
    args = parser.parse_args(argv)

    from resources.video import decoder_name, probe_and_sample, pyav_name

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        groups: dict[str, list[str]] = {}
        if args.paths:
            groups.update({Path(p).name: [p] for p in args.paths})
        else:
            from assets.manifest import render_corpus

            if args.clips:
                groups["embedded corpus, 128x96"] = render_corpus(tmp / "corpus", args.clips, seed=0).path.tolist()
            if args.long:
                groups["long, 640x480 MPEG-4, 300 frames"] = [str(render_long_clip(tmp / f"long_{i}.mp4")) for i in range(args.long)]
            for size in args.h264:
                w, h = (int(x) for x in size.lower().split("x"))
                groups[f"H.264 {w}x{h}, 300 frames, gop {args.gop or 250}"] = [str(render_h264(tmp / f"h264_{w}x{h}.mp4", w, h, gop=args.gop))]

        print(f"{decoder_name()}, {pyav_name()}: {args.frames} frames per clip at {args.size}x{args.size}, median of {args.repeat}")
        for name, paths in groups.items():
            # the indices the project's protocol picks, and a warm cache for the cached method
            probes = [probe_and_sample(p, args.frames, args.size, tmp / "frames", 1.01) for p in paths]
            med = round_robin(methods(paths, probes, args.frames, args.size, tmp / "frames"), args.repeat)
            report(name, paths, probes, med, args.frames)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
