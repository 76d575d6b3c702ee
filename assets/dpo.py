"""dpo_checkpoint: DPO with TRL and a LoRA adapter on the language model, vision side frozen.

The paper: beta 0.1, one epoch, vision tower frozen. The embedded profile trains longer at a
higher rate (pipelines.yaml dpo section) because its tiny base model has minutes, not a GPU-day.
TRL's DPOTrainer sees a video only through resources/dpo_collator.py (its own collator would
train text-only); what every training method shares (LoRA, step logging, the frozen-vision check,
registering) is resources/training.py. Output: the adapter at data/dpo/<version>/adapter, its
checkpoint record (checkpoint.json: base weights, adapter, MLflow run, registered version), the
aligned model's held-out answers, an MLflow run with per-step loss and rewards, the adapter as an
artifact and a registered model version.
"""
import shutil

import dagster as dg

from assets._stage import Stage, stage_asset
from assets.common import adapter_validation, loss_plot, markdown_table, register_adapter_version
from ground.catalog import MissingOutput, StageData, StageSpec
from ground.checkpoints import CheckpointRecord, replicate_folder
from ground.taxonomy import subcategories_from_frame
from resources.k8s import training_op_tags
from resources.training import LORA_TARGETS

SPEC = StageSpec(
    folder="dpo",
    files=("checkpoint.json", "adapter/", "replicates/", "validation_answers.parquet"),
    params=("dpo", "target_model", "roles.judge"),
)
CHECKPOINT_NAME = "safevid-dpo"


def load_pairs(preference_pairs: StageData):
    """The HF preference dataset preference_pairs saved; a clear error when it is missing or empty."""
    from datasets import load_from_disk

    folder = preference_pairs.path("dataset")
    if not folder.exists():
        where = f" for partition {preference_pairs.version}" if preference_pairs.version else ""
        raise MissingOutput(f"{folder} is missing: materialize 'preference_pairs'{where} first")
    dataset = load_from_disk(str(folder))
    if len(dataset) == 0:
        raise ValueError(f"{folder} holds no preference pairs: nothing to train on")
    return dataset


def train_seeds(st: Stage, target_model: StageData, preference_pairs: StageData, device: str) -> list[dict]:
    """The registered seed into adapter/, each replicate into replicates/seed<k>: one launched job
    (jobs/dpo.py) trains them all."""
    from resources.launch import job_spec, launch_training

    d = st.settings.dpo
    seeds = [(d.seed, st.path("adapter"))] + [(k, st.out.folder / replicate_folder(k)) for k in d.replicate_seeds]
    spec = job_spec(st, "dpo", seeds, device, base=target_model.folder, dataset=preference_pairs.path("dataset"))
    results, _ = launch_training(st, "jobs.dpo", spec)
    return results


def adapter_problems(trained: dict, answers: list[str]) -> list[str]:
    problems = []
    empty = sum(not a.strip() for a in answers)
    if empty:
        problems.append(f"the aligned model gave {empty} empty answers of {len(answers)}")
    problems += trained["frozen_problems"]
    fell, first, last = trained["loss_fell"]
    if not fell:
        problems.append(f"DPO loss did not fall (first steps {first:.4f}, last steps {last:.4f})")
    return problems


def dpo_summary(trained: dict, ev: dict) -> dict:
    _, first, last = trained["loss_fell"]
    return {
        "steps": len(trained["history"]),
        "train_seconds": round(trained["train_seconds"], 1),
        "loss_first_steps": round(first, 4),
        "loss_last_steps": round(last, 4),
        "validation_refusal_rate_base": round(ev["base"]["safety_rate"], 4),
        "validation_refusal_rate_aligned": round(ev["aligned"]["safety_rate"], 4),
        "validation_helpful_rate_base": round(ev["base"]["helpful_rate"], 4),
        "validation_helpful_rate_aligned": round(ev["aligned"]["helpful_rate"], 4),
        "validation_harmful": ev["aligned"]["n_harmful"],
        "validation_benign": ev["aligned"]["n_benign"],
    }


def dpo_record(st: Stage, base: CheckpointRecord, registered: str | None) -> CheckpointRecord:
    """The aligned checkpoint: the base record's weights plus this stage's adapter (and the adapters
    of the replicate seeds)."""
    d = st.settings.dpo
    return CheckpointRecord.adapter_on(
        base, st.out.folder, d.replicate_seeds, name=CHECKPOINT_NAME, method="dpo", parent=base.name, taxonomy_version=st.version,
        mlflow_run_id=st.run.info.run_id, registered_model_version=registered, settings=st.settings.flat("dpo"), seed=d.seed,
    )


def check_result(problems: list[str], trained: dict) -> dg.AssetCheckResult:
    _, first, last = trained["loss_fell"]
    return dg.AssetCheckResult(
        check_name="adapter_is_trained",
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "problems": dg.MetadataValue.json(problems),
            "frozen_params_checked": trained["frozen_checked"],
            "frozen_params_changed": trained["frozen_changed"],
            "trainable_tensors": len(trained["trainable"]),
            "loss_first_steps": round(first, 4),
            "loss_last_steps": round(last, 4),
        },
    )


@stage_asset(
    SPEC,
    op_tags=training_op_tags(),
    group="alignment",
    partitioned=True,
    kinds={"checkpoint"},
    checks={
        "adapter_is_trained": "Only the language model's LoRA weights changed (vision tower, projector and every frozen "
        "weight untouched), the DPO loss fell, and the reloaded adapter gives a non-empty answer to every validation query."
    },
)
def dpo_checkpoint(
    st: Stage, preference_pairs: StageData, target_model: StageData, adversarial_queries: StageData, safety_taxonomy: StageData
) -> dg.MaterializeResult:
    """The aligned model: a LoRA adapter on the target model, trained with DPO on the preference pairs and their videos."""
    from resources import models

    base = target_model.checkpoint()
    dataset = load_pairs(preference_pairs)
    device = models.pick_device(st.settings.target_model.device)
    d = st.settings.dpo
    st.log_params({
        "base_model": base.weights(), "base_checkpoint": base.name, "pairs": len(dataset), "lora_targets": LORA_TARGETS,
        "device": device, "frames_per_clip": st.settings.curation.frames_per_clip,
    })
    shutil.rmtree(st.path("replicates"), ignore_errors=True)
    st.path("replicates").mkdir(parents=True)
    trained, *replicas = train_seeds(st, target_model, preference_pairs, device)  # rank 0 logs each step into the stage's run
    queries = adversarial_queries.table("queries.parquet")
    subs = {s.subcategory: s for s in subcategories_from_frame(safety_taxonomy.table("subcategories.parquet"))}
    ev = adapter_validation(st, base, target_model, queries[queries["split"] == "validation"], subs, device, st.path("adapter"), "aligned")
    problems = adapter_problems(trained, ev["answers"]["answer"].tolist())
    problems += [f"seed {k}: {p}" for k, r in zip(d.replicate_seeds, replicas) for p in r["frozen_problems"]]
    summary = dpo_summary(trained, ev)
    st.log.info(f"DPO: {summary}")
    registered = register_adapter_version(
        st, base, not problems, ev, CHECKPOINT_NAME, "dpo", f"safevid-dpo-adapter-{st.settings.profile}",
        "SafeVid DPO LoRA adapters of the target video LLM",
    )
    record = dpo_record(st, base, registered)
    record_path = record.save(st.out.folder)
    sample = ev["answers"][["query_id", "kind", "subcategory", "harmful", "query", "answer", "judged_safe"]]
    st.write_table(sample, "validation_answers.parquet")
    final = {k: v for k, v in (trained["history"][-1] if trained["history"] else {}).items() if k != "step"}
    metadata = {
        "adapter": dg.MetadataValue.path(str(trained["adapter"])),
        "checkpoint": dg.MetadataValue.path(str(record_path)),
        "base_model": base.weights(),
        **summary,
        "final_step_metrics": dg.MetadataValue.json({k: round(v, 5) for k, v in final.items()}),
        "loss_curve": dg.MetadataValue.md(loss_plot(trained["losses"], "DPO loss") if trained["losses"] else "_no steps_"),
        "registered_model_version": registered or "not registered (check failed)",
        "eval_seconds": round(ev["seconds"], 1),
        # clips through the frozen vision tower vs. served from the job's feature cache (every seed so far)
        "vision_feature_rows": dg.MetadataValue.json(replicas[-1]["vision_rows"] if replicas else trained["vision_rows"]),
        "replicate_seeds": dg.MetadataValue.json(list(d.replicate_seeds)),
        "aligned_validation_answers": dg.MetadataValue.md(
            markdown_table(sample[["subcategory", "query", "answer", "judged_safe"]].sample(frac=1, random_state=0), limit=10)
        ),
    }
    return st.finish(metadata, [check_result(problems, trained)], summary)
