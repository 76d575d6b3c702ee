"""A TRL preference collator that feeds the VIDEO to the model.

TRL's DPOTrainer takes images, not videos: given a `video` column it silently trains text-only
(trl#4002, trl#4144). This subclass of its vision collator loads each row's sampled frames and
calls `processor(videos=...)`, so `pixel_values_videos` (or a Qwen-VL model's video patches and
grid) reach the model. Prompts and completions come from the processor's chat template through
resources/models.py, the same code that prompts the model at generation time.

Rows: prompt (the query text), chosen, rejected, frames_path (.npy, uint8 (T, H, W, 3)) and an
empty `images` list (which makes TRL skip its own text tokenization); train with
remove_unused_columns=False so the trainer hands the collator whole rows. `train_dpo` runs TRL's
DPOTrainer with this collator and a LoRA adapter (resources/training.py). Importing this module
imports TRL (several seconds): import it inside the function that trains.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.utils import flush_left, pad

from resources.models import as_video, build_prompts, completion_texts
from resources.training import check_trl_args, lora_config, require_video_inputs, trainer_args
from resources.video import row_frames

# What the video path depends on: trl_args may not change them.
PINNED_ARGS = {
    "output_dir": "the stage picks a scratch folder",
    "remove_unused_columns": "the video collator needs whole rows (frames_path)",
}


@dataclass
class VideoPreferenceCollator(DataCollatorForVisionPreference):
    """[chosen rows; rejected rows] with the video of each row, as TRL's DPOTrainer expects.

    Output keys: input_ids, attention_mask, completion_mask and the processor's video tensors
    (pixel_values_videos for LlavaNextVideo; pixel_values_videos + video_grid_thw for Qwen-VL);
    with a `vision_cache` (resources/vision_cache.py), also each row's clip key under CLIP_KEYS.
    """

    load_frames: Callable[[dict[str, Any]], np.ndarray] = row_frames
    vision_cache: Any = None

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        proc = self.processor
        queries = [ex["prompt"] for ex in examples]
        videos = [as_video(self.load_frames(ex)) for ex in examples]
        prompts = build_prompts(proc, queries)
        processed_prompts = proc(
            text=prompts * 2,  # chosen half, then rejected half
            videos=videos * 2,
            padding=True,
            padding_side="left",
            add_special_tokens=False,
            return_tensors=self.return_tensors,
        )
        tok = proc.tokenizer
        chosen = tok(
            completion_texts(proc, queries, [ex["chosen"] for ex in examples]),
            padding=True, padding_side="right", add_special_tokens=False, return_tensors=self.return_tensors,
        )
        rejected = tok(
            completion_texts(proc, queries, [ex["rejected"] for ex in examples]),
            padding=True, padding_side="right", add_special_tokens=False, return_tensors=self.return_tensors,
        )
        pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        completion_ids = torch.cat(tuple(pad([chosen["input_ids"], rejected["input_ids"]], padding_value=pad_token_id)))
        completion_mask = torch.cat(tuple(pad([chosen["attention_mask"], rejected["attention_mask"]], padding_value=0)))
        prompt_ids, prompt_mask = processed_prompts["input_ids"], processed_prompts["attention_mask"]
        input_ids = torch.cat((prompt_ids, completion_ids), dim=1)
        attention_mask = torch.cat((prompt_mask, completion_mask), dim=1)
        completion_mask = torch.cat((torch.zeros_like(prompt_mask), completion_mask), dim=1)
        extra = {}
        if "mm_token_type_ids" in processed_prompts:  # Qwen2.5-VL and friends
            extra["mm_token_type_ids"] = torch.cat(
                (processed_prompts["mm_token_type_ids"], torch.zeros_like(completion_ids)), dim=1
            )
        if "token_type_ids" in processed_prompts:
            extra["token_type_ids"] = torch.cat(
                (processed_prompts["token_type_ids"], torch.zeros_like(completion_ids)), dim=1
            )
        # Padding to the right only: positions then match a left-padded prompt at generation time.
        flushed = flush_left(attention_mask, input_ids, completion_mask, *extra.values())
        attention_mask, input_ids, completion_mask, *rest = flushed
        extra = dict(zip(extra, rest))
        if self.max_length is not None:  # keep_start: the video tokens sit at the start of the prompt
            input_ids = input_ids[:, : self.max_length]
            attention_mask = attention_mask[:, : self.max_length]
            completion_mask = completion_mask[:, : self.max_length]
            extra = {k: v[:, : self.max_length] for k, v in extra.items()}
        output = dict(processed_prompts)  # keeps the video tensors
        output.update(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask, **extra)
        if self.vision_cache is not None:  # the rejected half shows the chosen half's videos: hash them once
            from resources.vision_cache import CLIP_KEYS

            output[CLIP_KEYS] = self.vision_cache.clip_keys(videos, proc).repeat(2, 1)
        return output


def dpo_config(d, output_dir: Path, device: str, max_steps: int = -1):
    """TRL's DPOConfig from the dpo settings; `d.trl_args` (options the project doesn't model) go in as is."""
    from trl import DPOConfig

    check_trl_args("dpo", d.trl_args, DPOConfig, "https://huggingface.co/docs/trl/dpo_trainer#trl.DPOConfig", PINNED_ARGS)
    on_gpu = device == "cuda"
    defaults = dict(
        beta=d.beta,
        loss_type=d.loss_type,
        num_train_epochs=d.epochs,
        max_steps=max_steps,
        learning_rate=d.learning_rate,
        per_device_train_batch_size=d.batch_size,
        seed=d.seed,
        data_seed=d.seed,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        max_length=None,  # never cut the video tokens; the prompts are short
        bf16=on_gpu,
        use_cpu=not on_gpu,
        activation_checkpointing=on_gpu,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    defaults.update(trainer_args(d, on_gpu, DPOConfig))
    if d.sft_weight > 0:  # RPO, as TRL 1.x spells it
        defaults.update(loss_type=[d.loss_type, "sft"], loss_weights=[1.0, d.sft_weight])
    if "gradient_checkpointing" in d.trl_args:  # the old alias loses to the new name: let the researcher's value count
        defaults.pop("activation_checkpointing")
    return DPOConfig(output_dir=str(output_dir), remove_unused_columns=False, **{**defaults, **d.trl_args})


def train_dpo(
    model, processor, dataset, d, output_dir: Path, device: str, callbacks=(), max_steps: int = -1, collator=None, vision_cache=None
):
    """DPO + LoRA on `model` (a loaded base model) with the video collator; returns the trainer after training.

    Everything but the LoRA weights stays frozen; the reference is the base model (adapter off).
    Every forward pass, the policy's and the reference's, must get the video (trainer.video_forwards
    counts them); one that does not raises.

    vision_cache: None follows `d.cache_vision_features` (off when absent); True / False turn the
    cache on (in memory, for this run) / off; a resources.vision_cache.VisionFeatureCache is used as
    is (one with a folder, or one shared by the seeds of a stage: same base model, same features).
    With a cache, each clip's frozen video features are computed once (trainer.vision_cache).
    """
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    collator = collator or VideoPreferenceCollator(processor=processor)
    cache = _vision_cache(d, vision_cache, model)
    collator.vision_cache = cache
    hook, seen = require_video_inputs(model)  # on the base module: PEFT's policy and reference passes both reach it
    trainer = DPOTrainer(
        model=model,
        args=dpo_config(d, output_dir, device, max_steps),
        train_dataset=dataset,
        processing_class=processor,
        data_collator=collator,
        peft_config=lora_config(d),
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; the step logger keeps them
    attached = None
    try:
        # after DPOTrainer: PEFT has frozen the vision side by now, which attach checks
        attached = cache.attach(model) if cache is not None else None
        trainer.train()
    finally:
        hook.remove()
        if attached is not None:
            attached.remove()
    trainer.video_forwards = dict(seen)
    trainer.vision_cache = cache
    return trainer


def _vision_cache(d, choice, model):
    """The cache to use: the setting's (on by default) only for a model whose features it can cache
    (LLaVA-NeXT-Video-shaped; Qwen-VL trains uncached); one asked for by name must fit."""
    from resources.vision_cache import VisionFeatureCache, supported

    if choice is None:
        choice = getattr(d, "cache_vision_features", False) and supported(model)
    if choice is False:
        return None

    return VisionFeatureCache() if choice is True else choice
