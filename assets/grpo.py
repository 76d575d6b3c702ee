"""grpo_checkpoint: VideoSafety-R1's Safety-Guided GRPO (stage 4), from the CoT checkpoint, on video.

Each seed's CoT adapter trains with TRL's GRPOTrainer, subclassed so every rollout and every
log-prob pass (policy, reference) gets the clip of its row (resources/grpo_trainer.py). The
rewards are ground/safety_cot.py's: the four-tag format, and alpha * ROUGE of the <answer> against
the reference plus a reward per correct tag, alpha adapting to the tags. LoRA trains; the alarm
embeddings, heads and vision tower stay frozen; the KL reference is a frozen copy of the CoT
adapter. Every step's reward components, KL, completion length, format rate and truncation rate go
to MLflow (`seed<k>.` for the replicate seeds). The prompts are safety_cot_dataset's rows (at most
grpo.max_prompts, an even draw over the kinds, keyed on clip and query text).
"""
import hashlib
import math

import dagster as dg
import numpy as np

from assets._stage import Stage, stage_asset
from assets.common import (
    KINDS, finish_reasoning, reasoning_problems, reasoning_summary, reasoning_validation, seed_problems, train_seeds, training_dataset,
)
from ground.catalog import StageData, StageSpec
from resources.k8s import training_op_tags

SPEC = StageSpec(
    folder="grpo",
    files=("checkpoint.json", "adapter/", "replicates/", "validation_answers.parquet"),
    params=("grpo", "cot.max_new_tokens", "target_model.batch_size", "roles.judge", "gates.min_format_rate",
            "gates.min_visual_tag_accuracy"),
)
CHECKPOINT_NAME = "grpo"
STEP_METRICS = ("rewards_format_reward_mean", "rewards_accuracy_reward_mean", "rouge", "r_visual", "r_textual", "alpha", "kl",
                "completions_mean_length", "completions_clipped_ratio")


def rl_prompts(dataset, max_prompts: int | None):
    """At most max_prompts rows, the same number of each kind where it has them, in an order keyed on
    the clip and the query text (never on ids or the taxonomy version)."""
    if max_prompts is None or max_prompts >= len(dataset):
        return dataset
    key = [hashlib.sha256(f"{c}\x00{q}".encode()).hexdigest() for c, q in zip(dataset["clip_id"], dataset["query"])]
    by_kind = {k: sorted((i for i, kind in enumerate(dataset["kind"]) if kind == k), key=key.__getitem__) for k in KINDS}
    chosen: list[int] = []
    while len(chosen) < max_prompts:
        for k in KINDS:
            if by_kind[k] and len(chosen) < max_prompts:
                chosen.append(by_kind[k].pop(0))
    return dataset.select(sorted(chosen))


def grpo_problems(t: dict) -> list[str]:
    """Every rollout and log-prob pass had the clip, and KL stayed finite."""
    problems = seed_problems(t, every_forward=False)
    p = t["video_passes"]
    if p["logps_without_video"] or not p["logps"] or not p["generate"]:
        problems.append(f"seed {t['seed']}: passes {p}: a rollout or log-prob pass went without the video")
    kl = [h.get("kl", math.nan) for h in t["history"]]
    if not kl or not all(math.isfinite(x) for x in kl):
        problems.append(f"seed {t['seed']}: KL not finite throughout ({len(kl)} steps)")
    return problems


def step_summary(trained: list[dict]) -> dict:
    """Per step metric, mean over the first and the last steps of the main seed (TRL logs them per step)."""
    history = trained[0]["history"]
    k = max(1, len(history) // 4)
    out = {}
    for name in STEP_METRICS:
        values = [h[name] for h in history if name in h]
        if values:
            out[f"{name}_first_steps"] = round(float(np.mean(values[:k])), 4)
            out[f"{name}_last_steps"] = round(float(np.mean(values[-k:])), 4)
    return out


@stage_asset(
    SPEC,
    op_tags=training_op_tags(),
    group="videosafety_r1",
    partitioned=True,
    kinds={"checkpoint"},
    checks={
        "grpo_trains_on_video": "Only LoRA changed (alarm embeddings, heads, vision tower and the KL reference untouched), "
        "every rollout and log-prob pass had the video, loss and KL stayed finite, the policy moved, and on validation the "
        "completions keep the four-tag format (gates.min_format_rate) with a vidType that is right with the video and "
        "wrong without it (gates.min_visual_tag_accuracy)."
    },
)
def grpo_checkpoint(
    st: Stage, safety_cot_dataset: StageData, cot_checkpoint: StageData, target_model: StageData,
    adversarial_queries: StageData, safety_taxonomy: StageData,
) -> dg.MaterializeResult:
    """VideoSafety-R1's Safety-Guided GRPO: the CoT adapters, rewarded for format, answer overlap and both tags."""
    from resources import models

    base, parent = target_model.checkpoint(), cot_checkpoint.checkpoint()
    dataset = rl_prompts(training_dataset(safety_cot_dataset), st.settings.grpo.max_prompts)
    device = models.pick_device(st.settings.target_model.device)
    st.log_params({"base_model": base.weights(), "parent_checkpoint": parent.name, "prompts": len(dataset), "device": device})
    trained = train_seeds(st, target_model, cot_checkpoint, dataset, device, "grpo", "jobs.grpo")  # the job names its module: DVC and freshness see it
    ev = reasoning_validation(st, base, target_model, adversarial_queries, safety_taxonomy, device, "GRPO")
    problems = [p for t in trained for p in grpo_problems(t)] + reasoning_problems(ev, st.settings.gates)
    return finish_reasoning(
        st, base, parent, "grpo", CHECKPOINT_NAME, "safety-grpo", "VideoSafety-R1 Safety-Guided GRPO: LoRA adapters with frozen alarm tokens",
        trained, ev, problems, {**reasoning_summary(trained, ev), **step_summary(trained), "prompts": len(dataset)}, "grpo_trains_on_video",
        {"video_passes": dg.MetadataValue.json(trained[0]["video_passes"])},
    )
