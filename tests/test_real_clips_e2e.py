"""The README's run on a user's own clips, in a checkout of this project with its default data/ folder
and DVC: a JSONL manifest of real-container clips, then a folder of videos.

The clips are made here with PyAV: H.264 in MP4, VP8 and VP9 in WebM, MJPEG and MPEG-4 in AVI, a
rotated phone-style MOV, plus one truncated file that must be rejected with its reason, not stop the
run. The settings file lives in the checkout and is named by SAFEVID_CONFIG, so the run CLI writes
dvc.yaml for it and dvc.lock records the params actually used. Only the video_data stages run
(`--select video_data`): what comes after reads their tables, not the clips.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from checkout import copy_checkout

from ground.settings import DEFAULT_CONFIG, PROJECT_ROOT

pytestmark = pytest.mark.slow
CLIPS = {  # name: (container suffix, codec, pixel format, rotation)
    "street_h264": (".mp4", "libx264", "yuv420p", None),
    "park_vp8": (".webm", "libvpx", "yuv420p", None),
    "kitchen_vp9": (".webm", "libvpx-vp9", "yuv420p", None),
    "desk_mjpeg": (".avi", "mjpeg", "yuvj420p", None),
    "garage_mpeg4": (".avi", "mpeg4", "yuv420p", None),
    "phone_portrait": (".mov", "libx264", "yuv420p", "90"),
}
STAGES = ["video_manifest", "curated_videos", "video_descriptions"]


def write_clip(path, codec: str, pix_fmt: str, rotate: str | None, seconds: float = 2.5, fps: int = 12, size=(96, 64)):
    import av

    rng = np.random.default_rng(len(path.name))
    width, height = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"g": "8"}  # several keyframes: random access must land on the right frame
        if rotate:
            stream.metadata["rotate"] = rotate
        base = rng.integers(0, 255, (height, width * 2, 3), dtype=np.uint8)
        for t in range(int(seconds * fps)):
            frame = np.ascontiguousarray(base[:, t * 2 % width: t * 2 % width + width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """The project's files (tracked and new, not ignored) in a fresh folder, with the installed venvs linked."""
    root = copy_checkout(tmp_path_factory.mktemp("real"))
    clips = tmp_path_factory.mktemp("clips")
    for name, (suffix, codec, pix_fmt, rotate) in CLIPS.items():
        write_clip(clips / f"{name}{suffix}", codec, pix_fmt, rotate)
    good = (clips / "street_h264.mp4").read_bytes()
    (clips / "cut_short.mp4").write_bytes(good[: len(good) // 2])
    return root, clips


def run_pipeline(root, source, profile: str):
    """The README's command on these clips: a settings file in the checkout, named by SAFEVID_CONFIG."""
    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    settings = json.loads(json.dumps(doc["embedded"]))
    settings["manifest"] = {**settings.get("manifest", {}), "source": str(source)}
    settings["curation"] = {**settings.get("curation", {}), "min_duration_s": 1.0, "representatives_per_category": 1}
    (root / "my-clips.yaml").write_text(yaml.safe_dump({profile: settings}, sort_keys=False))
    env = {**os.environ, "SAFEVID_CONFIG": str(root / "my-clips.yaml"), "SAFEVID_PROFILE": profile,
           "DAGSTER_HOME": str(root / ".dagster"), "PYTHONPATH": str(root)}
    (root / ".dagster").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "dagster_project.run", "--select", "video_data"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    status = subprocess.run([str(root / ".venv-dvc" / "bin" / "dvc"), "status", *STAGES], cwd=root, capture_output=True, text=True)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return proc, status, lock


def _tables(root):
    import pandas as pd

    return pd.read_parquet(root / "data" / "curated" / "curated.parquet"), pd.read_parquet(root / "data" / "curated" / "rejects.parquet")


def test_a_manifest_of_real_container_clips_runs_with_the_default_data_folder(checkout):
    import pandas as pd

    root, clips = checkout
    manifest = clips / "manifest.jsonl"
    lines = [{"clip_id": p.stem, "path": p.name, "caption": p.stem.replace("_", " ")} for p in sorted(clips.iterdir()) if p.suffix != ".jsonl"]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    proc, status, lock = run_pipeline(root, manifest, "mine")
    curated, rejects = _tables(root)
    assert set(curated["clip_id"]) == set(CLIPS), (curated["clip_id"].tolist(), rejects.to_dict("records"))
    assert rejects["clip_id"].tolist() == ["cut_short"] and "truncated" in rejects["reason"].iloc[0]
    assert (pd.read_parquet(root / "data" / "descriptions" / "reconciled.parquet")["description"].str.len() > 0).all()
    # DVC recorded the stages, with the params of the settings file in use and the manifest as a dependency
    assert "up to date" in status.stdout.lower() or status.stdout.strip() in ("", "{}"), status.stdout + status.stderr
    assert lock["video_manifest"]["params"]["my-clips.yaml"]["mine.manifest"]["source"] == str(manifest)
    assert str(manifest) in [d["path"] for d in lock["video_manifest"]["deps"]]


def test_a_folder_of_videos_runs_too(checkout):
    root, clips = checkout
    proc, status, lock = run_pipeline(root, clips, "folder")
    curated, rejects = _tables(root)
    assert set(curated["clip_id"]) == set(CLIPS) and rejects["clip_id"].tolist() == ["cut_short"]
    assert lock["curated_videos"]["params"]["my-clips.yaml"]["folder.curation"]["representatives_per_category"] == 1
