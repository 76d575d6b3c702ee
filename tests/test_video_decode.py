"""resources/video.py on clips that trip decord2: wrong seeks, unreadable metadata, refused resize sizes.

Each clip is written with PyAV and shows its own frame index as 8 black/white bars (bit k of the
index: bar k white), so a sampled frame says which frame it is, at any size it is resized to.
"""
from pathlib import Path

import numpy as np
import pytest

from resources.video import (
    DECORD_RESIZER,
    RESIZER,
    VideoError,
    import_decord,
    keyframe_problem,
    probe_and_sample,
    sample_indices,
    timestamp_problem,
)

W, H = 128, 96


def index_frame(i: int) -> np.ndarray:
    frame = np.zeros((H, W, 3), np.uint8)
    for bit in range(8):
        if (i >> bit) & 1:
            frame[:, bit * W // 8 : (bit + 1) * W // 8] = 255
    return frame


def frame_index(frame: np.ndarray) -> int:
    """The index index_frame drew, read from the middle of each bar (the frame may be upright-turned or resized)."""
    bar = frame.shape[1] / 8
    return sum(1 << b for b in range(8) if frame[:, int((b + 0.3) * bar) : int((b + 0.7) * bar)].mean() > 128)


def write_clip(path: Path, codec: str, n: int = 90, fps: int = 30, options=None, container_options=None, rotation=None) -> Path:
    import av

    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.gop_size = 10  # several keyframes: sampled frames past the first are reached by seeking
        stream.options = options or {}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def pyav_indices(path: Path, indices: list[int]) -> list[int]:
    """What a plain sequential PyAV read shows at `indices`."""
    import av

    with av.open(str(path)) as container:
        shown = [frame_index(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    return [shown[i] for i in indices]


def bare_decord(path: Path, indices: list[int]):
    """(timestamps, indices shown) from decord's own random access, no checks."""
    reader = import_decord().VideoReader(str(path))
    return reader.get_frame_timestamp(indices), [frame_index(f) for f in reader.get_batch(indices).asnumpy()]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    return {
        "avi": write_clip(root / "keyframes.avi", "mpeg4", options={"qscale": "3", "bf": "0"}),
        # B-frames in an AVI: no presentation timestamps, decord's index reads about -3e17 s
        "avi_bframes": write_clip(root / "bframes.avi", "mpeg4", options={"qscale": "3", "bf": "2"}),
        # B-frames in an mp4: sound timestamps, yet decord's seeks land two frames late
        "mp4_bframes": write_clip(root / "bframes.mp4", "mpeg4", options={"qscale": "3", "bf": "2"}),
        # written as a live stream: no duration, no cues; decord can't measure it
        "webm_live": write_clip(
            root / "live.webm", "libvpx", n=74, options={"b": "1M", "deadline": "realtime"}, container_options={"live": "1"}
        ),
        "rotated": write_clip(root / "rotated.mp4", "libx264", n=30, rotation=90),
    }


@pytest.mark.parametrize("name", ["avi", "avi_bframes"])
def test_avi_frames_are_the_requested_ones(clips, name):
    path = clips[name]
    out = probe_and_sample(path, 16, 64)
    s = out["sampling"]
    assert s["indices"] == sample_indices(90, 16) and out["n_frames"] == 90
    shown = [frame_index(f) for f in out["frames"]]
    assert shown == pyav_indices(path, s["indices"]) == s["indices"]
    ts, decord_shown = bare_decord(path, s["indices"])
    if timestamp_problem(ts, s["indices"], 30.0):  # decord2 3.4 on the B-frame AVI: -3e17 s, wrong frames
        assert s["decode_path"] == "decord sequential re-read after bad timestamps"
        assert "negative timestamps" in s["verification"]
    else:
        assert s["decode_path"] == "decord seek, timestamps verified" and decord_shown == s["indices"]


def test_open_gop_keyframes_are_caught_by_the_keyframe_check(clips):
    path = clips["mp4_bframes"]
    out = probe_and_sample(path, 16, 64)
    s = out["sampling"]
    assert [frame_index(f) for f in out["frames"]] == s["indices"]
    ts, decord_shown = bare_decord(path, s["indices"])
    assert timestamp_problem(ts, s["indices"], 30.0) is None
    if decord_shown != s["indices"]:  # decord2 3.4: keyframes listed 2 early, seeks land 2 frames late
        assert s["decode_path"] == "decord sequential re-read after bad keyframe index"
        assert "decord lists keyframes at [10, 19, 28], the stream has them at [12, 21, 30]" in s["verification"]


def test_healthy_clip_is_sought_and_verified(clips):
    out = probe_and_sample(clips["avi"], 16, 64)
    s = out["sampling"]
    assert s["decode_path"] == "decord seek, timestamps verified"
    assert s["verification"] == "timestamps and keyframes verified"
    assert s["decoder"].startswith("decord2") and s["resizer"] == DECORD_RESIZER


def test_bad_timestamps_mean_a_sequential_re_read(clips, monkeypatch):
    decord = import_decord()
    calls = []

    def broken(self, idx):
        calls.append(len(idx))
        return np.full((len(idx), 2), -3.074457345618258e17)

    monkeypatch.setattr(decord.VideoReader, "get_frame_timestamp", broken)
    out = probe_and_sample(clips["avi"], 16, 64)
    s = out["sampling"]
    assert calls and s["decode_path"] == "decord sequential re-read after bad timestamps"
    assert "-3.07e+17" in s["verification"]
    assert [frame_index(f) for f in out["frames"]] == s["indices"]


def test_webm_without_duration_is_decoded_by_pyav(clips):
    path = clips["webm_live"]
    with pytest.raises(Exception, match="broken metadata"):
        import_decord().VideoReader(str(path))
    out = probe_and_sample(path, 16, 64)
    s = out["sampling"]
    assert out["n_frames"] == 74 and out["fps"] == 30.0 and out["codec"] == "vp8"
    assert (out["width"], out["height"]) == (W, H) and out["frames"].shape == (16, 64, 64, 3)
    assert s["decode_path"].startswith("PyAV fallback: ") and "broken metadata" in s["decode_path"]
    assert s["decoder"].startswith("PyAV") and s["resizer"] == RESIZER
    assert s["indices"] == sample_indices(74, 16)
    assert [frame_index(f) for f in out["frames"]] == s["indices"]


def test_pyav_takes_over_whatever_decord_raises(clips, monkeypatch):
    decord = import_decord()

    def refuse(*args, **kwargs):
        raise RuntimeError("decord is down")

    monkeypatch.setattr(decord, "VideoReader", refuse)
    out = probe_and_sample(clips["avi_bframes"], 8, 48)
    assert out["sampling"]["decode_path"] == "PyAV fallback: decord is down"
    assert [frame_index(f) for f in out["frames"]] == out["sampling"]["indices"] == sample_indices(90, 8)
    assert (out["width"], out["height"]) == (W, H) and out["frames"].shape == (8, 48, 48, 3)


def test_both_decoders_failing_names_both(tmp_path):
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 8)
    with pytest.raises(VideoError) as err:
        probe_and_sample(junk, 8, 32)
    assert err.value.kind == "undecodable"
    assert "decord: " in err.value.reason and "; PyAV: " in err.value.reason


def _decord_refuses(path: Path, size: int) -> bool:
    reader = import_decord().VideoReader(str(path), width=size, height=size)
    try:
        return reader.get_batch([0]).asnumpy().shape != (1, size, size, 3)
    except Exception:
        return True


@pytest.mark.parametrize("size", [64, 48])
def test_decord_resizes_where_it_can_and_pil_where_it_cannot(clips, size):
    path = clips["avi"]
    out = probe_and_sample(path, 8, size)
    refused = _decord_refuses(path, size)  # decord2 3.4: refuses 48 (and 8, 16, 24) here, takes 64
    assert out["sampling"]["resizer"] == (RESIZER if refused else DECORD_RESIZER)
    assert out["frames"].shape == (8, size, size, 3) and out["frames"].dtype == np.uint8
    assert (out["width"], out["height"]) == (W, H)  # native, whoever resized
    assert [frame_index(f) for f in out["frames"]] == out["sampling"]["indices"]


def test_a_refused_resize_falls_back_to_pil(clips, monkeypatch):
    decord = import_decord()
    real = decord.VideoReader

    def no_resize(uri, *args, width=-1, height=-1, **kwargs):
        if width != -1:
            raise RuntimeError("DECORDArrayCopyFromTo: The size must exactly match")
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(decord, "VideoReader", no_resize)
    out = probe_and_sample(clips["avi"], 8, 64)
    assert out["sampling"]["resizer"] == RESIZER and out["sampling"]["decoder"].startswith("decord2")
    assert [frame_index(f) for f in out["frames"]] == out["sampling"]["indices"]


def test_repeats_are_judged_at_native_size(tmp_path):
    """A one-grey-level change in one pixel every other frame: lost in the resize to 32 px, so the
    resized frames all look alike; the share must still be that of the native frames (2 of 7 pairs)."""
    import av

    rng = np.random.default_rng(2)
    base = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    path = tmp_path / "near_still.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=8)  # lossless: the change survives encoding
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv444p"
        for t in range(24):
            frame = base.copy()
            frame[50, 60] = 101 if t % 2 else 100
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = probe_and_sample(path, 8, 32)
    assert out["repeated_pair_share"] == pytest.approx(2 / 7)


def test_rotated_clip_is_upright_with_either_decoder(clips, monkeypatch):
    path = clips["rotated"]
    by_decord = probe_and_sample(path, 8, 64)
    assert (by_decord["width"], by_decord["height"]) == (H, W)  # as displayed: turned 90 degrees
    decord = import_decord()
    monkeypatch.setattr(decord, "VideoReader", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("off")))
    by_pyav = probe_and_sample(path, 8, 64)
    assert (by_pyav["width"], by_pyav["height"]) == (H, W)
    assert np.abs(by_pyav["frames"].astype(int) - by_decord["frames"]).mean() < 20  # same orientation, other resizer


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(VideoError) as err:
        probe_and_sample(tmp_path, 8, 32)
    assert err.value.kind == "not_a_file" and "not a file" in err.value.reason and err.value.probe == {}


def test_timestamp_problem():
    idx = [0, 10, 20, 30]
    good = np.array([[i / 30, (i + 1) / 30] for i in idx])
    assert timestamp_problem(good, idx, 30.0) is None
    assert timestamp_problem(good + 1.4, idx, 30.0) is None  # a stream may start late
    assert "negative" in timestamp_problem(np.full((4, 2), -3.07e17), idx, 30.0)
    assert "not finite" in timestamp_problem(np.where(good > 0.5, np.nan, good), idx, 30.0)
    assert "do not increase" in timestamp_problem(good[[0, 2, 1, 3]], idx, 30.0)
    assert "expected 1.000 s" in timestamp_problem(good * [[1], [1], [1], [1.2]], idx, 30.0)
    # repeated indices (a clip shorter than the sample) repeat their timestamps
    assert timestamp_problem(good[[0, 0, 1, 1]], [0, 0, 10, 10], 30.0) is None


def test_keyframe_problem():
    assert keyframe_problem([0, 10, 20], [0, 10, 20]) is None
    assert keyframe_problem([0, 10, 20], None) is None  # packets without timestamps: nothing to compare
    assert "at [10, 19], the stream has them at [12, 21]" in keyframe_problem([0, 10, 19], [0, 12, 21])
    assert "(2 vs 3 keyframes)" in keyframe_problem([0, 10], [0, 10, 20])
