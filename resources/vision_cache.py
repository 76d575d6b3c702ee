"""The frozen vision side's output per clip, computed once per run and reused.

With the vision tower and projector frozen (LoRA on the language model only: resources/training.py),
a clip's video features never change during training, yet TRL's DPOTrainer runs them for the policy
and for the reference pass, on the chosen and the rejected half of every batch, in every epoch.
`VisionFeatureCache` keeps them: the collator tags each row with its clip's key (`clip_keys`), and
`attach(model)` wraps the model's `get_video_features` so that only clips not seen yet go through
the tower (each distinct clip once per batch), the rest come from memory (and, given a folder,
from disk across runs).

A clip's key is a hash of its loaded uint8 frames (content, frame count and size) with the
processor's class, settings and the transformers version: the pixel tensor the tower would see is
a function of exactly these, so a key names one pixel tensor. The uint8 frames are hashed instead
of the float pixels because they are 4x smaller at the same size and already on the CPU in the
collator; the pixels are on the accelerator by the time the model sees them. The keys travel in
the batch as bytes, not as ids of a registry, so collators in dataloader worker processes agree. A
stored entry also keeps its pixel shape, checked on every hit. Features are kept per (clip, vision
feature layer, selection strategy, pixel dtype, autocast dtype); the disk file names add the
model's vision signature (its config and a hash of its weights).

Supported: LLaVA-NeXT-Video-shaped models (get_video_features(pixel_values_videos (B, T, C, H, W))
returning pooler_output (B, tokens, hidden)). Anything else is refused, as is a vision side with a
trainable parameter or active dropout: its features would not be a function of the clip.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# The batch entry the collator adds (uint8 (rows, KEY_BYTES)) and the attached model takes out of its forward's kwargs.
CLIP_KEYS = "video_clip_keys"
KEY_BYTES = 20
# The modules whose output is cached: all of them must be frozen.
CACHED_PARTS = ("vision_tower", "vision_resampler", "multi_modal_projector")


def processor_signature(processor) -> str:
    """What the processor's video path depends on, as text: class, settings, library version."""
    import transformers

    video = getattr(processor, "video_processor", None) or processor
    settings = video.to_dict() if hasattr(video, "to_dict") else vars(video)
    return json.dumps([type(video).__name__, settings, transformers.__version__], sort_keys=True, default=str)


def clip_key(frames: np.ndarray, processor_sig: str) -> bytes:
    """The key of one clip's loaded frames under one processor signature."""
    frames = np.ascontiguousarray(frames)
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    h.update(processor_sig.encode())
    h.update(repr((frames.shape, frames.dtype.str)).encode())
    h.update(memoryview(frames).cast("B"))
    return h.digest()


def supported(model) -> bool:
    """The model is LLaVA-NeXT-Video-shaped, so its video features can be cached."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    return all(hasattr(inner, p) for p in CACHED_PARTS) and hasattr(inner, "get_video_features")


def inner_video_model(model):
    """The module whose forward calls self.get_video_features (LlavaNextVideoModel), or a clear error."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    if not all(hasattr(inner, p) for p in CACHED_PARTS) or not hasattr(inner, "get_video_features"):
        raise ValueError(
            f"vision feature cache: {type(base).__name__} is not LLaVA-NeXT-Video-shaped (needs {CACHED_PARTS} and "
            "get_video_features); turn cache_vision_features off for this model"
        )
    return base, inner


def cached_parameters(inner) -> list:
    return [p for part in CACHED_PARTS for p in getattr(inner, part).parameters()]


def check_frozen(inner) -> None:
    """Refuse a vision side that training could change or that dropout makes random."""
    import torch

    trainable = [f"{part}.{n}" for part in CACHED_PARTS for n, p in getattr(inner, part).named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"vision feature cache: {len(trainable)} vision parameters are trainable (e.g. {trainable[:2]}); "
            "features are cached only for a frozen vision tower and projector"
        )
    for part in CACHED_PARTS:
        for name, m in getattr(inner, part).named_modules():
            # nn.Dropout modules, and attention modules that apply dropout functionally (CLIPAttention.dropout)
            p = m.p if isinstance(m, torch.nn.Dropout) else getattr(m, "dropout", 0.0)
            if m.training and isinstance(p, float) and p > 0:
                raise ValueError(f"vision feature cache: {part}.{name} applies dropout {p} in training; its features are random")


def model_signature(base, inner) -> str:
    """The vision side's identity for disk entries: its config and a hash of its weights."""
    import torch

    config = base.config
    h = hashlib.blake2b(digest_size=20)
    h.update(config.vision_config.to_json_string().encode())
    extra = {k: getattr(config, k, None) for k in ("spatial_pool_mode", "spatial_pool_stride", "projector_hidden_act", "multimodal_projector_bias")}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for p in cached_parameters(inner):
            t = p.detach().contiguous().cpu()
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Attached:
    """The hooks of one attach(); remove() restores the model."""

    def __init__(self, inner, handles):
        self.inner, self.handles = inner, handles

    def remove(self) -> None:
        self.inner.__dict__.pop("get_video_features", None)  # the class's method shows again
        for h in self.handles:
            h.remove()


class VisionFeatureCache:
    """Video features per clip for one model, in memory (on `keep_on`, default where they were
    computed) and, given `folder`, on disk. `rows_computed` / `rows_served` count pixel rows that
    went through the tower / came from the cache."""

    def __init__(self, folder: str | Path | None = None, keep_on: str | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.keep_on = keep_on
        self._features: dict[tuple, tuple[Any, tuple]] = {}
        self._pending: list[bytes] | None = None
        self._signature: str | None = None
        self.rows_computed = self.rows_served = 0

    # --- collator side ---
    @staticmethod
    def clip_keys(videos: Sequence[np.ndarray], processor):
        """Each video's clip key, as a uint8 tensor (len(videos), KEY_BYTES)."""
        import torch

        sig = processor_signature(processor)
        keys = b"".join(clip_key(v, sig) for v in videos)
        return torch.frombuffer(bytearray(keys), dtype=torch.uint8).reshape(len(videos), KEY_BYTES)

    # --- model side ---
    def attach(self, model) -> Attached:
        """Wrap `model`'s video features with the cache (model: the HF model or its PEFT wrapper);
        the vision side must be frozen now and stays checked on every call."""
        base, inner = inner_video_model(model)
        if "get_video_features" in vars(inner):
            raise ValueError("vision feature cache: this model already has a cache attached; remove() it first")
        check_frozen(inner)
        signature = model_signature(base, inner)
        if signature != self._signature:  # another model: what is in memory is not its features
            self._features.clear()
            self._signature = signature
        original = inner.get_video_features
        config = base.config

        def take_keys(module, args, kwargs):
            keys = kwargs.pop(CLIP_KEYS, None)
            self._pending = None if keys is None else [bytes(row) for row in keys.cpu().numpy()]
            return args, kwargs

        def drop_keys(module, args, output):
            self._pending = None  # never carried over to a later forward

        def get_video_features(pixel_values_videos, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
            keys, self._pending = self._pending, None
            asks_more = keys is None or kwargs.get("return_dict") is not True or set(kwargs) - {"return_dict"}
            if asks_more:  # no clip keys, or outputs beyond the features (hidden states, a tuple): the plain path
                return original(
                    pixel_values_videos, vision_feature_layer=vision_feature_layer,
                    vision_feature_select_strategy=vision_feature_select_strategy, **kwargs,
                )
            check_frozen(inner)
            layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
            strategy = config.vision_feature_select_strategy if vision_feature_select_strategy is None else vision_feature_select_strategy
            return self._lookup(original, pixel_values_videos, keys, layer, strategy)

        handles = [
            base.register_forward_pre_hook(take_keys, with_kwargs=True),
            base.register_forward_hook(drop_keys),
        ]
        inner.get_video_features = get_video_features  # an instance attribute: forward's self.get_video_features finds it
        return Attached(inner, handles)

    def _lookup(self, original, pixels, clips: list[bytes], layer, strategy):
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if len(clips) != pixels.shape[0]:
            raise ValueError(f"vision feature cache: {len(clips)} clip keys for {pixels.shape[0]} videos")
        row_shape = tuple(pixels.shape[1:])
        kind = pixels.device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        keys = [(c, repr(layer), strategy, str(pixels.dtype), str(autocast)) for c in clips]
        first: dict[tuple, int] = {}
        for row, key in enumerate(keys):
            if key not in self._features and not self._from_disk(key, row_shape):
                first.setdefault(key, row)
        if first:
            rows = list(first.values())
            with torch.no_grad():  # frozen: no graph either way; this keeps no activations
                out = original(pixels[rows], vision_feature_layer=layer, vision_feature_select_strategy=strategy, return_dict=True).pooler_output
            for key, feats in zip(first, out):
                self._store(key, feats.detach(), row_shape)
            self.rows_computed += len(rows)
        for key in keys:
            if self._features[key][1] != row_shape:
                raise ValueError(f"vision feature cache: clip {key[0].hex()} came as {row_shape}, stored as {self._features[key][1]}")
        self.rows_served += len(keys) - len(first)
        stacked = torch.stack([self._features[k][0] for k in keys]).to(pixels.device)
        return BaseModelOutputWithPooling(pooler_output=stacked)

    def _store(self, key: tuple, feats, row_shape: tuple) -> None:
        import torch

        self._features[key] = (feats if self.keep_on is None else feats.to(self.keep_on), row_shape)
        path = self._path(key)
        if path is not None and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"features": feats.cpu(), "pixel_shape": list(row_shape)}, tmp)
            tmp.replace(path)  # a reader never sees half a file

    def _from_disk(self, key: tuple, row_shape: tuple) -> bool:
        import torch

        path = self._path(key)
        if path is None or not path.exists():
            return False
        entry = torch.load(path, weights_only=True)
        self._features[key] = (entry["features"].to(self.keep_on or "cpu"), tuple(entry["pixel_shape"]))
        return True

    def _path(self, key: tuple) -> Path | None:
        if self.folder is None:
            return None
        name = hashlib.blake2b(repr((self._signature, *key)).encode(), digest_size=KEY_BYTES).hexdigest()
        return self.folder / f"{name}.pt"

    def stored_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f, _ in self._features.values())
