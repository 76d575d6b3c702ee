"""`python -m jobs.dpo <spec>`: SafeVid's DPO of a LoRA adapter, one seed after another
(assets/dpo.py launches it; resources/dpo_collator.py is the video collator and trainer)."""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from jobs._job import Reporter, load_base, rank, run


_CACHE = []


def shared_cache(d, model):
    """One cache of the frozen vision features for every seed of the job: the same base model sees
    the same clips, so the second seed computes none (dpo.cache_vision_features)."""
    from resources.vision_cache import VisionFeatureCache, supported

    if not (d.cache_vision_features and supported(model)):
        return False
    if not _CACHE:

        _CACHE.append(VisionFeatureCache())
    return _CACHE[0]


def train_seed(spec: dict, settings, reporter: Reporter, seed: int, adapter_dir: Path) -> dict:
    """DPO + LoRA on the base weights with one seed; the adapter saved to adapter_dir (rank 0)."""
    from datasets import load_from_disk

    from resources.dpo_collator import train_dpo
    from resources.training import changed_params, frozen_problems, loss_fell, make_step_logger, param_fingerprint

    _, model, processor = load_base(spec, "DPO", seed)
    device = spec["device"]
    before = param_fingerprint(model)
    # The registered seed's curve keeps the plain names; a replicate's goes under seed<k>.
    prefix = "" if seed == settings.dpo.seed else f"seed{seed}."
    step_logger = make_step_logger(reporter.progress(f"DPO seed {seed}"), prefix)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="dpo_trainer_") as scratch:
        d = settings.dpo.model_copy(update={"seed": seed})
        trainer = train_dpo(model, processor, load_from_disk(spec["dataset"]), d, Path(scratch), device,
                            callbacks=[step_logger, reporter.step_callback(seed, "dpo")], vision_cache=shared_cache(d, model))
    seconds = time.time() - t0
    peft_model = trainer.model
    after = param_fingerprint(peft_model)
    trainable = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
    if rank() == 0:
        shutil.rmtree(adapter_dir, ignore_errors=True)
        peft_model.save_pretrained(str(adapter_dir))
    losses = [h["loss"] for h in step_logger.history]
    return {
        "seed": seed,
        "adapter": adapter_dir,
        "history": step_logger.history,
        "losses": losses,
        "train_seconds": seconds,
        "frozen_checked": len(before),
        "frozen_changed": len(changed_params(before, after)),
        "trainable": trainable,
        "frozen_problems": frozen_problems(before, after, trainable),
        "loss_fell": loss_fell(losses),
        "video_forwards": getattr(trainer, "video_forwards", {}),
        "vision_rows": {"computed": trainer.vision_cache.rows_computed, "served": trainer.vision_cache.rows_served} if trainer.vision_cache is not None else None,
    }


if __name__ == "__main__":
    run(sys.argv, train_seed)
