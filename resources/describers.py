"""Describers: each turns a clip (caption + sampled frames) into a text description.

Embedded default: `visual_facts` states what is measured on the frames next to the caption;
`tiny_video_llm` is a tiny video LLM built from a config in process (same loading and generation
code as a real HF describer). Remote describers live in resources/describers_remote.py.
An output that is not clean text (text_problem) is left out of the reconciliation and counted.
"""
from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path
from typing import Protocol

import numpy as np

NAMED_COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40),
    "white": (235, 235, 235), "black": (20, 20, 20), "grey": (128, 128, 128), "orange": (240, 140, 30),
    "purple": (140, 60, 170), "brown": (130, 80, 40),
}


# Line ends and tabs are layout; every other control character is noise from a model or a transport.
LAYOUT = {"\n", "\t", "\r"}


class Describer(Protocol):
    name: str

    def describe(self, clips: list[dict]) -> list[str]:
        """clips: dicts with clip_id, caption, frames (uint8 (T, H, W, 3)) → one description each."""


def text_problem(text) -> str | None:
    """Why a describer's output is not clean text (None when it is). The reconciler matches words, so
    a model's undecodable bytes (U+FFFD) or control characters next to a few right words would pass
    as agreement and land in the description."""
    if not isinstance(text, str) or not text.strip():
        return "no text"
    if "\ufffd" in text:
        return "undecodable bytes (U+FFFD)"
    if any(unicodedata.category(ch) in ("Cc", "Cs") and ch not in LAYOUT for ch in text):
        return "control characters"
    if 2 * sum(not ch.isprintable() and ch not in LAYOUT for ch in text) > len(text):
        return "mostly non-printable"
    return None


def visual_facts(frames: np.ndarray) -> dict:
    """Motion, dominant colours, brightness and scene cuts measured on the sampled frames."""
    f = frames.astype(np.float32)
    diffs = np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3)) if len(f) > 1 else np.zeros(1)
    # A cut is a frame change far above the clip's typical change.
    cuts = int((diffs > max(40.0, 4 * float(np.median(diffs)))).sum()) if len(diffs) else 0
    pixels = f.reshape(-1, 3)
    palette = np.array(list(NAMED_COLOURS.values()), dtype=np.float32)
    nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(palette)) / len(nearest)
    names = list(NAMED_COLOURS)
    dominant = [names[i] for i in np.argsort(-counts)[:3] if counts[i] >= 0.02]
    return {
        "motion": float(diffs.mean()),
        "brightness": float(f.mean()),
        "dominant_colours": dominant,
        "scene_cuts": cuts,
    }


def facts_sentence(caption: str, facts: dict) -> str:
    motion = "little" if facts["motion"] < 2 else "moderate" if facts["motion"] < 8 else "strong"
    light = "dark" if facts["brightness"] < 70 else "bright" if facts["brightness"] > 170 else "evenly lit"
    cuts = facts["scene_cuts"]
    return (
        f"{caption.rstrip('.')}. The footage is {light} with {motion} motion; "
        f"dominant colours are {', '.join(facts['dominant_colours']) or 'mixed'}; "
        f"{'no scene cuts' if cuts == 0 else f'{cuts} scene cut(s)'}."
    )


class VisualFactsDescriber:
    name = "visual_facts"

    def describe(self, clips):
        return [facts_sentence(c["caption"], visual_facts(c["frames"])) for c in clips]


class TinyVideoLLMDescriber:
    """A tiny video LLM built from a config (untrained: its text shows what is rejected as not clean
    text, or what the reconciler does not agree with)."""

    name = "tiny_video_llm"
    prompt = "Describe this video in detail."

    def __init__(self, model_dir: Path, max_new_tokens: int = 24, batch_size: int = 16):
        self.model_dir = Path(model_dir)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def describe(self, clips):
        from resources import models

        texts = [c["caption"] for c in clips] + [self.prompt]
        # Built from the captions it describes: a model left from other captions (an older corpus) is rebuilt.
        stamp, digest = self.model_dir / "built_from.sha256", hashlib.sha256("\x00".join(texts).encode()).hexdigest()
        if not (self.model_dir / "config.json").exists() or not stamp.exists() or stamp.read_text() != digest:
            models.build_tiny_video_llm(self.model_dir, texts, seed=0)
            stamp.write_text(digest)
        model, processor = models.load_video_llm(str(self.model_dir), device="cpu")
        return models.generate_answers(
            model, processor, [c["frames"] for c in clips], [self.prompt] * len(clips), self.max_new_tokens, self.batch_size
        )


def build_describer(name: str, settings) -> Describer:
    if name == "visual_facts":
        return VisualFactsDescriber()
    if name == "tiny_video_llm":
        return TinyVideoLLMDescriber(settings.path("models", "describer"), settings.target_model.max_new_tokens)
    from resources import describers_remote

    return describers_remote.build(name, settings)
