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
import tempfile
import time

import dagster as dg
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import base_validation_answers, judge_answers, loss_plot, markdown_table
from ground.catalog import MissingOutput, StageData, StageSpec
from ground.checkpoints import CheckpointRecord
from ground.taxonomy import subcategories_from_frame
from resources.roles import build_role
from resources.training import (
    LORA_TARGETS, adapter_signature, changed_params, frozen_problems, log_adapter, loss_fell, param_fingerprint,
    register_adapter, registry_tags,
)
from resources.video import load_frames_of

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


def train_adapter(st: Stage, base: CheckpointRecord, dataset, device: str, seed: int, adapter_dir) -> dict:
    """DPO + LoRA on the base weights with one seed; saves the adapter to adapter_dir and returns
    what the check and metadata need."""
    import torch

    from resources import models
    from resources.dpo_collator import train_dpo
    from resources.training import make_step_logger

    if base.adapter_path:
        raise ValueError(f"checkpoint {base.name!r} is an adapter on {base.base_model}: DPO trains on full weights")
    torch.manual_seed(seed)
    model, processor = models.load_video_llm(base.weights(), device=device)
    before = param_fingerprint(model)
    # The registered seed's curve keeps the plain names; a replicate's goes under seed<k>.
    prefix = "" if seed == st.settings.dpo.seed else f"seed{seed}."
    step_logger = make_step_logger(st.progress(f"DPO seed {seed}", unit="step"), prefix)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="dpo_trainer_") as scratch:
        d = st.settings.dpo.model_copy(update={"seed": seed})
        trainer = train_dpo(model, processor, dataset, d, scratch, device, callbacks=[step_logger])
    seconds = time.time() - t0
    peft_model = trainer.model
    after = param_fingerprint(peft_model)
    trainable = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    peft_model.save_pretrained(str(adapter_dir))
    losses = [h["loss"] for h in step_logger.history]
    return {
        "adapter": adapter_dir,
        "history": step_logger.history,
        "losses": losses,
        "train_seconds": seconds,
        "frozen_checked": len(before),
        "frozen_changed": len(changed_params(before, after)),
        "trainable": trainable,
        "frozen_problems": frozen_problems(before, after, trainable),
        "loss_fell": loss_fell(losses),
    }


def validation_evaluation(st: Stage, base: CheckpointRecord, target_model: StageData, held: pd.DataFrame, subs, device: str) -> dict:
    """The adapter reloads through the same code path as any model and answers the validation
    queries (the split settings are chosen on; the benchmark stays for benchmark_scores); the
    judge rates them beside the base model's answers."""
    from resources import models

    tm = st.settings.target_model
    aligned, proc = models.load_video_llm(base.weights(), device=device, adapter=st.path("adapter"))
    t0 = time.time()
    answers = models.generate_answers(
        aligned, proc, load_frames_of(held["frames_path"]), held["query"].tolist(), tm.max_new_tokens, tm.batch_size,
        progress=st.progress("aligned validation answers"),
    )
    seconds = time.time() - t0
    judge = build_role("judge", st.settings)
    verdicts, aligned_rates = judge_answers(judge, held, answers, subs)
    _, base_rates = judge_answers(judge, held, base_validation_answers(st, target_model, base, held, device), subs)
    sample = held.assign(answer=answers, judged_safe=[v.safe for v in verdicts])
    return {"answers": sample, "aligned": aligned_rates, "base": base_rates, "seconds": seconds, "judge": judge}


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


def register(st: Stage, passed: bool, ev: dict, base: CheckpointRecord) -> str | None:
    """The adapter as a run artifact with its input/output signature, and (only when the check passed)
    a registered model version tagged with its taxonomy version, checkpoint, method and held-out rates,
    which moves the version's `latest-` alias and, when it is the best one, its `champion-` alias."""
    import mlflow

    cur = st.settings.curation
    signature = adapter_signature(cur.frames_per_clip, cur.frame_size)
    log_adapter(st.path("adapter"), signature, base.name if base.base_model_local else base.base_model, "dpo")
    if not passed:
        return None
    info = st.run.info
    name = f"safevid-dpo-adapter-{st.settings.profile}"
    tags = registry_tags(st.version, CHECKPOINT_NAME, "dpo", passed, ev["aligned"], ev["base"])
    registered = register_adapter(
        st.context.resources.mlflow.client(), info.run_id, info.artifact_uri, name, tags,
        description="SafeVid DPO LoRA adapters of the target video LLM",
    )
    mlflow.set_tag("registered_model_version", registered)
    return registered


def replicate_dir(st: Stage, seed: int):
    return st.path("replicates") / f"seed{seed}"


def dpo_record(st: Stage, base: CheckpointRecord, registered: str | None) -> CheckpointRecord:
    """The aligned checkpoint: the base record's weights plus this stage's adapter (and the adapters
    of the replicate seeds)."""
    d = st.settings.dpo
    fields = dict(
        name=CHECKPOINT_NAME, method="dpo", parent=base.name, taxonomy_version=st.version, mlflow_run_id=st.run.info.run_id,
        registered_model_version=registered, settings=st.settings.flat("dpo"), seed=d.seed,
    )
    replicates = {k: replicate_dir(st, k) for k in d.replicate_seeds}
    if base.base_model_local:
        return CheckpointRecord.local(st.out.folder, weights=base.weights(), adapter=st.path("adapter"), replicates=replicates, **fields)
    return CheckpointRecord(
        base_model=base.base_model, base_model_local=False, adapter_path="adapter",
        replicates={str(k): f"replicates/seed{k}" for k in d.replicate_seeds}, **fields,
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
    trained = train_adapter(st, base, dataset, device, d.seed, st.path("adapter"))  # inside the stage's run: per-step metrics go to it
    shutil.rmtree(st.path("replicates"), ignore_errors=True)
    st.path("replicates").mkdir(parents=True)
    replicas = [train_adapter(st, base, dataset, device, k, replicate_dir(st, k)) for k in d.replicate_seeds]
    queries = adversarial_queries.table("queries.parquet")
    subs = {s.subcategory: s for s in subcategories_from_frame(safety_taxonomy.table("subcategories.parquet"))}
    ev = validation_evaluation(st, base, target_model, queries[queries["split"] == "validation"], subs, device)
    problems = adapter_problems(trained, ev["answers"]["answer"].tolist())
    problems += [f"seed {k}: {p}" for k, r in zip(d.replicate_seeds, replicas) for p in r["frozen_problems"]]
    summary = dpo_summary(trained, ev)
    st.log.info(f"DPO: {summary}")
    registered = register(st, not problems, ev, base)
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
        "replicate_seeds": dg.MetadataValue.json(list(d.replicate_seeds)),
        "aligned_validation_answers": dg.MetadataValue.md(
            markdown_table(sample[["subcategory", "query", "answer", "judged_safe"]].sample(frac=1, random_state=0), limit=10)
        ),
    }
    return st.finish(metadata, [check_result(problems, trained)], summary)
