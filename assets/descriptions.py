"""video_descriptions: several describers per clip, then one reconciled description.

The paper described each clip with LLaVA-NeXT-Video, Qwen2.5-VL and InternVL2.5 and had GPT-4
reconcile them; here the describers and the reconciler are the roles pipelines.yaml names.
"""
import json

import dagster as dg
import pandas as pd

from assets.common import read_table, record_lineage, table_metadata, write_table
from dagster_project.settings import PipelineSettings
from resources import quality
from resources.describers import build_describer
from resources.roles import build_role
from resources.dvc import DvcTracker
from resources.tracking import MlflowTracker
from resources.video import load_frames


def reconciled_frame(curated: pd.DataFrame, per_describer: dict[str, list[str]], reconciler) -> pd.DataFrame:
    names = list(per_describer)
    items = [{n: per_describer[n][i] for n in names} for i in range(len(curated))]
    results = reconciler.reconcile(items)
    return pd.DataFrame(
        {
            "clip_id": curated["clip_id"].tolist(),
            "scene_category": curated["scene_category"].tolist(),
            "description": [text for text, _ in results],
            "agreed_describers": [json.dumps(agreed) for _, agreed in results],
            "n_agreed": [len(agreed) for _, agreed in results],
            "describers": json.dumps(names),
        }
    )


@dg.asset(
    deps=["curated_videos"],
    group_name="data",
    code_version="1",
    check_specs=[dg.AssetCheckSpec("every_clip_described", asset="video_descriptions", blocking=True)],
)
def video_descriptions(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow: MlflowTracker, dvc: DvcTracker):
    """One description per describer per curated clip, and one reconciled description per clip."""
    cfg = settings.load()
    curated = read_table(cfg.path("curated", "curated.parquet"), "curated_videos")
    clips = [
        {"clip_id": r.clip_id, "caption": r.caption, "frames": load_frames(r.frames_path)}
        for r in curated.itertuples()
    ]
    per_describer: dict[str, list[str]] = {}
    for name in cfg.describers:
        context.log.info(f"describing {len(clips)} clips with {name}")
        per_describer[name] = build_describer(name, cfg).describe(clips)
    raw = pd.DataFrame(
        [
            {"clip_id": c["clip_id"], "describer": name, "description": texts[i]}
            for name, texts in per_describer.items()
            for i, c in enumerate(clips)
        ]
    )
    reconciled = reconciled_frame(curated, per_describer, build_role("reconciler", cfg))
    write_table(raw, cfg.path("descriptions", "describers.parquet"))
    out = write_table(reconciled, cfg.path("descriptions", "reconciled.parquet"))

    empty = int((reconciled["description"].str.strip() == "").sum())
    missing = sorted(set(curated["clip_id"]) - set(reconciled["clip_id"]))
    check = quality.check_result(
        reconciled,
        quality.not_null("clip_id", "description", "agreed_describers")
        + [quality.unique("clip_id"), quality.between("n_agreed", 1, len(cfg.describers))],
        "video_descriptions",
        "every_clip_described",
        ([f"{empty} empty descriptions"] if empty else []) + ([f"clips without description: {missing[:5]}"] if missing else []),
    )
    agreement = {name: float(reconciled["agreed_describers"].str.contains(f'"{name}"').mean()) for name in per_describer}
    with mlflow.run(
        context,
        cfg.profile,
        {"describers": ",".join(cfg.describers), "reconciler": cfg.reconciler},
        inputs={"curated_videos": cfg.path("curated", "curated.parquet")},
    ) as run:
        import mlflow as mlf

        mlf.log_metrics({"clips": len(reconciled), **{f"agreement.{k}": v for k, v in agreement.items()}})
        mlf.set_tag("check.every_clip_described", str(check.passed))
    return dg.MaterializeResult(
        metadata={
            **table_metadata(reconciled, out, ["clip_id", "scene_category", "description", "agreed_describers"], "scene_category"),
            "describer_agreement": dg.MetadataValue.json(agreement),
            "raw_descriptions": dg.MetadataValue.md(
                "\n\n".join(f"**{r.describer}** ({r.clip_id}): {r.description}" for r in raw.head(len(per_describer) * 2).itertuples())
            ),
            "mlflow_run_id": run.info.run_id, **record_lineage(context, dvc, mlflow, run, "video_descriptions"),
        },
        check_results=[check],
    )
