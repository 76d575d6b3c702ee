"""video_descriptions: several describers per clip, then one reconciled description.

The paper described each clip with LLaVA-NeXT-Video, Qwen2.5-VL and InternVL2.5 and had GPT-4
reconcile them; here the describers and the reconciler are the roles pipelines.yaml names.
"""
import json

import dagster as dg
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import table_metadata
from ground.catalog import StageData, StageSpec
from ground.settings import Settings
from resources import quality
from resources.describers import build_describer
from resources.roles import build_role
from resources.video import load_frames

# target_model: the tiny video LLM describer and `hf` describe with the target model's settings.
SPEC = StageSpec(
    folder="descriptions",
    files=("describers.parquet", "reconciled.parquet"),
    params=("describers", "describer_options", "roles.reconciler", "target_model"),
)


def visual_labels(curated: pd.DataFrame, reconciled: list) -> tuple[list[int], list[str]]:
    """Each clip's visual label (0 safe, 1 harmful) and where it came from: the manifest's own label
    where the user gave one, else the reconciler's; a clip neither labels counts as safe, and says so."""
    labels, sources = [], []
    given = curated["visual_label"] if "visual_label" in curated else pd.Series([pd.NA] * len(curated))
    for manifest_label, (_, _, reconciler_label) in zip(given, reconciled):
        if not pd.isna(manifest_label):
            labels.append(int(manifest_label)), sources.append("manifest")
        elif reconciler_label is not None:
            labels.append(int(reconciler_label)), sources.append("reconciler")
        else:
            labels.append(0), sources.append("none given: safe")
    return labels, sources


def reconciled_frame(curated: pd.DataFrame, per_describer: dict[str, list[str]], reconciler) -> pd.DataFrame:
    names = list(per_describer)
    items = [{n: per_describer[n][i] for n in names} for i in range(len(curated))]
    results = reconciler.reconcile(items)
    labels, sources = visual_labels(curated, results)
    return pd.DataFrame(
        {
            "clip_id": curated["clip_id"].tolist(),
            "scene_category": curated["scene_category"].tolist(),
            "description": [r[0] for r in results],
            "agreed_describers": [json.dumps(r[1]) for r in results],
            "n_agreed": [len(r[1]) for r in results],
            "describers": json.dumps(names),
            "visual_label": labels,
            "visual_label_source": sources,
        }
    )


def describe_all(clips: list[dict], settings: Settings, log) -> dict[str, list[str]]:
    """Each configured describer's description of every clip, in clip order."""
    per_describer: dict[str, list[str]] = {}
    for name in settings.describers:
        log.info(f"describing {len(clips)} clips with {name}")
        per_describer[name] = build_describer(name, settings).describe(clips)
    return per_describer


def raw_frame(clips: list[dict], per_describer: dict[str, list[str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"clip_id": c["clip_id"], "describer": name, "description": texts[i]}
            for name, texts in per_describer.items()
            for i, c in enumerate(clips)
        ]
    )


def descriptions_check(curated: pd.DataFrame, reconciled: pd.DataFrame, n_describers: int) -> dg.AssetCheckResult:
    empty = int((reconciled["description"].str.strip() == "").sum())
    missing = sorted(set(curated["clip_id"]) - set(reconciled["clip_id"]))
    return quality.check_result(
        reconciled,
        quality.not_null("clip_id", "description", "agreed_describers")
        + [quality.unique("clip_id"), quality.between("n_agreed", 1, n_describers), quality.in_set("visual_label", {0, 1})],
        "video_descriptions",
        "every_clip_described",
        ([f"{empty} empty descriptions"] if empty else []) + ([f"clips without description: {missing[:5]}"] if missing else []),
    )


@stage_asset(
    SPEC,
    group="video_data",
    checks={
        "every_clip_described": "A curated clip has no reconciled description, or an empty one, or one that no "
        "describer (or more describers than ran) agreed with."
    },
)
def video_descriptions(st: Stage, curated_videos: StageData) -> dg.MaterializeResult:
    """What each curated clip shows, in text (every describer's, reconciled into one): the queries are written from it."""
    curated = curated_videos.table("curated.parquet")
    clips = [{"clip_id": r.clip_id, "caption": r.caption, "frames": load_frames(r.frames_path)} for r in curated.itertuples()]
    per_describer = describe_all(clips, st.settings, st.log)
    raw = raw_frame(clips, per_describer)
    reconciled = reconciled_frame(curated, per_describer, build_role("reconciler", st.settings))
    st.write_table(raw, "describers.parquet")
    out = st.write_table(reconciled, "reconciled.parquet")
    check = descriptions_check(curated, reconciled, len(st.settings.describers))

    agreement = {name: float(reconciled["agreed_describers"].str.contains(f'"{name}"').mean()) for name in per_describer}
    examples = "\n\n".join(f"**{r.describer}** ({r.clip_id}): {r.description}" for r in raw.head(len(per_describer) * 2).itertuples())
    return st.finish(
        {
            **table_metadata(reconciled, out, ["clip_id", "scene_category", "description", "agreed_describers"], "scene_category"),
            "describer_agreement": dg.MetadataValue.json(agreement),
            "raw_descriptions": dg.MetadataValue.md(examples),
        },
        [check],
        {"clips": len(reconciled), **{f"agreement.{k}": v for k, v in agreement.items()}},
    )
