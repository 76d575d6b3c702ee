"""cot_checkpoint: VideoSafety-R1's safety chain-of-thought cold start (stage 3), from AT-SFT.

Each seed's AT-SFT adapter goes on training, LM loss only, on safety_cot_dataset's targets
(`<think>…</think><answer>…</answer><vidType>…</vidType><textType>…</textType>`;
resources/cot_trainer.py, TRL's SFTTrainer): the LoRA weights train, the alarm embeddings, heads
and vision tower stay frozen. Output: per seed an adapter folder (LoRA and the unchanged alarm
state), the checkpoint record (output_format safety_cot: the judge reads the <answer> part), and
the main seed's validation completions with their tag accuracy, real and zeroed frames.
"""

import dagster as dg

from assets._stage import Stage, stage_asset
from assets.common import (
    finish_reasoning, reasoning_problems, reasoning_summary, reasoning_validation, seed_problems, train_seeds, training_dataset,
)
from ground.catalog import StageData, StageSpec
from resources.k8s import training_op_tags

SPEC = StageSpec(
    folder="cot",
    files=("checkpoint.json", "adapter/", "replicates/", "validation_answers.parquet"),
    params=("cot", "target_model.batch_size", "roles.judge", "gates.min_format_rate", "gates.min_visual_tag_accuracy"),
)
CHECKPOINT_NAME = "cot"


@stage_asset(
    SPEC,
    op_tags=training_op_tags(),
    group="videosafety_r1",
    partitioned=True,
    kinds={"checkpoint"},
    checks={
        "cot_format_learned": "Only LoRA changed (alarm embeddings, heads and vision tower untouched), every forward had the "
        "video, the loss stayed finite, and on validation the completions keep the four-tag format "
        "(gates.min_format_rate) with a vidType that is right with the video and wrong without it (gates.min_visual_tag_accuracy)."
    },
)
def cot_checkpoint(
    st: Stage, safety_cot_dataset: StageData, at_sft_checkpoint: StageData, target_model: StageData,
    adversarial_queries: StageData, safety_taxonomy: StageData,
) -> dg.MaterializeResult:
    """VideoSafety-R1's safety CoT cold start: the AT-SFT adapters learn to reason, answer and tag both modalities."""
    from resources import models

    base, parent = target_model.checkpoint(), at_sft_checkpoint.checkpoint()
    dataset = training_dataset(safety_cot_dataset)
    device = models.pick_device(st.settings.target_model.device)
    st.log_params({"base_model": base.weights(), "parent_checkpoint": parent.name, "rows": len(dataset), "device": device})
    trained = train_seeds(st, target_model, at_sft_checkpoint, dataset, device, "cot", "jobs.cot")  # the job names its module: DVC and freshness see it
    ev = reasoning_validation(st, base, target_model, adversarial_queries, safety_taxonomy, device, "CoT")
    problems = [p for t in trained for p in seed_problems(t, every_forward=True)] + reasoning_problems(ev, st.settings.gates)
    return finish_reasoning(
        st, base, parent, "cot", CHECKPOINT_NAME, "safety-cot", "VideoSafety-R1 safety CoT cold start: LoRA adapters with frozen alarm tokens",
        trained, ev, problems, reasoning_summary(trained, ev), "cot_format_learned",
    )
