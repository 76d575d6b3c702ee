"""Vision features computed once (resources/vision_cache.py): DPO with the cache trains exactly as
without it, the tower sees each distinct clip once across epochs and the reference pass, a changed
clip or frame/processor setting never hits a stale entry, and an unfrozen vision side is refused."""
import copy

import numpy as np
import pytest
from test_models import TEXTS

from resources import models

REFUSAL = "I can't help with that, since it could hurt people."
COMPLY = "Here is how to do it: first, wait until nobody is looking."
CLIPS, QUERIES_PER_CLIP, EPOCHS, BATCH = 3, 2, 2, 2
FRAMES = 8


def _rows(folder, n_clips: int, per_clip: int, seed: int = 0) -> list[dict]:
    """per_clip queries on each of n_clips clips, as the pairs table has them (rows share clips)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_clips):
        path = folder / f"clip_{seed}_{c}.npy"
        np.save(path, rng.integers(0, 255, (FRAMES, 64, 64, 3), dtype=np.uint8))
        for q in range(per_clip):
            rows.append({
                "prompt": f"The video shows scene {c}, question {q}. How can I hide a knife at this place?",
                "chosen": REFUSAL, "rejected": COMPLY, "images": [], "frames_path": str(path),
            })
    return rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision_cache_model")
    models.build_tiny_video_llm(folder, TEXTS, seed=3)
    return folder


def _train(model_dir, rows, out, cache):
    """One DPO run from the saved model; returns (trainer, pixel frames and calls the tower saw)."""
    from datasets import Dataset

    from ground.settings import DPOSettings
    from resources.dpo_collator import train_dpo

    model, processor = models.load_video_llm(model_dir, device="cpu")
    seen = {"frames": 0, "calls": 0}

    def count(module, args, output):
        seen["frames"] += args[0].shape[0]  # (clips x frames, C, H, W)
        seen["calls"] += 1

    hook = model.model.vision_tower.register_forward_hook(count)
    settings = DPOSettings(epochs=EPOCHS, learning_rate=2e-3, batch_size=BATCH, seed=0)
    try:
        trainer = train_dpo(model, processor, Dataset.from_list(rows), settings, out, "cpu", vision_cache=cache)
    finally:
        hook.remove()
    return trainer, seen


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vision_cache_runs")
    rows = _rows(tmp, CLIPS, QUERIES_PER_CLIP)
    return {cached: _train(model_dir, rows, tmp / f"out_{cached}", cached) for cached in (False, True)}


def _lora(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def test_cached_dpo_equals_the_uncached_path(runs):
    import torch

    (plain, _), (cached, _) = runs[False], runs[True]
    logs = [[h for h in t.state.log_history if "loss" in h] for t in (plain, cached)]
    assert len(logs[0]) == len(logs[1]) == EPOCHS * CLIPS * QUERIES_PER_CLIP // BATCH
    for a, b in zip(*logs):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    assert logs[0][-1]["loss"] < logs[0][0]["loss"] - 1e-3  # it trained: equal losses say something
    lora = [_lora(t) for t in (plain, cached)]
    assert lora[0].keys() == lora[1].keys() and any(v.abs().sum() > 0 for n, v in lora[0].items() if "lora_B" in n)
    for name in lora[0]:
        assert torch.allclose(lora[0][name], lora[1][name], atol=1e-6, rtol=0), name


def test_the_tower_sees_each_distinct_clip_once(runs):
    (plain, plain_seen), (cached, cached_seen) = runs[False], runs[True]
    steps = plain.state.global_step
    # without: every step, the policy and the reference pass each run both halves of the batch
    assert plain_seen["frames"] == steps * 2 * 2 * BATCH * FRAMES
    # with: each clip once, whatever the epoch, the pass or the half; the reference pass always hits
    assert cached_seen["frames"] == CLIPS * FRAMES
    assert cached_seen["calls"] <= CLIPS
    cache = cached.vision_cache
    assert (cache.rows_computed, cache.rows_served) == (CLIPS, steps * 2 * 2 * BATCH - CLIPS)
    # every pass still got the video tensors (the frozen-vision and lost-video checks stay on)
    assert cached.video_forwards == plain.video_forwards == {"forwards": 2 * steps, "with_video": 2 * steps}
    assert plain.vision_cache is None


def _frozen(model_dir):
    model, processor = models.load_video_llm(model_dir, device="cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, processor


def _logits(model, collator, rows):
    import torch

    batch = collator([dict(r) for r in rows])
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "completion_mask"}).logits


def test_a_changed_clip_or_setting_is_a_new_key(model_dir, tmp_path):
    from resources.dpo_collator import VideoPreferenceCollator
    from resources.vision_cache import CLIP_KEYS, VisionFeatureCache, clip_key, processor_signature

    model, processor = _frozen(model_dir)
    frames = np.load(_rows(tmp_path, 2, 1)[0]["frames_path"])
    other = np.load(_rows(tmp_path, 2, 1)[1]["frames_path"])
    sig = processor_signature(processor)
    renormed = copy.deepcopy(processor)
    renormed.video_processor.image_mean = [0.5, 0.5, 0.5]
    key = clip_key(frames, sig)
    assert clip_key(frames.copy(), processor_signature(copy.deepcopy(processor))) == key  # stable
    changed = {
        "another clip": clip_key(other, sig),
        "fewer frames per clip": clip_key(frames[::2], sig),
        "smaller frames": clip_key(frames[:, :48, :48], sig),
        "a processor setting": clip_key(frames, processor_signature(renormed)),
    }
    assert all(k != key for k in changed.values()), changed

    # Through the model: features cached under one processor are not served under another.
    rows = _rows(tmp_path, 2, 1, seed=5)
    cache = VisionFeatureCache(folder=tmp_path / "features")
    attached = cache.attach(model)
    try:
        first = _logits(model, VideoPreferenceCollator(processor=processor, vision_cache=cache), rows)
        after = _logits(model, VideoPreferenceCollator(processor=renormed, vision_cache=cache), rows)
    finally:
        attached.remove()
    assert cache.rows_computed == 4  # two clips under each processor
    import torch

    plain = _logits(model, VideoPreferenceCollator(processor=renormed), rows)
    assert (plain - first).abs().max() > 1e-4  # the setting matters, so a stale hit would show
    assert torch.allclose(after, plain, atol=1e-6, rtol=0)
    assert CLIP_KEYS not in VideoPreferenceCollator(processor=processor)([dict(r) for r in rows])  # off: the batch as before

    # A fresh cache on the same folder and model reads the features back instead of computing them.
    again = VisionFeatureCache(folder=tmp_path / "features")
    attached = again.attach(model)
    try:
        reread = _logits(model, VideoPreferenceCollator(processor=renormed, vision_cache=again), rows)
    finally:
        attached.remove()
    assert (again.rows_computed, again.rows_served) == (0, 4) and torch.allclose(reread, plain, atol=1e-6, rtol=0)


def test_an_unfrozen_or_random_vision_side_is_refused(model_dir, tmp_path):
    import torch

    from resources.dpo_collator import VideoPreferenceCollator
    from resources.vision_cache import VisionFeatureCache

    model, processor = models.load_video_llm(model_dir, device="cpu")  # as loaded: every weight trainable
    with pytest.raises(ValueError, match=r"vision parameters are trainable.*vision_tower"):
        VisionFeatureCache().attach(model)

    model, processor = _frozen(model_dir)
    cache = VisionFeatureCache()
    attached = cache.attach(model)
    collator = VideoPreferenceCollator(processor=processor, vision_cache=cache)
    rows = _rows(tmp_path, 1, 1)
    try:
        with pytest.raises(ValueError, match="already has a cache attached"):
            cache.attach(model)
        model.model.multi_modal_projector.linear_1.weight.requires_grad_(True)  # unfrozen after attaching
        with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_1\.weight"):
            _logits(model, collator, rows)
        model.model.multi_modal_projector.linear_1.weight.requires_grad_(False)
        model.train()
        model.model.vision_tower.encoder.layers[0].self_attn.dropout = 0.1
        with pytest.raises(ValueError, match="dropout 0.1"):
            _logits(model, collator, rows)
    finally:
        attached.remove()
    assert "get_video_features" not in vars(model.model)  # removed: the plain method again
    with pytest.raises(ValueError, match="not LLaVA-NeXT-Video-shaped"):
        VisionFeatureCache().attach(torch.nn.Linear(2, 2))
