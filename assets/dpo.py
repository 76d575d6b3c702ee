"""dpo_checkpoint: DPO with TRL and a LoRA adapter on the language model, vision side frozen.

The paper: beta 0.1, one epoch, vision tower frozen. The embedded profile trains longer at a
higher rate (pipelines.yaml dpo section) because its tiny base model has minutes, not a GPU-day.
TRL's DPOTrainer sees a video only through resources/dpo_collator.py (its own collator would
train text-only). Output: the adapter at data/dpo/<version>/adapter, an MLflow run with per-step
loss and rewards, the adapter as an artifact and a registered model version.
"""
import json
import shutil
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from assets.common import markdown_table, progress_logger, record_lineage
from assets.target_model import judge_rates, load_queries, loss_plot, read_target
from dagster_project.partitions import taxonomy_partitions
from dagster_project.settings import PipelineSettings
from resources.dvc import DvcTracker
from resources.roles import build_role
from resources.tracking import MlflowTracker
from resources.video import load_frames_of

# LoRA goes on the language model's projections only; the vision tower has q/k/v projections too.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
REGISTERED_MODEL = "safevid-dpo-adapter"


def param_fingerprint(model, skip=("lora_",)) -> dict[str, tuple[float, float, float]]:
    """A cheap exact-enough fingerprint of every parameter not matching `skip` (sum, |sum|, first value).

    Names are those of the plain model: PEFT's `base_model.model.` prefix and `.base_layer` are removed.
    """
    import torch

    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            key = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            t = p.detach().double()
            out[key] = (float(t.sum()), float(t.abs().sum()), float(t.reshape(-1)[0]))
    return out


def changed_params(before: dict, after: dict) -> list[str]:
    missing = sorted(set(before) ^ set(after))
    return missing + sorted(k for k in before.keys() & after.keys() if before[k] != after[k])


def loss_fell(losses: list[float]) -> tuple[bool, float, float]:
    """Mean of the first fifth of the steps vs the last fifth."""
    if len(losses) < 2:
        return False, float("nan"), float("nan")
    k = max(1, len(losses) // 5)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    return last < first, first, last


def lora_config(d):
    from peft import LoraConfig

    return LoraConfig(
        r=d.lora_r,
        lora_alpha=d.lora_alpha,
        lora_dropout=d.lora_dropout,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )


def make_step_logger(progress=None):
    """A TrainerCallback that logs every logged step (loss, rewards, margins) to the active MLflow run;
    progress(step, max_steps) reports how far training is."""
    from transformers import TrainerCallback

    class MlflowStepLogger(TrainerCallback):
        def __init__(self):
            self.history: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            metrics = {k.replace("/", "_"): float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            self.history.append({"step": state.global_step, **metrics})
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_metrics(metrics, step=state.global_step)
            if progress is not None:
                progress(state.global_step, state.max_steps)

    return MlflowStepLogger()


def train_dpo(model, processor, dataset, d, output_dir: Path, device: str, callbacks=(), max_steps: int = -1):
    """DPO + LoRA on `model` (a loaded base model); returns the trainer after training.

    Everything but the LoRA weights stays frozen; the reference is the base model (adapter off).
    """
    from trl import DPOConfig, DPOTrainer

    from resources.dpo_collator import VideoPreferenceCollator

    on_gpu = device == "cuda"
    args = DPOConfig(
        output_dir=str(output_dir),
        beta=d.beta,
        num_train_epochs=d.epochs,
        max_steps=max_steps,
        learning_rate=d.learning_rate,
        per_device_train_batch_size=d.batch_size,
        seed=d.seed,
        data_seed=d.seed,
        report_to="none",
        remove_unused_columns=False,
        logging_steps=1,
        save_strategy="no",
        max_length=None,  # never cut the video tokens; the prompts are short
        bf16=on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=on_gpu,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        data_collator=VideoPreferenceCollator(processor=processor),
        peft_config=lora_config(d),
        callbacks=list(callbacks),
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; the step logger keeps them
    trainer.train()
    return trainer


def register_adapter(client, run_id: str, artifact_uri: str, version: str, profile: str) -> str:
    """A registered model version for the adapter (register_model refuses a bare LoRA folder)."""
    from mlflow.exceptions import MlflowException

    name = f"{REGISTERED_MODEL}-{profile}"
    try:
        client.get_registered_model(name)
    except MlflowException:  # not registered yet
        client.create_registered_model(name, description="SafeVid DPO LoRA adapters of the target video LLM")
    mv = client.create_model_version(
        name=name, source=f"{artifact_uri}/adapter", run_id=run_id, tags={"taxonomy_version": version}
    )
    return f"{name}/{mv.version}"


@dg.asset(
    deps=["preference_pairs", "target_model"],
    partitions_def=taxonomy_partitions,
    group_name="model",
    code_version="1",
    check_specs=[dg.AssetCheckSpec("adapter_is_trained", asset="dpo_checkpoint", blocking=True)],
)
def dpo_checkpoint(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow: MlflowTracker, dvc: DvcTracker):
    """The DPO LoRA adapter of the target model, trained on the preference pairs with the videos."""
    import torch
    from datasets import load_from_disk

    from resources import models

    cfg = settings.load()
    d, tm = cfg.dpo, cfg.target_model
    version = context.partition_key
    target = read_target(cfg, version)
    pairs_dir = cfg.path("pairs", version, "dataset")
    if not pairs_dir.exists():
        raise FileNotFoundError(f"{pairs_dir} is missing: materialize 'preference_pairs' for partition {version} first")
    dataset = load_from_disk(str(pairs_dir))
    if len(dataset) == 0:
        raise ValueError(f"{pairs_dir} holds no preference pairs: nothing to train on")
    out_dir = cfg.path("dpo", version)
    adapter_dir = out_dir / "adapter"
    device = models.pick_device(tm.device)
    torch.manual_seed(d.seed)

    model, processor = models.load_video_llm(target["model"], device=device)
    before = param_fingerprint(model)
    step_logger = make_step_logger(progress_logger(context, "DPO steps"))
    params = {
        **{f"dpo.{k}": v for k, v in d.model_dump().items()},
        "base_model": target["model"],
        "pairs": len(dataset),
        "lora_targets": LORA_TARGETS,
        "device": device,
        "frames_per_clip": cfg.curation.frames_per_clip,
    }
    t0 = time.time()
    with mlflow.run(
        context,
        cfg.profile,
        params,
        tags={"taxonomy_version": version},
        inputs={"preference_pairs": cfg.path("pairs", version, "pairs.parquet")},
    ) as run:
        import mlflow as mlf

        trainer = train_dpo(model, processor, dataset, d, out_dir / "trainer", device, callbacks=[step_logger])
        train_seconds = time.time() - t0
        peft_model = trainer.model
        after = param_fingerprint(peft_model)
        trainable = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
        shutil.rmtree(adapter_dir, ignore_errors=True)
        peft_model.save_pretrained(str(adapter_dir))
        shutil.rmtree(out_dir / "trainer", ignore_errors=True)
        del trainer, peft_model, model

        history = step_logger.history
        losses = [h["loss"] for h in history]
        fell, first_loss, last_loss = loss_fell(losses)
        changed = changed_params(before, after)

        # The adapter reloads through the same code path as any model, and generates.
        queries = load_queries(cfg, version)
        held = queries[queries["split"] == "heldout"]
        aligned, aproc = models.load_video_llm(target["model"], device=device, adapter=adapter_dir)
        t1 = time.time()
        answers = models.generate_answers(
            aligned, aproc, load_frames_of(held["frames_path"]), held["query"].tolist(), tm.max_new_tokens, tm.batch_size,
            progress=progress_logger(context, "aligned held-out answers"),
        )
        eval_seconds = time.time() - t1
        judge = build_role("judge", cfg)
        aligned_rates = judge_rates(judge, held["query"].tolist(), answers, held["harmful"].astype(bool).tolist())
        base_rates = base_heldout_rates(cfg, version, judge, held, models, target, device, tm)

        problems = []
        empty = sum(not a.strip() for a in answers)
        if empty:
            problems.append(f"the aligned model gave {empty} empty answers of {len(answers)}")
        if changed:
            problems.append(f"{len(changed)} frozen parameters changed, e.g. {changed[:3]}")
        if not trainable or any("lora_" not in n for n in trainable):
            problems.append(f"trainable parameters other than LoRA: {[n for n in trainable if 'lora_' not in n][:3]}")
        if any("vision_tower" in n or "multi_modal_projector" in n or "visual" in n for n in trainable):
            problems.append("LoRA reached the vision tower or projector")
        if not fell:
            problems.append(f"DPO loss did not fall (first steps {first_loss:.4f}, last steps {last_loss:.4f})")
        passed = not problems

        final = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
        summary = {
            "steps": len(history),
            "train_seconds": round(train_seconds, 1),
            "loss_first_steps": round(first_loss, 4),
            "loss_last_steps": round(last_loss, 4),
            "heldout_refusal_rate_base": round(base_rates["refusal_rate"], 4),
            "heldout_refusal_rate_aligned": round(aligned_rates["refusal_rate"], 4),
            "heldout_helpful_rate_base": round(base_rates["helpful_rate"], 4),
            "heldout_helpful_rate_aligned": round(aligned_rates["helpful_rate"], 4),
            "heldout_harmful": aligned_rates["n_harmful"],
            "heldout_benign": aligned_rates["n_benign"],
        }
        mlf.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not np.isnan(v)})
        mlf.log_artifacts(str(adapter_dir), artifact_path="adapter")
        mlf.set_tag("check.adapter_is_trained", str(passed))
        registered = None
        if passed:
            registered = register_adapter(mlflow.client(), run.info.run_id, run.info.artifact_uri, version, cfg.profile)
            mlf.set_tag("registered_model_version", registered)
    context.log.info(f"DPO: {summary}")
    sample = held.assign(answer=answers, judged_safe=[v.safe for v in aligned_rates["verdicts"]])
    # benchmark_scores adds its evaluation to this run
    (out_dir / "run.json").write_text(
        json.dumps(
            {"mlflow_run_id": run.info.run_id, "registered_model_version": registered, "base_model": target["model"],
             "adapter": str(adapter_dir), **summary},
            indent=1,
        )
    )
    check = dg.AssetCheckResult(
        check_name="adapter_is_trained",
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "problems": dg.MetadataValue.json(problems),
            "frozen_params_checked": len(before),
            "frozen_params_changed": len(changed),
            "trainable_tensors": len(trainable),
            "loss_first_steps": round(first_loss, 4),
            "loss_last_steps": round(last_loss, 4),
        },
    )
    return dg.MaterializeResult(
        metadata={
            "adapter": dg.MetadataValue.path(str(adapter_dir)),
            "base_model": target["model"],
            **summary,
            "final_step_metrics": dg.MetadataValue.json({k: round(v, 5) for k, v in final.items()}),
            "loss_curve": dg.MetadataValue.md(loss_plot(losses, "DPO loss") if losses else "_no steps_"),
            "registered_model_version": registered or "not registered (check failed)",
            "eval_seconds": round(eval_seconds, 1),
            "aligned_heldout_answers": dg.MetadataValue.md(
                markdown_table(sample[["subcategory", "query", "answer", "judged_safe"]].sample(frac=1, random_state=0), limit=10)
            ),
            "mlflow_run_id": run.info.run_id,
            **record_lineage(context, dvc, mlflow, run, "dpo_checkpoint"),
        },
        check_results=[check],
    )


def base_heldout_rates(cfg, version, judge, held: pd.DataFrame, models, target: dict, device: str, tm) -> dict:
    """The base model's held-out rates: from target_model's answers where it has them, else generated."""
    path = cfg.path("models", version, "base_answers.parquet")
    if path.exists():
        base = pd.read_parquet(path)
        base = base[base["split"] == "heldout"].set_index("query_id")
        if set(held["query_id"]) <= set(base.index):
            answers = base.loc[held["query_id"], "answer"].tolist()
            return judge_rates(judge, held["query"].tolist(), answers, held["harmful"].astype(bool).tolist())
    model, proc = models.load_video_llm(target["model"], device=device)
    answers = models.generate_answers(model, proc, load_frames_of(held["frames_path"]), held["query"].tolist(), tm.max_new_tokens, tm.batch_size)
    return judge_rates(judge, held["query"].tolist(), answers, held["harmful"].astype(bool).tolist())
