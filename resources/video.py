"""Video decoding with decord2: probe a clip, sample frames uniformly, cache them by content hash.

`probe_and_sample` is the one entry point curation uses. It checks what it decoded, not only that
decoding returned: decord replaces undecodable frames with the nearest good one (see DESIGN.md,
Pitfalls), so a clip whose consecutive sampled frames are mostly byte-identical is rejected
(`duplicate_fraction`). So is a genuinely still clip: it carries no motion to describe either.

Frames are stored once per (file content, sampling) as <cache_dir>/<sha256>_<n>x<size>.npy with a
sidecar .json holding the probe; a clip whose sha256 is unchanged is never decoded again. Decoder
failures are cached in the sidecar too (they depend only on the bytes and the decoder version).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

CACHE_FORMAT = 1  # bump when the sidecar's probe changes shape
RESIZER = "PIL bilinear, aspect ratio not kept"
SAMPLING_METHOD = "uniform: round(linspace(0, n_frames - 1, frame_count)), endpoints included"

# decord prefixes its C++ errors with "[hh:mm:ss] /project/src/...cc:123: "; people need only the rest.
_DECORD_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")
# Top-level box types an mp4/mov starts with; used to tell "not a video" from "broken video".
_ISO_BMFF_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"styp"}


class VideoError(ValueError):
    """A clip that can't be used; `reason` is for people, `kind` a short code for counts."""

    def __init__(self, reason: str, kind: str = "unreadable"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


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


def _classify_failure(path: Path, exc: Exception) -> VideoError:
    with open(path, "rb") as fh:
        head = fh.read(512)
    container = sniff_container(head)
    detail = _DECORD_PREFIX.sub("", " ".join(str(exc).split()))[:200] or type(exc).__name__
    if container is None:
        looks = "text" if _looks_like_text(head) else "binary data"
        return VideoError(f"not a video: content is {looks}, no known container signature (starts {head[:12]!r})", "not_a_video")
    if container == "mp4/mov":
        problem = iso_bmff_problem(path)
        if problem:
            return VideoError(f"truncated or corrupt mp4: {problem}", "truncated")
    return VideoError(f"undecodable {container} video: {detail}", "undecodable")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Every frame to size x size with the one resizer of the sampling protocol (RESIZER)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames])


def _decode(path: Path, n_frames: int, size: int, chunk: int = 8) -> tuple[dict, np.ndarray]:
    """Open with decord, sample frames at native size in chunks, resize each with PIL.

    decord can resize while decoding, but decord2 3.4 fails ("DECORDArrayCopyFromTo: The size must
    exactly match") for some target sizes (8, 16, 24, 32, 48, 96 px wide seen), so resizing is ours:
    one resizer for every frame_size keeps the sampling protocol the same across settings.
    Repeated frames are judged on the native frames, which is what decord returned.
    """
    decord = import_decord()
    reader = decord.VideoReader(str(path), num_threads=0)
    total = len(reader)
    fps = float(reader.get_avg_fps())
    if total <= 0:
        raise VideoError("no frames: the decoder reports a frame count of 0", "no_frames")
    if not np.isfinite(fps) or fps <= 0:
        raise VideoError(f"no usable frame rate (decoder reports {fps})", "bad_metadata")
    indices = sample_indices(total, n_frames)
    parts, same, native = [], [], None
    last = None  # (index, frame) carried across chunks for the pair comparison
    for start in range(0, len(indices), chunk):
        idx = indices[start : start + chunk]
        batch = reader.get_batch(idx).asnumpy()
        native = native or batch.shape[1:3]
        if batch.ndim != 4 or batch.shape[1:3] != native or batch.shape[3] != 3:
            raise VideoError(f"decoded frames change shape mid-clip: {batch.shape}", "undecodable")
        if last is not None:
            same += repeated_pairs(np.stack([last[1], batch[0]]), [last[0], idx[0]])
        same += repeated_pairs(batch, idx)
        last = (idx[-1], batch[-1])
        parts.append(resize_frames(batch, size))
    del reader
    frames = np.concatenate(parts)
    if frames.shape != (n_frames, size, size, 3) or frames.dtype != np.uint8:
        raise VideoError(f"decoded frames have shape {frames.shape} {frames.dtype}, expected {(n_frames, size, size, 3)} uint8", "undecodable")
    height, width = native
    probe = {
        "duration_s": round(total / fps, 4),
        "fps": fps,
        "width": int(width),
        "height": int(height),
        "n_frames": int(total),
        "repeated_pair_share": float(np.mean(same)) if same else 0.0,
        "sampling": {
            "frame_count": n_frames,
            "indices": indices,
            "resize": f"{size}x{size}",
            "resizer": RESIZER,
            "decoder": decoder_name(),
            "method": SAMPLING_METHOD,
        },
    }
    return probe, frames


def frames_file(cache_dir: Path, sha256: str, n_frames: int, size: int) -> Path:
    return Path(cache_dir) / f"{sha256}_{n_frames}x{size}.npy"


def _save_npy(path: Path, frames: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part.npy")
    np.save(tmp, frames)
    tmp.replace(path)


def _save_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def probe_and_sample(
    path: str | Path,
    n_frames: int,
    size: int,
    cache_dir: str | Path | None = None,
    duplicate_frame_fraction: float = 0.75,
) -> dict:
    """Probe a clip and sample `n_frames` frames resized to size×size.

    Returns duration_s, fps, width, height, n_frames (the clip's total), sha256, frames (uint8
    (n_frames, size, size, 3)), sampling (the protocol: frame_count, indices, resize,
    resizer, decoder, method), repeated_pair_share, frames_path (the cached .npy, or None without a
    cache_dir) and cached (True when no decoding happened). Raises VideoError with a reason a person
    can act on; decoder failures are cached like frames, so a broken file is not decoded twice either.
    """
    text = str(path)
    if "://" in text:
        raise VideoError("remote URL; download not supported offline", "remote_url")
    p = Path(text)
    if not p.exists():
        raise VideoError(f"missing file: {p} does not exist", "missing")
    if not p.is_file():
        raise VideoError(f"not a file: {p}", "missing")
    if p.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)", "empty")
    sha = sha256_file(p)
    decoder = decoder_name()
    npy = json_path = None
    probe = frames = None
    cached = False
    if cache_dir is not None:
        npy = frames_file(Path(cache_dir), sha, n_frames, size)
        json_path = npy.with_suffix(".json")
        if json_path.exists():
            doc = json.loads(json_path.read_text())
            if doc.get("decoder") == decoder and doc.get("format") == CACHE_FORMAT:
                if doc.get("error"):
                    raise VideoError(doc["error"]["reason"], doc["error"]["kind"])
                if npy.exists():
                    probe, frames, cached = doc["probe"], np.load(npy), True
    if probe is None:
        with open(p, "rb") as fh:
            head = fh.read(512)
        try:
            if sniff_container(head) == "mp4/mov" and (problem := iso_bmff_problem(p)):
                raise VideoError(f"truncated or corrupt mp4: {problem}", "truncated")
            try:
                probe, frames = _decode(p, n_frames, size)
            except VideoError:
                raise
            except Exception as exc:  # decord raises RuntimeError / DECORDError / AssertionError
                raise _classify_failure(p, exc) from None
        except VideoError as err:
            if json_path is not None:
                _save_json(json_path, {"format": CACHE_FORMAT, "decoder": decoder, "error": {"reason": err.reason, "kind": err.kind}})
            raise
        if npy is not None:
            _save_npy(npy, frames)
            _save_json(json_path, {"format": CACHE_FORMAT, "decoder": decoder, "probe": probe})
    share = probe["repeated_pair_share"]
    if share >= duplicate_frame_fraction:
        raise VideoError(
            f"mostly identical sampled frames: {share:.0%} of consecutive sampled pairs are byte-identical"
            f" (limit {duplicate_frame_fraction:.0%}); a damaged stream decodes as repeats of the last good frame",
            "duplicate_frames",
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
