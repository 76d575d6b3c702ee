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
    adapter_validation, parent_of_seed, reasoning_check, reasoning_metadata, reasoning_problems,
    reasoning_summary, register_adapter_version, seed_problems, train_from_parent, training_dataset,
)
from ground.catalog import StageData, StageSpec
from ground.checkpoints import CheckpointRecord, replicate_folder
from ground.taxonomy import subcategories_from_frame

SPEC = StageSpec(
    folder="cot",
    files=("checkpoint.json", "adapter/", "replicates/", "validation_answers.parquet"),
    params=("cot", "target_model.batch_size", "roles.judge", "gates.min_format_rate", "gates.min_visual_tag_accuracy"),
)
CHECKPOINT_NAME = "cot"


def record_of(st: Stage, base: CheckpointRecord, parent: CheckpointRecord, registered: str | None) -> CheckpointRecord:
    c = st.settings.cot
    return CheckpointRecord.adapter_on(
        base, st.out.folder, c.replicate_seeds, name=CHECKPOINT_NAME, method="safety-cot", parent=parent.name,
        taxonomy_version=st.version, mlflow_run_id=st.run.info.run_id, registered_model_version=registered,
        settings=st.settings.flat("cot"), seed=c.seed, alarm_tokens=True, output_format="safety_cot",
    )


@stage_asset(
    SPEC,
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
    from resources.cot_trainer import train_cot

    base, parent = target_model.checkpoint(), at_sft_checkpoint.checkpoint()
    dataset = training_dataset(safety_cot_dataset)
    device = models.pick_device(st.settings.target_model.device)
    c = st.settings.cot
    st.log_params({"base_model": base.weights(), "parent_checkpoint": parent.name, "rows": len(dataset), "device": device})
    seeds = [(c.seed, st.path("adapter"))] + [(k, st.out.folder / replicate_folder(k)) for k in c.replicate_seeds]
    trained = [train_from_parent(st, base, parent_of_seed(parent, k, "cot"), dataset, device, k, folder, "cot", train_cot) for k, folder in seeds]
    queries = adversarial_queries.table("queries.parquet")
    held = queries[queries["split"] == "validation"].reset_index(drop=True)
    subs = {s.subcategory: s for s in subcategories_from_frame(safety_taxonomy.table("subcategories.parquet"))}
    ev = adapter_validation(st, base, target_model, held, subs, device, st.path("adapter"), "CoT", reasoning=True)
    problems = [p for t in trained for p in seed_problems(t, every_forward=True)] + reasoning_problems(ev, st.settings.gates)
    summary = reasoning_summary(trained, ev)
    st.log.info(f"CoT: {summary}")
    registered = register_adapter_version(
        st, base, not problems, ev, CHECKPOINT_NAME, "safety-cot", f"videosafety-cot-adapter-{st.settings.profile}",
        "VideoSafety-R1 safety CoT cold start: LoRA adapters with frozen alarm tokens",
    )
    record_path = record_of(st, base, parent, registered).save(st.out.folder)
    sample = ev["answers"][["query_id", "kind", "subcategory", "harmful", "query", "completion", "answer", "judged_safe"]]
    st.write_table(sample, "validation_answers.parquet")
    metadata = {
        "checkpoint": dg.MetadataValue.path(str(record_path)), "parent": parent.name, **summary,
        "registered_model_version": registered or "not registered (check failed)",
        "replicate_seeds": dg.MetadataValue.json(list(c.replicate_seeds)),
        **reasoning_metadata(trained, sample, "CoT SFT loss"),
    }
    return st.finish(metadata, [reasoning_check("cot_format_learned", problems, trained, summary)], summary)
