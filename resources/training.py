"""What every training method shares (DPO now; AT-SFT, CoT SFT and GRPO later), written once.

LoRA goes on the language model only, with the same settings block (ground.settings.LoraSettings)
for every method; every logged step goes to the stage's MLflow run; the frozen-vision check proves
that training touched nothing but the LoRA weights of the language model; a trained adapter becomes
a version of a registered MLflow model. Heavy libraries (peft, transformers, torch, mlflow) are
imported inside the functions that need them.
"""
from __future__ import annotations

import math
from typing import Callable

# LoRA goes on the language model's projections only; the vision tower has q/k/v projections too.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_PARTS = ("vision_tower", "multi_modal_projector", "visual")


def lora_config(lora_settings):
    """A PEFT LoraConfig from a LoraSettings block (DPOSettings and later methods subclass it)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora_settings.lora_r,
        lora_alpha=lora_settings.lora_alpha,
        lora_dropout=lora_settings.lora_dropout,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )


def make_step_logger(progress: Callable[[int, int], None] | None = None):
    """A TrainerCallback that logs every logged step (loss, rewards, margins) to the active MLflow run
    and keeps them in `.history`; progress(step, max_steps) reports how far training is."""
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


def param_fingerprint(model, skip=("lora_",)) -> dict[str, tuple[float, float, float]]:
    """A cheap exact-enough fingerprint of every parameter not matching `skip` (sum, |sum|, first value).

    Names are those of the plain model: PEFT's `base_model.model.` prefix and `.base_layer` are removed,
    so fingerprints taken before and after wrapping the model compare key by key.
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
    """Parameters that appeared, disappeared or changed between two fingerprints."""
    missing = sorted(set(before) ^ set(after))
    return missing + sorted(k for k in before.keys() & after.keys() if before[k] != after[k])


def loss_fell(losses: list[float]) -> tuple[bool, float, float]:
    """Mean of the first fifth of the steps vs the last fifth (single steps are too noisy to compare)."""
    if len(losses) < 2:
        return False, math.nan, math.nan
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return last < first, first, last


def frozen_problems(before: dict, after: dict, trainable: list[str]) -> list[str]:
    """What broke the frozen-vision contract: frozen weights changed, non-LoRA weights trainable,
    or LoRA reaching the vision side. Empty when training touched only the language model's LoRA."""
    problems = []
    changed = changed_params(before, after)
    if changed:
        problems.append(f"{len(changed)} frozen parameters changed, e.g. {changed[:3]}")
    if not trainable or any("lora_" not in n for n in trainable):
        problems.append(f"trainable parameters other than LoRA: {[n for n in trainable if 'lora_' not in n][:3]}")
    if any(part in n for n in trainable for part in VISION_PARTS):
        problems.append("LoRA reached the vision tower or projector")
    return problems


def register_adapter(
    client,
    run_id: str,
    artifact_uri: str,
    registered_name: str,
    tags: dict[str, str],
    description: str = "SafeVid LoRA adapters of the target video LLM",
) -> str:
    """A registered model version for the run's `adapter` artifact; returns "name/version".

    register_model refuses a bare LoRA folder, so the version is created from its artifact source;
    only a registered model that does not exist yet is created.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(registered_name)
    except MlflowException:  # not registered yet
        client.create_registered_model(registered_name, description=description)
    mv = client.create_model_version(name=registered_name, source=f"{artifact_uri}/adapter", run_id=run_id, tags=tags)
    return f"{registered_name}/{mv.version}"
