"""`python -m jobs.at_sft <spec>`: VideoSafety-R1's alarm-token SFT (both stages), one seed after
another (assets/at_sft.py launches it; resources/at_sft_trainer.py is the trainer)."""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from jobs._job import Reporter, load_base, rank, run

TRAINABLE = ("lora_", "alarm.")  # the LoRA weights and the AlarmModule (embeddings, heads)


def train_seed(spec: dict, settings, reporter: Reporter, seed: int, adapter_dir: Path) -> dict:
    """Both stages with one seed; the adapter and alarm state saved to adapter_dir (rank 0)."""
    from datasets import load_from_disk

    from resources import alarm
    from resources.at_sft_trainer import train_at_sft
    from resources.training import changed_params, frozen_problems, loss_fell, make_step_logger, param_fingerprint

    _, model, processor = load_base(spec, "AT-SFT", seed)
    device = spec["device"]
    seed_prefix = "" if seed == settings.at_sft.seed else f"seed{seed}."
    loggers = {s: make_step_logger(reporter.progress(f"AT-SFT stage {s} seed {seed}"), f"{seed_prefix}stage{s}.") for s in (1, 2)}
    before = param_fingerprint(model, skip=TRAINABLE)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="at_sft_trainer_") as scratch:
        a = settings.at_sft.model_copy(update={"seed": seed})
        peft_model, trainers = train_at_sft(model, processor, load_from_disk(spec["dataset"]), a, scratch, device,
                                            callbacks_for=lambda s: [loggers[s], reporter.step_callback(seed, f"stage{s}")])
    seconds = time.time() - t0
    after = param_fingerprint(peft_model, skip=TRAINABLE)
    trainable = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
    if rank() == 0:
        shutil.rmtree(adapter_dir, ignore_errors=True)
        peft_model.save_pretrained(str(adapter_dir))
        alarm.save_alarm(peft_model, adapter_dir)
    return {
        "seed": seed,
        "adapter": adapter_dir,
        "history": {s: loggers[s].history for s in (1, 2)},
        "train_seconds": seconds,
        "frozen_checked": len(before),
        "frozen_changed": len(changed_params(before, after)),
        "trainable": trainable,
        "frozen_problems": frozen_problems(before, after, trainable, allowed=TRAINABLE),
        "loss_fell": {s: loss_fell([h["loss"] for h in loggers[s].history]) for s in (1, 2)},
        "video_forwards": trainers[2].video_forwards,
    }


if __name__ == "__main__":
    run(sys.argv, train_seed)
