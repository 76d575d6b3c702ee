"""AT-SFT with TRL: a video SFT collator and an SFTTrainer whose loss adds the alarm heads' BCE.

VideoSafety-R1 trains in two stages on the same data (the authors' scripts stage1_alarm_ar.sh and
stage2_alarm_atc.sh): stage 1 initialises the alarm tokens with the LM loss alone (language model
and alarm embeddings train), stage 2 adds the heads and their losses,
loss = LM cross-entropy + lambda_v * BCE(visual) + lambda_t * BCE(textual). Here the language
model trains through LoRA (resources/training.py), in three optimizer groups with their own rates
(LoRA, alarm embeddings, heads); the vision tower and projector stay frozen. TRL's SFTTrainer
would collate images only, so the collator calls `processor(videos=...)` through
resources/models.py, the code that prompts the model at generation time; the alarm tokens come
with the prompts. Importing this module imports TRL: import it inside the function that trains.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from trl import SFTConfig, SFTTrainer

from resources import alarm, models
from resources.training import check_trl_args, lora_config, require_video_inputs, trainer_args
from resources.video import row_frames

PINNED_ARGS = {
    "output_dir": "the stage picks a scratch folder",
    "remove_unused_columns": "the video collator needs whole rows (frames_path, labels)",
    "dataset_kwargs": "the collator encodes the rows; TRL must not prepare the dataset",
}
LABELS = ("visual_labels", "textual_labels")


@dataclass
class AlarmSFTCollator:
    """Rows (query, target, frames_path, visual_label, textual_label) as model inputs with the video,
    labels on the target tokens only, and each row's two safety labels."""

    processor: Any
    load_frames: Callable[[dict], np.ndarray] = row_frames

    def __call__(self, rows: list[dict]) -> dict:
        batch = models.supervised_batch(
            self.processor, [self.load_frames(r) for r in rows], [r["query"] for r in rows], [r["target"] for r in rows]
        )
        batch["visual_labels"] = torch.tensor([float(r["visual_label"]) for r in rows])
        batch["textual_labels"] = torch.tensor([float(r["textual_label"]) for r in rows])
        return batch


class AlarmSFTTrainer(SFTTrainer):
    """SFTTrainer with the alarm heads' BCE losses; logs lm_loss, both BCEs and both heads' accuracy
    every step beside TRL's own metrics."""

    def __init__(self, *args, loss_weights: tuple[float, float] = (0.0, 0.0), **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_weights = loss_weights
        # The loss below is a per-micro-batch mean: let the Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch.nn.functional as F

        mode = "train" if model.training else "eval"
        labels = {k: inputs.pop(k) for k in LABELS}
        out = model(**inputs, output_hidden_states=True, use_cache=False)
        loss = out.loss
        self._metrics[mode]["lm_loss"].append(float(out.loss.detach()))
        logits = alarm.alarm_module(model).logits(out.hidden_states[-1], inputs["input_ids"], model.config)
        for name, logit, target, weight in zip(("visual", "textual"), logits, labels.values(), self.loss_weights):
            bce = F.binary_cross_entropy_with_logits(logit.float(), target.to(logit.device))
            if weight > 0:
                loss = loss + weight * bce
            self._metrics[mode][f"{name}_bce"].append(float(bce.detach()))
            self._metrics[mode][f"{name}_accuracy"].append(float(((logit > 0).float() == target.to(logit.device)).float().mean()))
        return (loss, out) if return_outputs else loss


def sft_config(a, output_dir: Path, device: str, epochs: float, max_steps: int = -1, section: str = "at_sft") -> SFTConfig:
    """TRL's SFTConfig from a settings block (at_sft, cot); `a.trl_args` go in as is (the pinned ones refused)."""
    check_trl_args(section, a.trl_args, SFTConfig, "https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig", PINNED_ARGS)
    on_gpu = device == "cuda"
    defaults = dict(
        num_train_epochs=epochs, max_steps=max_steps, learning_rate=a.learning_rate, per_device_train_batch_size=a.batch_size,
        seed=a.seed, data_seed=a.seed, lr_scheduler_type="cosine", warmup_steps=0.03,  # the authors' schedule
        weight_decay=0.0, report_to="none", logging_steps=1, save_strategy="no", max_length=None, bf16=on_gpu,
        use_cpu=not on_gpu, activation_checkpointing=on_gpu, gradient_checkpointing=on_gpu, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    defaults.update(trainer_args(a, on_gpu, SFTConfig))
    if "gradient_checkpointing" in a.trl_args or "activation_checkpointing" in a.trl_args:
        defaults.pop("activation_checkpointing"), defaults.pop("gradient_checkpointing")
    return SFTConfig(
        output_dir=str(output_dir), remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        **{**defaults, **a.trl_args},
    )


def optimizer(model, a, with_heads: bool):
    """AdamW over the three groups, each at its own rate; the heads only in stage 2."""
    module = alarm.alarm_module(model)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    heads = [*module.visual_head.parameters(), *module.textual_head.parameters()]
    for p in heads:
        p.requires_grad_(with_heads)
    module.embeddings.requires_grad_(True)
    groups = [
        {"params": lora, "lr": a.learning_rate, "name": "lora"},
        {"params": [module.embeddings], "lr": a.alarm_learning_rate, "name": "alarm_embeddings"},
    ]
    if with_heads:
        groups.append({"params": heads, "lr": a.head_learning_rate, "name": "alarm_heads"})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def train_at_sft(model, processor, dataset, a, output_dir: Path, device: str, callbacks_for=lambda stage: (), max_steps: int = -1):
    """Both AT-SFT stages on `model` (a loaded base model without alarm tokens); returns
    (the PEFT model with its AlarmModule, {stage: trainer}).

    The alarm tokens are added, LoRA goes on the language model, and everything else stays
    frozen. Every forward must get the video (require_video_inputs; trainer.video_forwards counts
    them). callbacks_for(stage) gives each stage's callbacks (the step loggers)."""
    from peft import get_peft_model
    from transformers.trainer_callback import PrinterCallback

    alarm.add_alarm_tokens(model, processor)
    hook, seen = require_video_inputs(model)
    peft_model = get_peft_model(model, lora_config(a))
    trainers = {}
    try:
        for stage, epochs, weights in ((1, a.stage1_epochs, (0.0, 0.0)), (2, a.stage2_epochs, (a.visual_loss_weight, a.textual_loss_weight))):
            trainer = AlarmSFTTrainer(
                model=peft_model,
                args=sft_config(a, Path(output_dir) / f"stage{stage}", device, epochs, max_steps),
                train_dataset=dataset,
                processing_class=processor,
                data_collator=AlarmSFTCollator(processor),
                optimizers=(optimizer(peft_model, a, with_heads=stage == 2), None),
                callbacks=list(callbacks_for(stage)),
                loss_weights=weights,
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            trainer.video_forwards = dict(seen)
            trainers[stage] = trainer
    finally:
        hook.remove()
    peft_model.eval()
    return peft_model, trainers
