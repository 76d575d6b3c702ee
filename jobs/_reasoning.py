"""One seed of a reasoning stage (CoT, GRPO), shared by jobs/cot.py and jobs/grpo.py: the parent's
adapter of that seed trained further, with what it changed, its steps and the trainer's video counts."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from jobs._job import Reporter, rank


def train_from_parent(spec: dict, settings, reporter: Reporter, seed: int, adapter_dir: Path, block: str, train) -> dict:
    """train(model, processor, dataset, settings, scratch folder, device, callbacks) on the parent's
    adapter of `seed`, the result saved to adapter_dir (rank 0)."""
    import torch
    from datasets import load_from_disk

    from ground.checkpoints import CheckpointRecord
    from resources import models
    from resources.training import (
        ADAPTER_WEIGHTS, changed_params, frozen_problems, lora_fingerprint, make_step_logger, param_fingerprint, save_adapter,
    )

    base, device = CheckpointRecord.load(Path(spec["base"])), spec["device"]
    parent = CheckpointRecord.load(Path(spec["parent"])).of_seed(seed, block)
    torch.manual_seed(seed)
    # the parent's adapter to train on, with its alarm state (frozen by the trainer)
    model, processor = models.load_video_llm(base.weights(), device=device, adapter=parent.adapter(), trainable=True)
    block_settings = settings.section(block)
    logger = make_step_logger(reporter.progress(f"{block} seed {seed}"), "" if seed == block_settings.seed else f"seed{seed}.")
    before, lora_before = param_fingerprint(model, skip=ADAPTER_WEIGHTS), lora_fingerprint(model)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"{block}_trainer_") as scratch:
        trainer = train(model, processor, load_from_disk(spec["dataset"]), block_settings.model_copy(update={"seed": seed}), scratch,
                        device, [logger, reporter.step_callback(seed, block)])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if rank() == 0:
        save_adapter(model, adapter_dir)
    return {
        "seed": seed, "history": logger.history, "train_seconds": time.time() - t0, "trainable": trainable,
        "frozen_problems": frozen_problems(before, param_fingerprint(model, skip=ADAPTER_WEIGHTS), trainable, allowed=ADAPTER_WEIGHTS),
        "lora_changed": len(changed_params(lora_before, lora_fingerprint(model))), "video_forwards": trainer.video_forwards,
        "video_passes": dict(getattr(trainer, "video_passes", {})),
    }
