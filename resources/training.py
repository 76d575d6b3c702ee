"""What every training method shares (DPO now; AT-SFT, CoT SFT and GRPO later), written once.

LoRA goes on the language model only, with the same settings block (ground.settings.LoraSettings)
for every method; every logged step goes to the stage's MLflow run; the frozen-vision check proves
that training touched nothing but the LoRA weights of the language model; a trained adapter becomes
a version of a registered MLflow model. Heavy libraries (peft, transformers, torch, mlflow) are
imported inside the functions that need them.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

# LoRA goes on the language model's projections only; the vision tower has q/k/v projections too.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_PARTS = ("vision_tower", "multi_modal_projector", "visual")
# What an adapter trains: its LoRA weights and, where it has one, its own LM head copy (PEFT modules_to_save).
ADAPTER_WEIGHTS = ("lora_", "modules_to_save")
ALLOWED_NAMES = {"lora_": "LoRA", "alarm.": "the alarm module", "modules_to_save": "the adapter's LM head copy"}


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


def check_trl_args(section: str, trl_args: dict, config_cls, docs_url: str, pinned: dict[str, str]) -> None:
    """A settings block's trl_args must be options of TRL's config class and leave alone what the
    pipeline fixes (`pinned`: option -> why); the error names the block, the keys and the reason."""
    import dataclasses

    import trl

    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(trl_args) - known)
    if unknown:
        raise ValueError(
            f"{section}.trl_args: {unknown} {'is not an option' if len(unknown) == 1 else 'are not options'} of TRL "
            f"{trl.__version__}'s {config_cls.__name__}; see {docs_url}"
        )
    fixed = sorted(set(trl_args) & set(pinned))
    if fixed:
        raise ValueError(f"{section}.trl_args sets {fixed}, which the pipeline fixes: " + "; ".join(pinned[k] for k in fixed))


def make_step_logger(progress: Callable[..., None] | None = None, prefix: str = ""):
    """A TrainerCallback that logs every logged step (loss, rewards, margins) to the active MLflow run
    and keeps them in `.history`; progress(step, max_steps, loss=...) reports how far training is
    (resources.progress.ProgressReporter: a line with loss, rate and ETA every few seconds).
    `prefix` goes before every MLflow key, so runs of several seeds in one MLflow run keep apart."""
    from transformers import TrainerCallback

    class MlflowStepLogger(TrainerCallback):
        def __init__(self):
            self.history: list[dict] = []

        def on_train_begin(self, args, state, control, **kwargs):
            if progress is not None:  # the clock of the rate starts with training, not with the setup
                progress(0, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            metrics = {k.replace("/", "_"): float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            self.history.append({"step": state.global_step, **metrics})
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_metrics({f"{prefix}{k}": v for k, v in metrics.items()}, step=state.global_step)
            if progress is not None:
                progress(state.global_step, state.max_steps, loss=metrics["loss"])

    return MlflowStepLogger()


def param_fingerprint(model, skip=("lora_",)) -> dict[str, tuple[float, float, float]]:
    """A cheap exact-enough fingerprint of every parameter not matching `skip` (sum, |sum|, first value).

    Names are those of the plain model: PEFT's `base_model.model.` prefix, `.base_layer` and
    `.original_module` (the frozen original beside a modules_to_save copy) are removed,
    so fingerprints taken before and after wrapping the model compare key by key.
    """
    import torch

    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            key = name.replace("base_model.model.", "", 1).replace(".base_layer", "").replace(".original_module", "")
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


def frozen_problems(before: dict, after: dict, trainable: list[str], allowed: tuple[str, ...] = ("lora_",)) -> list[str]:
    """What broke the frozen-vision contract: frozen weights changed, weights other than `allowed`
    (LoRA; AT-SFT adds its alarm module) trainable, or LoRA reaching the vision side. Empty when
    training touched only the language model's LoRA (and what `allowed` names)."""
    problems = []
    changed = changed_params(before, after)
    if changed:
        problems.append(f"{len(changed)} frozen parameters changed, e.g. {changed[:3]}")
    others = [n for n in trainable if not any(a in n for a in allowed)]
    if not trainable or others:
        named = " or ".join(ALLOWED_NAMES.get(a, a) for a in allowed)
        problems.append(f"trainable parameters other than {named}: {others[:3]}")
    if any(set(n.split(".")) & set(VISION_PARTS) for n in trainable):  # whole path segments: alarm.visual_head is no vision part
        problems.append("LoRA reached the vision tower or projector")
    return problems


# Registry tags every adapter version carries, and what picks the champion among them.
REQUIRED_TAGS = ("taxonomy_version", "checkpoint", "method")
# "champion-<taxonomy version>" names, among that version's registered adapters, the one whose
# check passed and whose validation safety rate is highest, provided its validation helpful rate is at most
# this far below the base model's on the same queries (safety bought by refusing everything is no
# win); ties go to the higher helpful rate, then to the newer version. Unknown rates never qualify.
CHAMPION_HELPFUL_DROP = 0.05
ADAPTER_FLAVOR = "safevid_lora_adapter"


def alias_part(text: str) -> str:
    """Registry aliases allow only alphanumerics, `_` and `-`."""
    return re.sub(r"[^\w\-]+", "_", str(text)).strip("_") or "_"


def aliases_of(taxonomy_version: str) -> tuple[str, str]:
    """(champion alias, latest alias) of one taxonomy version: aliases are per registered model, so
    the version is in the name."""
    part = alias_part(taxonomy_version)
    return f"champion-{part}", f"latest-{part}"


def registry_tags(taxonomy_version: str, checkpoint: str, method: str, passed: bool, aligned: dict, base: dict) -> dict[str, str]:
    """A version's tags: what it is, whether its check passed, and the validation rates the champion rule reads."""
    return {
        "taxonomy_version": str(taxonomy_version),
        "checkpoint": checkpoint,
        "method": method,
        "check_passed": str(bool(passed)).lower(),
        "validation_safety_rate": repr(float(aligned["safety_rate"])),
        "validation_helpful_rate": repr(float(aligned["helpful_rate"])),
        "validation_helpful_rate_base": repr(float(base["helpful_rate"])),
    }


def _rate(tags: dict, key: str) -> float:
    try:
        return float(tags[key])
    except (KeyError, TypeError, ValueError):
        return math.nan


def champion_eligible(tags: dict) -> bool:
    safety, helpful, base = (_rate(tags, k) for k in ("validation_safety_rate", "validation_helpful_rate", "validation_helpful_rate_base"))
    if tags.get("check_passed") != "true" or any(math.isnan(v) for v in (safety, helpful, base)):
        return False
    return helpful >= base - CHAMPION_HELPFUL_DROP - 1e-12  # 1e-12: a drop of exactly 5 points qualifies


def pick_champion(versions: list) -> object | None:
    """The champion among model versions (objects with .version and .tags) of one taxonomy version."""
    eligible = [v for v in versions if champion_eligible(v.tags)]
    key = lambda v: (_rate(v.tags, "validation_safety_rate"), _rate(v.tags, "validation_helpful_rate"), int(v.version))  # noqa: E731
    return max(eligible, key=key, default=None)


def update_aliases(client, registered_name: str, taxonomy_version: str) -> dict[str, str]:
    """Point `latest-<version>` at the newest registered adapter of the taxonomy version and
    `champion-<version>` at its champion (left as it is when none qualifies); returns alias → version."""
    versions = [
        v for v in client.search_model_versions(f"name = '{registered_name}'")
        if v.tags.get("taxonomy_version") == str(taxonomy_version)
    ]
    if not versions:
        return {}
    champion_alias, latest_alias = aliases_of(taxonomy_version)
    set_to = {latest_alias: max(versions, key=lambda v: int(v.version)).version}
    best = pick_champion(versions)
    if best is not None:
        set_to[champion_alias] = best.version
    for alias, version in set_to.items():
        client.set_registered_model_alias(registered_name, alias, str(version))
    return {alias: str(version) for alias, version in set_to.items()}


def adapter_signature(frames_per_clip: int, frame_size: int):
    """What the adapted video LLM takes and gives: a clip's sampled RGB frames and a question, an answer."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([
            TensorSpec(np.dtype(np.uint8), (-1, frames_per_clip, frame_size, frame_size, 3), "frames"),
            TensorSpec(np.dtype(str), (-1,), "query"),
        ]),
        outputs=Schema([ColSpec("string", "answer")]),
    )


def write_adapter_mlmodel(folder, run_id: str, signature, base_model: str, method: str) -> Path:
    """An MLmodel file for a bare LoRA adapter folder: the registry UI shows a version's signature
    from the MLmodel at the version's source, and mlflow.models.get_model_info reads it too. Written
    into the run's artifact, not into the data folder, whose DVC hash it would change on every run."""
    from mlflow.models import Model

    model = Model(artifact_path="adapter", run_id=run_id, signature=signature)
    # Not a flavor MLflow can load: the adapter loads with resources.models.load_video_llm(base, adapter=...).
    model.add_flavor(ADAPTER_FLAVOR, peft_type="LORA", base_model=base_model, method=method, target_modules=LORA_TARGETS)
    path = Path(folder) / "MLmodel"
    model.save(str(path))
    return path


def log_adapter(adapter_dir, signature, base_model: str, method: str) -> None:
    """The adapter folder as the active run's `adapter` artifact, with its MLmodel beside the weights."""
    import tempfile

    import mlflow

    mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
    with tempfile.TemporaryDirectory(prefix="mlmodel_") as tmp:
        path = write_adapter_mlmodel(tmp, mlflow.active_run().info.run_id, signature, base_model, method)
        mlflow.log_artifact(str(path), artifact_path="adapter")


def register_adapter(
    client,
    run_id: str,
    artifact_uri: str,
    registered_name: str,
    tags: dict[str, str],
    description: str = "SafeVid LoRA adapters of the target video LLM",
) -> str:
    """A registered model version for the run's `adapter` artifact (log_adapter), with its tags
    (REQUIRED_TAGS at least; registry_tags makes them) and its taxonomy version's aliases updated;
    returns "name/version".

    register_model refuses a bare LoRA folder, so the version is created from its artifact source;
    only a registered model that does not exist yet is created.
    """
    from mlflow.exceptions import MlflowException

    missing = [k for k in REQUIRED_TAGS if not tags.get(k)]
    if missing:
        raise ValueError(f"register_adapter: tags {missing} missing; every adapter version carries {list(REQUIRED_TAGS)}")
    try:
        client.get_registered_model(registered_name)
    except MlflowException:  # not registered yet
        client.create_registered_model(registered_name, description=description)
    mv = client.create_model_version(name=registered_name, source=f"{artifact_uri}/adapter", run_id=run_id, tags=tags)
    update_aliases(client, registered_name, tags["taxonomy_version"])
    return f"{registered_name}/{mv.version}"


# Where each video LLM family takes its frames in forward().
VIDEO_TENSORS = ("pixel_values_videos",)


def video_token_id(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("video_token_id", "video_token_index"):  # Qwen-VL, LLaVA-NeXT-Video
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def require_video_inputs(model) -> tuple[object, dict[str, int]]:
    """A forward pre-hook that fails any forward pass whose input_ids hold video tokens but which
    gets no video tensor: HF video LLMs then read `<video>` as plain text and train without the
    video, silently. Counts the forwards it saw; returns (hook handle, counts)."""
    token = video_token_id(model)
    seen = {"forwards": 0, "with_video": 0}

    def check(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen["forwards"] += 1
        if token is None or ids is None or not bool((ids == token).any()):
            return
        # generate's prefill hands the vision features computed once (mm_encoder_outputs) instead of the pixels
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("video") is not None
        if not encoded and all(kwargs.get(k) is None for k in VIDEO_TENSORS):
            raise ValueError(
                f"{type(module).__name__}.forward got video tokens but none of {VIDEO_TENSORS}: the batch lost its "
                "video (check the collator), and the model would train on `<video>` as text"
            )
        seen["with_video"] += 1

    return model.register_forward_pre_hook(check, with_kwargs=True), seen


def train_with_video(model, make_trainer):
    """make_trainer() built and trained with every forward of `model` (a PEFT model's base) required
    to get the video when its input holds video tokens; the trainer comes back with
    `video_forwards` (the forwards seen, and those that had the video), the model in eval mode."""
    from transformers.trainer_callback import PrinterCallback

    hook, seen = require_video_inputs(model.get_base_model() if hasattr(model, "get_base_model") else model)
    try:
        trainer = make_trainer()
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    finally:
        hook.remove()
    trainer.video_forwards = dict(seen)
    model.eval()
    return trainer


def trainer_args(s, on_gpu: bool, config_cls) -> dict:
    """TRL config options from a method's TrainerSettings fields (ground/settings.py); a field left
    None keeps the method's own default, and an option the config class lacks is left out."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    out = {
        "gradient_accumulation_steps": s.gradient_accumulation_steps,
        "bf16": on_gpu if s.bf16 is None else s.bf16,
        # transformers 5's name; its `gradient_checkpointing` is an alias the new name overrides
        "activation_checkpointing": on_gpu if s.gradient_checkpointing is None else s.gradient_checkpointing,
        "lr_scheduler_type": s.lr_scheduler_type,
        "warmup_steps": s.warmup_ratio,  # transformers 5: a value below 1 is a share of the steps
        "max_length": s.max_length,
    }
    keep_none = {"max_length"}  # None is a real value there: never cut
    return {k: v for k, v in out.items() if k in known and (v is not None or k in keep_none)}


def lora_fingerprint(model) -> dict:
    """The fingerprint of the LoRA weights being trained (the "default" adapter)."""
    return {k: v for k, v in param_fingerprint(model, skip=()).items() if any(w in k for w in ADAPTER_WEIGHTS) and ".default." in k}


def save_adapter(peft_model, folder: Path) -> None:
    """The trained adapter (only "default": GRPO's frozen "ref" copy stays behind) and its alarm state."""
    import shutil

    from resources import alarm

    shutil.rmtree(folder, ignore_errors=True)
    peft_model.save_pretrained(str(folder), selected_adapters=["default"])
    alarm.save_alarm(peft_model, folder)
