"""Safety-Guided GRPO on video: TRL's GRPOTrainer with the clip in every generation and log-prob pass.

TRL 1.x's GRPOTrainer wires images only (trl#4144 open; the video subclass of PR #4529 was
closed): given a video column it would generate and score text-only. This subclass encodes each
prompt with `processor(videos=...)` through resources/models.py (the code that prompts the model
at generation time, alarm tokens included), hands the video tensors to `generate`, and gives every
log-probability pass (policy, old policy, reference) the video of its rows. The tensors are kept
per row, so TRL's shuffling and splitting of a generation batch move each clip with its completion;
Qwen-VL's `second_per_grid_ts` travels with its row (Video-R1's trainer drops it) and its
`mm_token_type_ids` are rebuilt over prompt + completion (Qwen2.5-VL computes its 3-D positions
from them). `video_passes` counts the passes that got the video. The rewards are
ground/safety_cot.py's, as TRL reward functions (`reward_functions`). Importing this module
imports TRL: import it inside the function that trains.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from trl import GRPOTrainer

from ground import safety_cot
from resources import models
from resources.video import row_frames

# Per-token fields: rebuilt from the ids, not sliced from the prompt encoding.
TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")
VIDEO_TYPE_ID = 2  # Qwen-VL's mm_token_type_ids: 0 text, 1 image, 2 video


def video_rows(encoding) -> list[dict[str, torch.Tensor]]:
    """The processor's video tensors, one dict per prompt row. Qwen-VL flattens the patches of every
    clip into one tensor (split here by each clip's grid); LLaVA-NeXT-Video stacks one clip per row."""
    n = len(encoding["input_ids"])
    keys = [k for k in encoding if k.endswith("_videos") or k in ("video_grid_thw", "second_per_grid_ts")]
    rows: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    grid = encoding.get("video_grid_thw")
    for key in keys:
        value = torch.as_tensor(encoding[key])
        if grid is not None and key == "pixel_values_videos":
            parts = torch.split(value, grid.prod(-1).tolist())
        else:
            parts = [value[i:i + 1] for i in range(n)]
        for row, part in zip(rows, parts):
            row[key] = part
    return rows


def collate_rows(rows: list[dict[str, torch.Tensor]], device) -> dict[str, torch.Tensor]:
    return {k: torch.cat([r[k] for r in rows]).to(device) for k in rows[0]} if rows and rows[0] else {}


class VideoGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose dataset rows carry `frames_path` (a clip's sampled frames, .npy) beside
    `prompt` (the query text); every forward of a generation batch gets the clip of its row."""

    def __init__(self, *args, load_frames: Callable[[dict], np.ndarray] = row_frames, **kwargs):
        super().__init__(*args, **kwargs)
        self.load_frames = load_frames
        self._encoding = None
        self._rows: list[dict[str, torch.Tensor]] | None = None
        self.video_passes = {"generate": 0, "logps": 0, "logps_without_video": 0}
        config = self.accelerator.unwrap_model(self.model).config
        video_id = getattr(config, "video_token_id", None) or getattr(config, "video_token_index", None)
        self._video_token_id = None if video_id is None else int(video_id)
        self._typed = getattr(config, "vision_end_token_id", None) is not None  # Qwen-VL reads mm_token_type_ids
        # A sampled video placeholder or alarm token would break the feature count or the alarm contract.
        never = [i for i in (self._video_token_id, getattr(config, "visual_alarm_token_id", None),
                             getattr(config, "textual_alarm_token_id", None)) if i is not None]
        self.generation_config.suppress_tokens = sorted(set(self.generation_config.suppress_tokens or []) | set(never))

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        proc = self.processing_class
        videos = [models.as_video(self.load_frames(x)) for x in inputs]
        self._encoding = models.encode_prompts(proc, videos, [x["prompt"] for x in inputs])
        self._rows = video_rows(self._encoding)
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._encoding = None
        out["video_rows"] = self._rows
        self._rows = None
        return out

    def _tokenize_prompts(self, prompts: list):
        """The prompts as encode_prompts made them (one clip each), unpadded: TRL pads them again."""
        enc = self._encoding
        if enc is None or len(prompts) != len(enc["input_ids"]):
            raise RuntimeError("VideoGRPOTrainer tokenizes only the prompts of the batch it encoded with their videos")
        keep = enc["attention_mask"].bool()
        ids = [row[m].tolist() for row, m in zip(enc["input_ids"], keep)]
        fields: dict[str, Any] = dict(collate_rows(self._rows, "cpu"))
        fields.update({k: [row[m].tolist() for row, m in zip(enc[k], keep)] for k in TOKEN_TYPE_KEYS if k in enc})
        self.video_passes["generate"] += 1
        return ids, None, fields

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._rows = inputs.pop("video_rows")
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._rows = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **image_kwargs):
        """Per-token log-probs (and entropies) of the completions, in chunks, each chunk with the
        video tensors of its rows."""
        if any(v is not None for k, v in image_kwargs.items() if k != "num_images"):
            raise ValueError(f"VideoGRPOTrainer takes videos, not {sorted(k for k, v in image_kwargs.items() if v is not None)}")
        rows = self._rows or []
        if len(rows) != len(input_ids):
            raise RuntimeError(f"{len(input_ids)} sequences but the video of {len(rows)} rows: the batch lost its clips")
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            ids = input_ids[start:end]
            inputs = {"input_ids": ids, "attention_mask": attention_mask[start:end], **collate_rows(rows[start:end], ids.device)}
            if self._typed and self._video_token_id is not None:
                inputs["mm_token_type_ids"] = (ids == self._video_token_id).long() * VIDEO_TYPE_ID
            key = "logps" if any(k.endswith("_videos") for k in inputs) else "logps_without_video"
            self.video_passes[key] += 1
            labels = ids.masked_fill(attention_mask[start:end] == 0, -100)
            labels[:, :-logits_to_keep] = -100
            with self.accelerator.autocast():
                out = model(**inputs, labels=labels, fused_lm_head=True)
            logps.append(out.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(out.entropy[:, -logits_to_keep:])
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None


def reward_functions(settings: safety_cot.RewardSettings = safety_cot.RewardSettings()) -> list[Callable]:
    """TRL reward functions: the format reward, and the accuracy reward against each row's
    `reference` answer and `visual_label` / `textual_label`, which also logs its parts (ROUGE, the
    two tag matches, alpha) and the rate of exact-format completions every step."""

    def format_reward(prompts, completions, log_metric=None, **kwargs) -> list[float]:
        values = [safety_cot.format_reward(c) for c in completions]
        if log_metric is not None:
            log_metric("format_rate", float(np.mean(values)))
        return values

    def accuracy_reward(prompts, completions, reference, visual_label, textual_label, log_metric=None, **kwargs) -> list[float]:
        parts = [safety_cot.accuracy_reward(c, r, v, t, settings) for c, r, v, t in zip(completions, reference, visual_label, textual_label)]
        if log_metric is not None:
            for name in ("rouge", "r_visual", "r_textual", "alpha"):
                log_metric(name, float(np.mean([p[name] for p in parts])))
        return [p["accuracy"] for p in parts]

    return [format_reward, accuracy_reward]


def train_grpo(peft_model, processor, dataset, g, output_dir, device: str, callbacks=(), max_steps: int = -1):
    """Safety-Guided GRPO of `peft_model` (the CoT model, loaded with its adapter trainable) on rows
    with prompt, frames_path, reference and the two labels; LoRA only, the alarm embeddings frozen,
    the reference a frozen copy of the starting adapter (TRL's "ref" adapter). Frames are capped by
    g.max_frames / g.max_frame_size. Returns the trainer (`video_passes`, and `video_forwards`:
    every forward with video tokens had the video)."""
    from resources.cot_trainer import lora_only
    from resources.training import train_with_video
    from resources.video import capped_frames

    lora_only(peft_model)
    rewards = safety_cot.RewardSettings(g.alpha_min, g.alpha_max, g.gamma_visual, g.gamma_textual)
    return train_with_video(peft_model, lambda: VideoGRPOTrainer(
        model=peft_model, reward_funcs=reward_functions(rewards), args=grpo_config(g, output_dir, device, max_steps),
        train_dataset=dataset, processing_class=processor, callbacks=list(callbacks),
        load_frames=lambda row: capped_frames(row_frames(row), g.max_frames, g.max_frame_size),
    ))


PINNED_ARGS = {
    "output_dir": "the stage picks a scratch folder",
    "remove_unused_columns": "the rewards and the video need whole rows (frames_path, reference, labels)",
}


def grpo_config(g, output_dir, device: str, max_steps: int = -1):
    """TRL's GRPOConfig from the grpo settings (GRPOSettings: the recipe, TrainerSettings and trl_args)."""
    from trl import GRPOConfig

    from resources.training import check_trl_args, trainer_args

    check_trl_args("grpo", g.trl_args, GRPOConfig, "https://huggingface.co/docs/trl/grpo_trainer#trl.GRPOConfig", PINNED_ARGS)
    on_gpu = device == "cuda"
    defaults = dict(
        num_generations=g.group_size, beta=g.beta, epsilon=g.epsilon, temperature=g.temperature, top_p=g.top_p,
        max_completion_length=g.max_completion_tokens, learning_rate=g.learning_rate, num_train_epochs=g.epochs,
        per_device_train_batch_size=g.batch_size, max_steps=max_steps, seed=g.seed, data_seed=g.seed,
        weight_decay=0.01, max_grad_norm=5.0,  # the authors' stage-4 script
        report_to="none", logging_steps=1, save_strategy="no", bf16=on_gpu, use_cpu=not on_gpu,
        gradient_checkpointing=on_gpu, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )
    defaults.update(trainer_args(g, on_gpu, GRPOConfig))
    return GRPOConfig(output_dir=str(output_dir), **{**defaults, **g.trl_args})

