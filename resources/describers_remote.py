"""Real describers: a multimodal OpenAI-compatible endpoint given the frames, or a HF video LLM in process.

- `openai` (describer_options.endpoint): the clip's sampled frames go as base64 JPEG/PNG `image_url` parts
  (any OpenAI-compatible vision server), or as one `video_url` of comma-joined JPEG frames (vLLM's
  `data:video/jpeg;base64,...` video input) with describer_options.frames_as: video. Requests go
  through the same client as the LLM roles (resources/llm_client.py): disk cache, bounded
  concurrency, retries.
- `hf` (target_model.model) and `hf:<model id or path>`: resources.models loads the model with the
  stock processor (AutoProcessor / AutoModelForImageTextToText) and generates in batches.

The prompt is resources/prompts/describer.md (describer_options.prompt).
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from ground.settings import PROJECT_ROOT, DescriberOptions, EndpointSettings
from resources.llm_cache import LLMCache
from resources.llm_client import EndpointClient, Failure, Job, ParseError


def _prompt_text(path: str) -> str:
    p = Path(path)
    return (p if p.is_absolute() else PROJECT_ROOT / p).read_text(encoding="utf-8").strip()


def sample_frames(frames: np.ndarray, max_frames: int) -> np.ndarray:
    """At most max_frames frames, spread evenly over the clip (first and last included)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got shape {frames.shape}")
    if len(frames) <= max_frames:
        return frames
    idx = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
    return frames[idx]


def encode_frame(frame: np.ndarray, image_format: str = "jpeg") -> str:
    """One frame as base64 JPEG or PNG."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8), "RGB")
    if image_format == "jpeg":
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def frame_parts(frames: np.ndarray, options: DescriberOptions) -> list[dict]:
    """The user-message content parts that carry the frames."""
    frames = sample_frames(frames, options.max_frames)
    if options.frames_as == "video":  # vLLM reads data:video/jpeg as comma-joined base64 JPEG frames
        joined = ",".join(encode_frame(f, "jpeg") for f in frames)
        return [{"type": "video_url", "video_url": {"url": f"data:video/jpeg;base64,{joined}"}}]
    mime = "image/jpeg" if options.image_format == "jpeg" else "image/png"
    return [
        {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{encode_frame(f, options.image_format)}"}}
        for f in frames
    ]


class OpenAIDescriber:
    """Frames to an OpenAI-compatible multimodal endpoint; a failed clip gets "" and a record in failures."""

    def __init__(self, endpoint: EndpointSettings, options: DescriberOptions, cache_dir=None, name: str = "openai"):
        self.name = name
        self.model = endpoint.model
        self.options = options
        self.prompt = _prompt_text(options.prompt)
        cache = LLMCache(cache_dir) if cache_dir is not None else None
        self.client = EndpointClient("describer", endpoint, cache, settings_key="describer_options.endpoint")
        self.failures = []

    @staticmethod
    def _parse(content: str, _logprobs) -> str:
        text = content.strip()
        if not text:
            raise ParseError("the description is empty")
        return text

    def describe(self, clips: list[dict]) -> list[str]:
        jobs = [
            Job(
                str(c["clip_id"]),
                [{"role": "user", "content": [{"type": "text", "text": self.prompt}, *frame_parts(c["frames"], self.options)]}],
                self._parse,
            )
            for c in clips
        ]
        results = self.client.run(jobs)
        self.failures = [r for r in results if isinstance(r, Failure)]
        return ["" if isinstance(r, Failure) else r for r in results]


class HFDescriber:
    """A Hugging Face video LLM in process (loaded once, on first use), batched generation."""

    def __init__(self, model: str, options: DescriberOptions, name: str):
        if model == "embedded":
            raise ValueError(
                f"describer {name!r} needs a model id or path, but target_model.model is 'embedded'; "
                "use the tiny_video_llm describer or hf:<model id or path>"
            )
        self.name = name
        self.model_name = model
        self.options = options
        self.prompt = _prompt_text(options.prompt)
        self._loaded = None

    def describe(self, clips: list[dict]) -> list[str]:
        from resources import models  # lazy: transformers and torch load only when a clip is described

        if not clips:
            return []
        if self._loaded is None:
            self._loaded = models.load_video_llm(self.model_name, self.options.device)
        model, processor = self._loaded
        videos = [sample_frames(c["frames"], self.options.max_frames) for c in clips]
        answers = models.generate_answers(
            model, processor, videos, [self.prompt] * len(clips), self.options.max_new_tokens, self.options.batch_size
        )
        return [a.strip() for a in answers]


def build(name: str, settings):
    """The describer pipelines.yaml names: `openai`, `hf` or `hf:<model id or path>`."""
    options = settings.describer_options
    if name == "openai":
        if options.endpoint is None:
            raise ValueError("describer 'openai' needs describer_options.endpoint in pipelines.yaml")
        return OpenAIDescriber(options.endpoint, options, cache_dir=settings.path("llm_cache"))
    if name == "hf":
        return HFDescriber(settings.target_model.model, options, name="hf")
    if name.startswith("hf:"):
        return HFDescriber(name[3:], options, name=name)
    raise ValueError(f"unknown describer {name!r}; allowed: visual_facts, tiny_video_llm, hf, hf:<model>, openai")
