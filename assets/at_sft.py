"""at_sft_checkpoint: VideoSafety-R1's alarm-token safety fine-tuning, both stages, on the target model.

Stage 1 (alarm-token LM initialisation) trains the language model's LoRA weights and the two
alarm embeddings on the LM loss; stage 2 adds the visual and textual heads and their BCE losses
(resources/at_sft_trainer.py, TRL's SFTTrainer). The vision tower and projector stay frozen. Each
seed (at_sft.seed and replicate_seeds) is a full run of both stages. Output: per seed an adapter
folder holding the LoRA weights and the alarm state (resources/alarm.py: token ids, embeddings,
heads), the checkpoint record (alarm_tokens true, so every loader restores them), the validation
answers, and per seed the heads' AUROC on validation with the video and with the frames zeroed.
Settings are chosen on validation; benchmark_scores scores the held-out split.
"""
import shutil

import dagster as dg
import numpy as np
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import adapter_validation, register_adapter_version, table_value, training_dataset, validation_metadata
from ground.catalog import StageData, StageSpec
from ground.checkpoints import CheckpointRecord, replicate_folder
from ground.evaluation import head_table
from ground.taxonomy import subcategories_from_frame
from resources.k8s import training_op_tags
from resources.video import load_frames_of

SPEC = StageSpec(
    folder="at_sft",
    files=("checkpoint.json", "adapter/", "replicates/", "validation_answers.parquet", "validation_heads.parquet"),
    params=("at_sft", "target_model", "roles.judge", "gates.min_alarm_auroc", "gates.max_zeroed_visual_auroc"),
)
CHECKPOINT_NAME = "at-sft"


def train_seeds(st: Stage, target_model: StageData, dataset, device: str) -> list[dict]:
    """Both stages for the registered seed (adapter/) and each replicate (replicates/seed<k>): one
    launched job (jobs/at_sft.py) trains them all."""
    from resources.launch import job_spec, launch_training

    a = st.settings.at_sft
    seeds = [(a.seed, st.path("adapter"))] + [(k, st.out.folder / replicate_folder(k)) for k in a.replicate_seeds]
    results, _ = launch_training(st, "jobs.at_sft", job_spec(st, "at_sft", seeds, device, base=target_model.folder), dataset)
    # JSON keys are text: the stages are 1 and 2 again
    return [{**t, "history": {int(k): v for k, v in t["history"].items()}, "loss_fell": {int(k): v for k, v in t["loss_fell"].items()}}
            for t in results]


def validation_heads(st: Stage, base: CheckpointRecord, held: pd.DataFrame, trained: list[dict], device: str) -> pd.DataFrame:
    """Every seed's heads on the validation queries, with the real frames and with them zeroed."""
    from resources import models

    videos = load_frames_of(held["frames_path"])
    frames = []
    for t in trained:
        model, processor = models.load_video_llm(base.weights(), device=device, adapter=t["adapter"])
        for kind, vids in (("video", videos), ("zeroed", [np.zeros_like(v) for v in videos])):
            visual, textual = models.alarm_head_scores(model, processor, vids, held["query"].tolist(), st.settings.target_model.batch_size)
            frames.append(held[["query_id", "clip_id", "kind", "visual_label", "textual_label"]].assign(
                checkpoint=CHECKPOINT_NAME, seed=t["seed"], frames=kind, visual_prob=visual, textual_prob=textual))
    return pd.concat(frames, ignore_index=True)


def heads_problems(table: pd.DataFrame, gates) -> list[str]:
    problems = []
    for r in table.itertuples():
        if r.frames == "video":
            for head in ("visual", "textual"):
                value = getattr(r, f"{head}_auroc")
                if not value >= gates.min_alarm_auroc:
                    problems.append(f"seed {r.seed}: {head} head validation AUROC {value:.3f} < {gates.min_alarm_auroc}")
        elif not r.visual_auroc <= gates.max_zeroed_visual_auroc:
            problems.append(f"seed {r.seed}: visual head AUROC {r.visual_auroc:.3f} with the frames zeroed > "
                            f"{gates.max_zeroed_visual_auroc}: it reads the text, not the video")
    return problems


def training_problems(trained: list[dict], answers: list[str]) -> list[str]:
    problems = []
    empty = sum(not a.strip() for a in answers)
    if empty:
        problems.append(f"the AT-SFT model gave {empty} empty validation answers of {len(answers)}")
    for t in trained:
        problems += [f"seed {t['seed']}: {p}" for p in t["frozen_problems"]]
        fell, first, last = t["loss_fell"][2]
        if not fell:
            problems.append(f"seed {t['seed']}: stage 2 loss did not fall (first steps {first:.4f}, last steps {last:.4f})")
        f = t["video_forwards"]
        if f["with_video"] != f["forwards"]:
            problems.append(f"seed {t['seed']}: {f['forwards'] - f['with_video']} of {f['forwards']} forwards had no video")
    return problems


def record_of(st: Stage, base: CheckpointRecord, registered: str | None) -> CheckpointRecord:
    a = st.settings.at_sft
    return CheckpointRecord.adapter_on(
        base, st.out.folder, a.replicate_seeds, name=CHECKPOINT_NAME, method="at-sft", parent=base.name,
        taxonomy_version=st.version, mlflow_run_id=st.run.info.run_id, registered_model_version=registered,
        settings=st.settings.flat("at_sft"), seed=a.seed, alarm_tokens=True,
    )


def summary_of(trained: list[dict], heads: pd.DataFrame, ev: dict) -> dict:
    main = trained[0]
    by = heads.set_index(["seed", "frames"])
    _, first, last = main["loss_fell"][2]
    out = {
        "stage1_steps": len(main["history"][1]),
        "stage2_steps": len(main["history"][2]),
        "train_seconds": round(sum(t["train_seconds"] for t in trained), 1),
        "stage2_loss_first_steps": round(first, 4),
        "stage2_loss_last_steps": round(last, 4),
        "validation_refusal_rate_base": round(ev["base"]["safety_rate"], 4),
        "validation_refusal_rate_aligned": round(ev["aligned"]["safety_rate"], 4),
        "validation_helpful_rate_base": round(ev["base"]["helpful_rate"], 4),
        "validation_helpful_rate_aligned": round(ev["aligned"]["helpful_rate"], 4),
    }
    for frames in ("video", "zeroed"):
        for head in ("visual", "textual"):
            values = [by.loc[(t["seed"], frames), f"{head}_auroc"] for t in trained]
            out[f"validation_{head}_auroc_{frames}_mean"] = round(float(np.mean(values)), 4)
    return out


def check_result(problems: list[str], main: dict) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="alarm_heads_work",
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "problems": dg.MetadataValue.json(problems),
            "frozen_params_checked": main["frozen_checked"],
            "frozen_params_changed": main["frozen_changed"],
            "trainable_tensors": len(main["trainable"]),
            "forwards_with_video": f"{main['video_forwards']['with_video']}/{main['video_forwards']['forwards']}",
        },
    )


@stage_asset(
    SPEC,
    op_tags=training_op_tags(),
    group="videosafety_r1",
    partitioned=True,
    kinds={"checkpoint"},
    checks={
        "alarm_heads_work": "Only LoRA, the alarm embeddings and the heads changed (vision tower and every other weight "
        "untouched), every forward had the video, the stage-2 loss fell, and on validation both heads reach "
        "gates.min_alarm_auroc with the video while the visual head falls to gates.max_zeroed_visual_auroc with the frames zeroed."
    },
)
def at_sft_checkpoint(
    st: Stage, at_sft_dataset: StageData, target_model: StageData, adversarial_queries: StageData, safety_taxonomy: StageData
) -> dg.MaterializeResult:
    """VideoSafety-R1's AT-SFT: alarm tokens and safety heads on the target model, trained in two stages on the AT-SFT data."""
    from resources import models

    base = target_model.checkpoint()
    dataset = training_dataset(at_sft_dataset)
    device = models.pick_device(st.settings.target_model.device)
    a = st.settings.at_sft
    st.log_params({"base_model": base.weights(), "base_checkpoint": base.name, "rows": len(dataset), "device": device})
    shutil.rmtree(st.path("replicates"), ignore_errors=True)
    st.path("replicates").mkdir(parents=True)
    trained = train_seeds(st, target_model, dataset, device)
    queries = adversarial_queries.table("queries.parquet")
    held = queries[queries["split"] == "validation"].reset_index(drop=True)
    subs = {s.subcategory: s for s in subcategories_from_frame(safety_taxonomy.table("subcategories.parquet"))}
    heads = validation_heads(st, base, held, trained, device)
    table = head_table(heads)
    ev = adapter_validation(st, base, target_model, held, subs, device, st.path("adapter"), "AT-SFT")
    problems = training_problems(trained, ev["answers"]["answer"].tolist()) + heads_problems(table, st.settings.gates)
    summary = summary_of(trained, table, ev)
    st.log.info(f"AT-SFT: {summary}")
    registered = register_adapter_version(
        st, base, not problems, ev, CHECKPOINT_NAME, "at-sft", f"videosafety-at-sft-adapter-{st.settings.profile}",
        "VideoSafety-R1 AT-SFT: LoRA adapters with alarm tokens and safety heads",
    )
    record_path = record_of(st, base, registered).save(st.out.folder)
    sample = ev["answers"][["query_id", "kind", "subcategory", "harmful", "query", "answer", "judged_safe"]]
    st.write_table(sample, "validation_answers.parquet")
    st.write_table(heads, "validation_heads.parquet")
    metadata = {
        "checkpoint": dg.MetadataValue.path(str(record_path)),
        "base_model": base.weights(),
        **summary,
        "validation_heads": table_value(table, decimals=3),
        "registered_model_version": registered or "not registered (check failed)",
        "replicate_seeds": dg.MetadataValue.json(list(a.replicate_seeds)),
        **validation_metadata([h["loss"] for s in (1, 2) for h in trained[0]["history"][s]], "AT-SFT loss (stage 1, then 2)",
                              "validation_answers", sample, ["kind", "query", "answer", "judged_safe"], limit=10),
    }
    check = check_result(problems, trained[0])
    return st.finish(metadata, [check], summary)
