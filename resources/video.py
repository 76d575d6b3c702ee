"""Video decoding: probe a clip, sample frames uniformly, check what was decoded, cache by content hash.

`probe_and_sample` is the one entry point curation uses. decord2 decodes and resizes while decoding
(PIL resizes where decord refuses the size); PyAV decodes what decord cannot open. It checks what it
decoded, not only that decoding returned:
- decord seeks through an index of frame timestamps. A container without presentation timestamps
  (an AVI with B-frames) gives an index of about -3e17 s, and seeks land on wrong frames without an
  error. The sampled frames' timestamps must look sound (`timestamp_problem`), else the clip is
  decoded again in order.
- decord can seek wrong with sound timestamps too: it lists a keyframe shown after B-frames decoded
  from it (MPEG-4 part 2 with B-frames in mp4 or mkv, open GOPs) where it is decoded, two frames
  early, and lands two frames late. Its keyframes must be where PyAV's packets put them
  (`keyframe_problem`), else the clip is decoded again in order.
- decord replaces undecodable frames with the nearest good one (see DESIGN.md, Pitfalls), so a clip
  whose consecutive sampled frames are mostly byte-identical is rejected (`duplicate_fraction`). So
  is a genuinely still clip: it carries no motion to describe either.
How each clip was decoded goes into its probe's `sampling`: decoder, decode_path, verification, resizer.

Frames are stored once per (file content, sampling) as <cache_dir>/<sha256>_<n>x<size>.npy with a
sidecar .json holding the probe; a clip whose sha256 is unchanged is never decoded again. Decoder
failures are cached in the sidecar too (they depend only on the bytes and the decoders' versions).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from pathlib import Path

import numpy as np

CACHE_FORMAT = 2  # bump when the sidecar's probe changes shape (2: decord resizes, decode_path, PyAV fallback)
RESIZER = "PIL bilinear, aspect ratio not kept"
DECORD_RESIZER = "decord while decoding (FFmpeg scale filter, bicubic), aspect ratio not kept"
SAMPLING_METHOD = "uniform: round(linspace(0, n_frames - 1, frame_count)), endpoints included"
# Native frames decoded at once where PIL resizes: 8 frames of 1080p are 50 MB, a whole sample can be GBs.
NATIVE_CHUNK = 8

# decord prefixes its C++ errors with "[hh:mm:ss] /project/src/...cc:123: "; people need only the rest.
_DECORD_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")
# Top-level box types an mp4/mov starts with; used to tell "not a video" from "broken video".
_ISO_BMFF_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"styp"}
# import_decord swaps importlib.util.find_spec for the whole process while decord imports.
_IMPORT_LOCK = threading.Lock()
# Byte-identical clips probed by two workers at once: the second waits and reads the first's cache, so
# what is decoded and what is a cache hit does not depend on timing. One small lock per clip seen.
_SHA_LOCKS: dict[str, threading.Lock] = {}
_SHA_LOCKS_GUARD = threading.Lock()


class VideoError(ValueError):
    """A clip that can't be used; `reason` is for people, `kind` a short code for counts, `probe` what
    was seen of the clip before it failed (frames, fps, size, codec where known; None: not looked)."""

    def __init__(self, reason: str, kind: str = "unreadable", probe: dict | None = None):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.probe = probe


def import_decord():
    """`import decord`, without decord2's preload of every pip-installed nvidia/*/lib/*.so.

    On import, decord2 3.4 dlopens each library under site-packages/nvidia/ with RTLD_GLOBAL,
    libnvblas among them. torch's CUDA wheels install those; once libnvblas is global it takes over
    BLAS calls, and the next large torch or numpy matmul dies ("[NVBLAS] CPU Blas library need to be
    provided", then a segfault; cf. dmlc/decord#293, #324). The CPU build of decord2 needs none of
    them, so the `nvidia` package is hidden while decord imports. Import decord through this.
    """
    if "decord" in sys.modules:
        return sys.modules["decord"]
    import importlib.util

    with _IMPORT_LOCK:
        if "decord" in sys.modules:
            return sys.modules["decord"]
        real = importlib.util.find_spec

        def find_spec(name, *args, **kwargs):
            return None if name == "nvidia" else real(name, *args, **kwargs)

        importlib.util.find_spec = find_spec
        try:
            import decord
        finally:
            importlib.util.find_spec = real
        decord.logging.set_level(decord.logging.QUIET)
    return decord


def decoder_name() -> str:
    return f"decord2 {import_decord().__version__}"


def pyav_name() -> str:
    import av

    return f"PyAV {av.__version__}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sample_indices(total: int, count: int) -> list[int]:
    """`count` frame indices spread uniformly over [0, total - 1]; they repeat when total < count."""
    if total <= 0:
        return []
    return [int(i) for i in np.linspace(0, total - 1, count).round().astype(int)]


def repeated_pairs(frames: np.ndarray, indices: list[int] | None = None) -> list[bool]:
    """For each consecutive pair of sampled frames at different indices: are they byte-identical?

    Frames sampled twice at the same index (a clip shorter than the sample count) are compared once,
    so a short clip is not mistaken for a damaged one.
    """
    indices = list(indices) if indices is not None else list(range(len(frames)))
    return [
        bool(np.array_equal(frames[i], frames[i + 1]))
        for i in range(len(frames) - 1)
        if indices[i] != indices[i + 1]
    ]


def duplicate_fraction(frames: np.ndarray, indices: list[int] | None = None) -> float:
    """Share of consecutive sampled pairs (at different indices) that are byte-identical.

    decord fills frames it cannot decode with the nearest good one, so a damaged stretch shows up
    as a run of identical pairs; the share estimates how much of the clip that stretch covers. A
    pair count rather than a frame count: one still moment makes one identical pair, not two
    "repeated" frames. No pairs → 0.0.
    """
    same = repeated_pairs(frames, indices)
    return float(np.mean(same)) if same else 0.0


def sniff_container(head: bytes) -> str | None:
    """The container the first bytes announce, or None when they match none we know."""
    if len(head) >= 8 and head[4:8] in _ISO_BMFF_BOXES:
        return "mp4/mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska/webm"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"FLV"):
        return "flv"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"\x00\x00\x01\xba") or head.startswith(b"\x00\x00\x01\xb3"):
        return "mpeg-ps"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "mpeg-ts"
    return None


def iso_bmff_problem(path: Path) -> str | None:
    """Walk the top-level boxes of an mp4/mov: a box running past the end of the file means truncation."""
    size = path.stat().st_size
    offset, seen = 0, []
    with open(path, "rb") as fh:
        while offset < size:
            fh.seek(offset)
            header = fh.read(16)
            if len(header) < 8:
                return f"truncated: {size - offset} stray bytes after box {seen[-1] if seen else '-'}"
            box_size = int.from_bytes(header[:4], "big")
            kind = header[4:8].decode("latin-1")
            if box_size == 1:
                if len(header) < 16:
                    return f"truncated: box '{kind}' header cut off"
                box_size = int.from_bytes(header[8:16], "big")
            elif box_size == 0:  # runs to the end of the file
                box_size = size - offset
            if box_size < 8:
                return f"corrupt: box '{kind}' at byte {offset} has size {box_size}"
            if offset + box_size > size:
                return f"truncated: box '{kind}' at byte {offset} needs {box_size} bytes, file ends after {size - offset}"
            seen.append(kind)
            offset += box_size
    if "moov" not in seen:
        return "corrupt: no 'moov' box (no index of the frames)"
    return None


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Every frame to size x size with PIL (RESIZER): for sizes decord refuses, PyAV's frames, capping."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames])


def _detail(exc: BaseException) -> str:
    if isinstance(exc, VideoError):
        return exc.reason
    return _DECORD_PREFIX.sub("", " ".join(str(exc).split()))[:200] or type(exc).__name__


def _classify_failure(path: Path, exc: Exception, av_exc: Exception | None = None) -> VideoError:
    """Why neither decoder could read the clip: not a video, a truncated mp4, or undecodable."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    container = sniff_container(head)
    both = f"decord: {_detail(exc)}" + (f"; PyAV: {_detail(av_exc)}" if av_exc is not None else "")
    if container is None:
        looks = "text" if _looks_like_text(head) else "binary data"
        return VideoError(
            f"not a video: content is {looks}, no known container signature (starts {head[:12]!r}); {both}", "not_a_video"
        )
    if container == "mp4/mov":
        problem = iso_bmff_problem(path)
        if problem:
            return VideoError(f"truncated or corrupt mp4: {problem}", "truncated")
    return VideoError(f"undecodable {container} video: {both}", "undecodable")


def _both_failed(path: Path, decord_err: Exception, av_err: Exception) -> VideoError:
    if isinstance(decord_err, VideoError):
        return VideoError(f"decord: {decord_err.reason}; PyAV: {_detail(av_err)}", decord_err.kind, decord_err.probe)
    return _classify_failure(path, decord_err, av_err)


def timestamp_problem(ts, indices: list[int], fps: float) -> str | None:
    """Why decord's timestamps of the sampled frames can't be trusted for seeking, or None.

    decord seeks through its index of presentation timestamps. A container without them (an AVI
    with B-frames) yields AV_NOPTS_VALUE x time base, about -3e17 s, and seeks land on wrong frames.
    Sound timestamps (decord's get_frame_timestamp: (start, end) s per index) are finite, not
    negative, increase with the index and lie within a frame duration of index/fps, counted from
    the first sampled frame (a stream may start late: MPEG-TS, edit lists). A variable-frame-rate
    clip can fail the last test with a sound index: it is then read in order, slower but right.
    """
    start = np.asarray(ts, dtype=np.float64).reshape(len(indices), -1)[:, 0]
    idx = np.asarray(indices)
    tol = 1.0 / fps + 1e-3
    if not np.isfinite(start).all():
        return f"timestamps not finite ({start[~np.isfinite(start)][0]})"
    if start.min() < -tol:
        return f"negative timestamps (down to {start.min():.3g} s)"
    if (np.diff(start)[np.diff(idx) > 0] <= 0).any():
        return "timestamps do not increase with the frame index"
    off = start - start[0] - (idx - idx[0]) / fps
    worst = int(np.argmax(np.abs(off)))
    if abs(off[worst]) > tol:
        return (
            f"frame {idx[worst]} at {start[worst] - start[0]:.3f} s after frame {idx[0]}, "
            f"expected {(idx[worst] - idx[0]) / fps:.3f} s at {fps:g} fps"
        )
    return None


def needs_seek(indices: list[int], keys: list[int]) -> bool:
    """Does decord seek for any of the sorted `indices`? Only past its second keyframe: before it,
    frames are decoded in order from the start, which is right whatever decord's index says."""
    return len(keys) > 1 and max(indices) >= sorted(keys)[1]


def _quarter_turns(frame) -> int:
    # decord turns frames upright by the stream's display matrix; PyAV leaves that to us.
    return round((getattr(frame, "rotation", 0) or 0) / 90) % 4


def _rgb(frame, turns: int) -> np.ndarray:
    """A PyAV frame as RGB at native size, upright like decord's."""
    rgb = frame.to_ndarray(format="rgb24")
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _keyframe_indices(container, stream) -> list[int] | None:
    """Display-order indices of the stream's keyframes, from its packets (no decoding); None when
    packets carry no presentation timestamps (then their order says nothing)."""
    pts, key_pts = [], set()
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        if packet.pts is None:
            return None
        pts.append(packet.pts)
        if packet.is_keyframe:
            key_pts.add(packet.pts)
    return [i for i, p in enumerate(sorted(pts)) if p in key_pts]


def pyav_look(path: str | Path) -> dict:
    """What PyAV sees of a clip: container, codec, display width and height (turned upright as
    decord turns them), rotation, the container's frame rate and count, and the display-order
    indices of the keyframes ("keys", None when unknown). Reads every packet and decodes the first
    frame: decord can't give the native size once it resizes, nor the keyframes' true places."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        keys = _keyframe_indices(container, stream)
        container.seek(0)
        first = next(container.decode(stream))
        turns = _quarter_turns(first)
        width, height = (first.height, first.width) if turns % 2 else (first.width, first.height)
        return {
            "container": container.format.name, "codec": stream.codec_context.name, "width": int(width),
            "height": int(height), "rotation": 90 * turns, "fps": float(stream.average_rate or stream.guessed_rate or 0),
            "n_frames": int(stream.frames or 0), "keys": keys,
        }


def keyframe_problem(decord_keys: list[int], stream_keys: list[int] | None) -> str | None:
    """Why decord's keyframe index can't be trusted for seeking, or None.

    decord seeks to the keyframe it lists before the wanted frame and counts frames from there.
    Where a keyframe is shown after B-frames decoded from it (MPEG-4 part 2 with B-frames, open
    GOPs), decord lists it at its decoding position, two frames early, and every seek past it lands
    that many frames late, with sound timestamps. The stream's own keyframes, in display order,
    must be where decord lists them.
    """
    if stream_keys is None or list(decord_keys) == list(stream_keys):
        return None
    first = next((i for i, (a, b) in enumerate(zip(decord_keys, stream_keys)) if a != b), min(len(decord_keys), len(stream_keys)))
    return (
        f"decord lists keyframes at {list(decord_keys[first:first + 3])}, the stream has them at "
        f"{list(stream_keys[first:first + 3])} ({len(decord_keys)} vs {len(stream_keys)} keyframes)"
    )


def pyav_seen(path: str | Path) -> dict:
    """What PyAV's header read says of a clip (container, codec, size, fps, frame count, duration),
    for a reject's record; {} when PyAV can't open it, keys left out when it does not say."""
    try:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            cc = stream.codec_context
            seen = {
                "container": container.format.name, "codec": cc.name, "width": int(cc.width), "height": int(cc.height),
                "fps": float(stream.average_rate or 0), "n_frames": int(stream.frames or 0),
                "duration_s": round(container.duration / 1e6, 4) if container.duration else 0,
            }
    except Exception:  # PyAV refusing the file is what the reason already says
        return {}
    return {k: v for k, v in seen.items() if v}


def _frames_at(reader, indices: list[int], sequential: bool, chunk: int):
    """(index, frame) for each of the sorted `indices`: by decord's seeking get_batch, or, sequential,
    taking every frame in order with next() from a reader that has not read yet. Not skip_frames:
    it lands on wrong frames past a keyframe where seeking does (MPEG-4 part 2 with B-frames)."""
    if not sequential:
        for start in range(0, len(indices), chunk):
            idx = indices[start : start + chunk]
            yield from zip(idx, reader.get_batch(idx).asnumpy())
        return
    pos, last = 0, None
    for i in indices:
        if last is None or last[0] != i:
            try:
                while pos <= i:
                    frame, pos = reader.next(), pos + 1
            except StopIteration:
                raise RuntimeError(f"the stream ended before frame {i} of the {len(reader)} decord counts") from None
            last = (i, frame.asnumpy())
        yield last


def _pyav_frames_at(path: Path, indices: list[int]):
    """(index, native RGB frame, upright) for each of the sorted `indices`, decoding in order with PyAV."""
    import av

    pos = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for n, frame in enumerate(container.decode(stream)):
            if n < indices[pos]:
                continue
            rgb = _rgb(frame, _quarter_turns(frame))
            while pos < len(indices) and indices[pos] == n:
                yield n, rgb
                pos += 1
            if pos == len(indices):
                return
    raise RuntimeError(f"PyAV's stream ended before frame {indices[pos]}")


def _collect(items, count: int, size: int, pil: bool):
    """(frames, pairs, shape): the sampled frames as (count, size, size, 3) uint8, resized with PIL
    when `pil`; each consecutive pair of indices that differ, with whether its frames are
    byte-identical as given; and the frames' shape as given."""
    frames = np.empty((count, size, size, 3), np.uint8)
    pairs, shape, prev, n = [], None, None, 0
    for n, (i, frame) in enumerate(items, 1):
        if not pil and frame.shape != (size, size, 3):  # decord2's next() returns a refused size as (h, w, 4)
            raise RuntimeError(f"decord resized to {frame.shape}, not {(size, size, 3)}")
        if frame.ndim != 3 or frame.shape[2] != 3 or shape not in (None, frame.shape):
            raise VideoError(f"decoded frames change shape mid-clip: {frame.shape} after {shape}", "undecodable")
        shape = frame.shape
        if prev is not None and prev[0] != i:
            pairs.append(((prev[0], i), bool(np.array_equal(prev[1], frame))))
        prev = (i, frame)
        frames[n - 1] = resize_frames(frame[None], size)[0] if pil else frame
    if n != count:
        raise VideoError(f"decoded {n} of the {count} sampled frames", "undecodable")
    return frames, pairs, shape


def _native_repeats(path: Path, pairs: list, sequential: bool) -> list[bool]:
    """Per pair: are its frames byte-identical at native size? Equal frames resize to equal frames,
    but resizing can erase a small difference, so only pairs identical after decord's resize are
    decoded again natively; for a healthy clip that is none."""
    suspects = {p for p, same in pairs if same}
    if not suspects:
        return [False] * len(pairs)
    reader = import_decord().VideoReader(str(path), num_threads=0)
    native, prev = {}, None
    for i, frame in _frames_at(reader, sorted({i for p in suspects for i in p}), sequential, NATIVE_CHUNK):
        if prev is not None and (prev[0], i) in suspects:
            native[(prev[0], i)] = bool(np.array_equal(prev[1], frame))
        prev = (i, frame)
    return [native.get(p, False) for p, _ in pairs]


def _native_shape(path: Path) -> tuple[int, int]:
    """(height, width) of decord's native frames, for when PyAV cannot say."""
    return tuple(import_decord().VideoReader(str(path), num_threads=0).next().shape[:2])


def _decord_reader(path: Path, size: int, decord_resizes: bool):
    """(reader, frame count, fps), refusing a clip whose count or rate decord can't read."""
    resize = {"width": size, "height": size} if decord_resizes else {}
    reader = import_decord().VideoReader(str(path), num_threads=0, **resize)
    total, fps = len(reader), float(reader.get_avg_fps())
    seen = {"n_frames": int(total), "fps": fps if np.isfinite(fps) else None}
    if total <= 0:
        raise VideoError("no frames: decord reports a frame count of 0", "no_frames", seen)
    if not np.isfinite(fps) or fps <= 0:
        raise VideoError(f"no usable frame rate (decord reports {fps})", "bad_metadata", seen)
    return reader, total, fps


def _read_verified(path: Path, indices: list[int], size: int, decord_resizes: bool, fps: float, reader):
    """(frames, pairs, shape, view, sequential, decode_path, verification): decord's sampled frames,
    by seeking where its timestamps and keyframes are sound, else decoded in order.

    Both are index checks, cheap next to decoding: PyAV reads the packets and decodes one frame, 3-5%
    of a clip's time on 640x480 and 1280x720 H.264 (docs/decoding.md). No sampled frame is
    cross-checked against a sequential read: tried on an mp4 with B-frames whose seeks land two
    frames late, the frame checked came out right (decord steps forward to some frames and seeks to
    others) where the keyframe check caught the clip every time, and decoding the frames around one
    sought frame cost another 6-10%."""
    problem, how = timestamp_problem(reader.get_frame_timestamp(indices), indices, fps), "bad timestamps"
    keys = reader.get_key_indices()
    seeks = problem is None and needs_seek(indices, keys)
    try:
        view = pyav_look(path)
    except Exception as exc:  # decord can read it, PyAV can't: no second opinion on the keyframes
        view = None
        if seeks:
            problem, how = f"PyAV could not list the keyframes: {_detail(exc)}", "an unchecked keyframe index"
    else:
        if seeks:
            problem, how = keyframe_problem(keys, view["keys"]), "bad keyframe index"
    chunk = len(indices) if decord_resizes else NATIVE_CHUNK
    sequential = problem is not None
    frames, pairs, shape = _collect(_frames_at(reader, indices, sequential, chunk), len(indices), size, not decord_resizes)
    if sequential:
        return frames, pairs, shape, view, True, f"decord sequential re-read after {how}", problem
    checked = "timestamps and keyframes verified" if seeks else "timestamps verified; no sampled frame needs a seek"
    return frames, pairs, shape, view, False, "decord seek, timestamps verified", checked


def _decord_sample(path: Path, n_frames: int, size: int, decord_resizes: bool) -> tuple[dict, np.ndarray]:
    """Sample with decord, resizing while decoding or at native size then with PIL."""
    reader, total, fps = _decord_reader(path, size, decord_resizes)
    indices = sample_indices(total, n_frames)
    frames, pairs, shape, view, sequential, how, verification = _read_verified(path, indices, size, decord_resizes, fps, reader)
    if decord_resizes:
        same = _native_repeats(path, pairs, sequential)
        height, width = (view["height"], view["width"]) if view else _native_shape(path)
    else:
        same = [s for _, s in pairs]
        height, width = shape[:2]
    sampling = {
        "resizer": DECORD_RESIZER if decord_resizes else RESIZER, "decoder": decoder_name(),
        "decode_path": how, "verification": verification,
    }
    return _probe(total, fps, width, height, view["codec"] if view else None, same, indices, size, sampling), frames


def _pyav_count(path: Path) -> tuple[int, float, str]:
    """(frames, fps, codec) by decoding the whole stream: the count decord could not read from the
    container. fps: the stream's rate, else measured from the first and last frame's time."""
    import av

    total, first, last = 0, None, None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            total += 1
            if frame.time is not None:
                first, last = (frame.time if first is None else first), frame.time
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        codec = stream.codec_context.name
    if not fps and total > 1 and first is not None and last > first:
        fps = (total - 1) / (last - first)
    return total, fps, codec


def _pyav_sample(path: Path, n_frames: int, size: int, why: Exception) -> tuple[dict, np.ndarray]:
    """Sample with PyAV, decoding in order (twice: counting, then sampling), resized with PIL."""
    total, fps, codec = _pyav_count(path)
    seen = {"n_frames": total, "fps": fps if np.isfinite(fps) else None, "codec": codec}
    if total <= 0:
        raise VideoError("no frames: PyAV decodes none", "no_frames", seen)
    if not np.isfinite(fps) or fps <= 0:
        raise VideoError(f"no usable frame rate (PyAV reports {fps})", "bad_metadata", seen)
    indices = sample_indices(total, n_frames)
    frames, pairs, shape = _collect(_pyav_frames_at(path, indices), len(indices), size, True)
    sampling = {
        "resizer": RESIZER, "decoder": pyav_name(), "decode_path": f"PyAV fallback: {_detail(why)}",
        "verification": f"decoded in order, {total} frames counted; nothing sought",
    }
    return _probe(total, fps, shape[1], shape[0], codec, [s for _, s in pairs], indices, size, sampling), frames


def _probe(total, fps, width, height, codec, same, indices, size, sampling) -> dict:
    return {
        "duration_s": round(total / fps, 4),
        "fps": float(fps),
        "width": int(width),
        "height": int(height),
        "n_frames": int(total),
        "codec": codec,
        "repeated_pair_share": float(np.mean(same)) if same else 0.0,
        "sampling": {
            "frame_count": len(indices),
            "indices": indices,
            "resize": f"{size}x{size}",
            "method": SAMPLING_METHOD,
            **sampling,
        },
    }


def _decode(path: Path, n_frames: int, size: int) -> tuple[dict, np.ndarray]:
    """decord resizing while decoding; decord at native size + PIL where decord's resize fails; PyAV
    where decord fails. Raises VideoError naming both decoders' errors when both fail."""
    try:
        try:
            return _decord_sample(path, n_frames, size, True)
        except VideoError:
            raise
        except Exception:  # decord2 refuses some sizes ("DECORDArrayCopyFromTo: The size must exactly match")
            return _decord_sample(path, n_frames, size, False)
    except Exception as decord_err:  # decord raises RuntimeError / DECORDError / AssertionError
        try:
            return _pyav_sample(path, n_frames, size, decord_err)
        except Exception as av_err:
            raise _both_failed(path, decord_err, av_err) from None


def _decode_file(p: Path, n_frames: int, size: int) -> tuple[dict, np.ndarray]:
    with open(p, "rb") as fh:
        head = fh.read(512)
    if sniff_container(head) == "mp4/mov" and (problem := iso_bmff_problem(p)):
        raise VideoError(f"truncated or corrupt mp4: {problem}", "truncated")
    return _decode(p, n_frames, size)


def frames_file(cache_dir: Path, sha256: str, n_frames: int, size: int) -> Path:
    return Path(cache_dir) / f"{sha256}_{n_frames}x{size}.npy"


def _part(path: Path, suffix: str) -> Path:
    # One temporary name per writer: two runs (or workers) may write the same clip's files at once.
    return path.with_name(f"{path.stem}.{os.getpid()}-{threading.get_ident()}.part{suffix}")


def _save_npy(path: Path, frames: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _part(path, ".npy")
    np.save(tmp, frames)
    tmp.replace(path)


def _save_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _part(path, "")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def _sha_lock(sha: str) -> threading.Lock:
    with _SHA_LOCKS_GUARD:
        return _SHA_LOCKS.setdefault(sha, threading.Lock())


def seen_of(probe: dict) -> dict:
    """The part of a probe a reject records: frames, fps, duration, size, codec."""
    keys = ("n_frames", "fps", "duration_s", "width", "height", "codec")
    return {k: probe[k] for k in keys if probe.get(k) is not None}


def _cached_or_decoded(p: Path, npy: Path | None, n_frames: int, size: int) -> tuple[dict, np.ndarray, bool]:
    decoders = f"{decoder_name()}; {pyav_name()}"
    json_path = npy.with_suffix(".json") if npy is not None else None
    if json_path is not None and json_path.exists():
        doc = json.loads(json_path.read_text())
        if doc.get("decoder") == decoders and doc.get("format") == CACHE_FORMAT:
            if doc.get("error"):
                raise VideoError(doc["error"]["reason"], doc["error"]["kind"], doc["error"].get("probe", {}))
            if npy.exists():
                return doc["probe"], np.load(npy), True
    try:
        probe, frames = _decode_file(p, n_frames, size)
    except VideoError as err:
        err.probe = {**pyav_seen(p), **{k: v for k, v in (err.probe or {}).items() if v is not None}}
        if json_path is not None:
            error = {"reason": err.reason, "kind": err.kind, "probe": err.probe}
            _save_json(json_path, {"format": CACHE_FORMAT, "decoder": decoders, "error": error})
        raise
    if npy is not None:
        _save_npy(npy, frames)
        _save_json(json_path, {"format": CACHE_FORMAT, "decoder": decoders, "probe": probe})
    return probe, frames, False


def probe_and_sample(
    path: str | Path,
    n_frames: int,
    size: int,
    cache_dir: str | Path | None = None,
    duplicate_frame_fraction: float = 0.75,
) -> dict:
    """Probe a clip and sample `n_frames` frames resized to size×size.

    Returns duration_s, fps, width, height (native, upright), n_frames (the clip's total), codec,
    sha256, frames (uint8 (n_frames, size, size, 3)), sampling (the protocol: frame_count, indices,
    resize, resizer, decoder, decode_path, verification, method), repeated_pair_share, frames_path
    (the cached .npy, or None without a cache_dir) and cached (True when no decoding happened).
    Raises VideoError with a reason a person can act on and what the probe saw; decoder failures are
    cached like frames, so a broken file is not decoded twice either. Safe to call from threads.
    """
    text = str(path)
    if "://" in text:
        raise VideoError("remote URL; download not supported offline", "remote_url", {})
    p = Path(text)
    if not p.exists():
        raise VideoError(f"missing file: {p} does not exist", "missing", {})
    if not p.is_file():
        what = "a directory" if p.is_dir() else "not a regular file"
        raise VideoError(f"not a file: {p} is {what}", "not_a_file", {})
    if p.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)", "empty", {})
    sha = sha256_file(p)
    npy = frames_file(Path(cache_dir), sha, n_frames, size) if cache_dir is not None else None
    with _sha_lock(sha):
        probe, frames, cached = _cached_or_decoded(p, npy, n_frames, size)
    share = probe["repeated_pair_share"]
    if share >= duplicate_frame_fraction:
        raise VideoError(
            f"mostly identical sampled frames: {share:.0%} of consecutive sampled pairs are byte-identical"
            f" (limit {duplicate_frame_fraction:.0%}); a damaged stream decodes as repeats of the last good frame",
            "duplicate_frames",
            seen_of(probe),
        )
    return {**probe, "sha256": sha, "frames": frames, "frames_path": str(npy) if npy else None, "cached": cached}


def load_frames(path: str | Path) -> np.ndarray:
    """The sampled frames saved by probe_and_sample: uint8 (n_frames, size, size, 3)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: materialize 'curated_videos' first")
    return np.load(p)


def row_frames(row: dict) -> np.ndarray:
    """The sampled frames of a training row (its `frames_path`), as the trainers' collators load them."""
    return load_frames(row["frames_path"])


def capped_frames(frames: np.ndarray, max_frames: int | None = None, max_size: int | None = None) -> np.ndarray:
    """At most max_frames frames, taken evenly, each resized down so its longer side is at most
    max_size (square frames, as sampled); None leaves that side as it is."""
    if max_frames is not None and len(frames) > max_frames:
        frames = frames[np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    if max_size is not None and max(frames.shape[1:3]) > max_size:
        frames = resize_frames(frames, max_size)
    return frames


def load_frames_of(paths) -> list[np.ndarray]:
    """The sampled frames of each row; a clip asked for by many rows (its queries) is read once."""
    cache: dict[str, np.ndarray] = {}
    return [cache[str(p)] if str(p) in cache else cache.setdefault(str(p), load_frames(p)) for p in paths]
