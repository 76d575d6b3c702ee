"""The safety chain-of-thought cold start (VideoSafety-R1 stage 3) with TRL's SFTTrainer.

The AT-SFT checkpoint's LoRA adapter goes on training on the LM loss alone, over targets in the
authors' format (`<think>…</think><answer>…</answer><vidType>…</vidType><textType>…</textType>`):
the language model only, with the alarm embeddings, the heads and the vision tower frozen (the
paper's stage table). The collator and trainer are AT-SFT's (resources/at_sft_trainer.py), so the
prompts carry the alarm tokens as at generation time; the heads' BCE is logged, not trained.
Importing this module imports TRL: import it inside the function that trains.
"""
from __future__ import annotations

from pathlib import Path

import torch

from resources import alarm
from resources.at_sft_trainer import AlarmSFTCollator, AlarmSFTTrainer, sft_config
from resources.training import ADAPTER_WEIGHTS, train_with_video


def with_lm_head(peft_model) -> None:
    """Give the adapter its own trainable copy of the LM head (PEFT modules_to_save), saved and
    loaded with it. The paper trains the whole LLM in this stage; LoRA alone cannot raise the
    output rows of tokens the model never wrote (the embedded model's tags and reasoning words)."""
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils.other import set_additional_trainable_modules

    config = peft_model.peft_config["default"]
    config.modules_to_save = sorted(set(config.modules_to_save or []) | {"lm_head"})
    set_additional_trainable_modules(peft_model.base_model, config, BaseTuner.get_model_config(peft_model), "default")


def lora_only(peft_model) -> list[torch.nn.Parameter]:
    """Freeze everything but the adapter's own weights (LoRA, and an LM head copy where it has one;
    the alarm module and a GRPO reference copy stay frozen); return those."""
    module = alarm.alarm_module(peft_model)
    if module is not None:
        module.requires_grad_(False)
    trainable = []
    for name, p in peft_model.named_parameters():
        p.requires_grad_(any(t in name for t in ADAPTER_WEIGHTS) and ".default." in name)
        if p.requires_grad:
            trainable.append(p)
    if not trainable:
        raise ValueError("the model has no LoRA weights to train: load the AT-SFT adapter with trainable=True")
    return trainable


def train_cot(peft_model, processor, dataset, c, output_dir: Path, device: str, callbacks=(), max_steps: int = -1):
    """CoT SFT of `peft_model` (the AT-SFT model, loaded with its adapter trainable; with
    c.train_lm_head, its LM head copy too) on rows with query, target, frames_path and the two
    labels; returns the trainer (`video_forwards` counts the forwards that had the video)."""
    if c.train_lm_head:
        with_lm_head(peft_model)
    lora = lora_only(peft_model)
    return train_with_video(peft_model, lambda: AlarmSFTTrainer(
        model=peft_model,
        args=sft_config(c, Path(output_dir), device, c.epochs, max_steps, section="cot"),
        train_dataset=dataset,
        processing_class=processor,
        data_collator=AlarmSFTCollator(processor),
        optimizers=(torch.optim.AdamW([{"params": lora, "lr": c.learning_rate, "name": "lora"}], weight_decay=0.0), None),
        callbacks=list(callbacks),
        loss_weights=(0.0, 0.0),
    ))
