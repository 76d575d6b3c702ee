"""video_descriptions: several describers per clip, then one reconciled description.

The paper described each clip with LLaVA-NeXT-Video, Qwen2.5-VL and InternVL2.5 and had GPT-4
reconcile them; here the describers and the reconciler are the roles pipelines.yaml names.
A describer output that is not clean text (resources/describers.py, text_problem: undecodable bytes,
control characters, mostly non-printable, none at all) never reaches the reconciler: its word
overlap can't tell noise around a few right words from agreement. describers.parquet keeps it with
the reason, reconciled.parquet counts it per clip, the metadata per describer and reason.
"""
import json

import dagster as dg
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import markdown_table, table_metadata
from ground.catalog import StageData, StageSpec
from ground.roles import failure_problems
from ground.settings import Settings
from resources import quality
from resources.describers import build_describer, text_problem
from resources.k8s import gpu_op_tags
from resources.roles import build_role, failure_records, max_failure_rate
from resources.video import load_frames

# target_model: the tiny video LLM describer and `hf` describe with the target model's settings.
SPEC = StageSpec(
    folder="descriptions",
    files=("describers.parquet", "reconciled.parquet", "failed.parquet"),
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


def screen(per_describer: dict[str, list[str]]) -> dict[str, list[str | None]]:
    """Per describer and clip, why its output is not clean text (None: it is)."""
    return {name: [text_problem(t) for t in texts] for name, texts in per_describer.items()}


def reconciled_frame(
    curated: pd.DataFrame, per_describer: dict[str, list[str]], rejected: dict[str, list[str | None]], reconciler
) -> pd.DataFrame:
    """One description per clip from its describers' clean outputs; a clip with none gets no description."""
    names = list(per_describer)
    items = [{n: per_describer[n][i] for n in names if rejected[n][i] is None} for i in range(len(curated))]
    asked = [i for i, item in enumerate(items) if item]
    answers = dict(zip(asked, reconciler.reconcile([items[i] for i in asked]) if asked else []))
    failures = dict(zip(asked, failure_records(reconciler, len(asked))))
    results = [answers.get(i, ("", [], None)) for i in range(len(items))]
    refused = [{n: rejected[n][i] for n in names if rejected[n][i] is not None} for i in range(len(items))]
    labels, sources = visual_labels(curated, results)
    return pd.DataFrame(
        {
            "clip_id": curated["clip_id"].tolist(),
            "scene_category": curated["scene_category"].tolist(),
            "description": [r[0] for r in results],
            "agreed_describers": [json.dumps(r[1]) for r in results],
            "n_agreed": [len(r[1]) for r in results],
            "describers": json.dumps(names),
            "rejected_describers": [json.dumps(r) for r in refused],
            "n_rejected": [len(r) for r in refused],
            "visual_label": labels,
            "visual_label_source": sources,
            "failure": [failures.get(i) for i in range(len(items))],
        }
    )


def describe_all(clips: list[dict], settings: Settings, log) -> dict[str, list[str]]:
    """Each configured describer's description of every clip, in clip order."""
    per_describer: dict[str, list[str]] = {}
    for name in settings.describers:
        log.info(f"describing {len(clips)} clips with {name}")
        per_describer[name] = build_describer(name, settings).describe(clips)
    return per_describer


def storable(text) -> str:
    """A describer's output as Parquet can hold it: a lone surrogate (rejected anyway) would fail the write."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(text, str) else ""


def raw_frame(clips: list[dict], per_describer: dict[str, list[str]], rejected: dict[str, list[str | None]]) -> pd.DataFrame:
    """Every describer output as given, with why it was rejected ("" when it was used)."""
    return pd.DataFrame(
        [
            {"clip_id": c["clip_id"], "describer": name, "description": storable(texts[i]), "rejected": rejected[name][i] or ""}
            for name, texts in per_describer.items()
            for i, c in enumerate(clips)
        ],
        columns=["clip_id", "describer", "description", "rejected"],
    )


def rejection_metadata(raw: pd.DataFrame) -> dict:
    """How many describer outputs were not clean text, per describer and reason."""
    bad = raw[raw["rejected"] != ""]
    counts = bad.groupby(["describer", "rejected"]).size().reset_index(name="outputs")
    return {"describer_outputs_rejected": len(bad), "rejected_outputs": dg.MetadataValue.md(markdown_table(counts, limit=50))}


def descriptions_check(curated: pd.DataFrame, reconciled: pd.DataFrame, n_describers: int, failed: pd.DataFrame = None,
                       failure_limit: float = 0.0) -> dg.AssetCheckResult:
    """Every clip described, except those the reconciler failed for good (dropped, recorded in
    failed.parquet, and too many of them fail the check)."""
    failed = failed if failed is not None else reconciled.iloc[:0]
    empty = int((reconciled["description"].str.strip() == "").sum())
    unusable = int((reconciled["n_rejected"] == n_describers).sum())
    missing = sorted(set(curated["clip_id"]) - set(reconciled["clip_id"]) - set(failed["clip_id"]))
    too_many = failure_problems("reconciler", len(failed), len(curated), failure_limit)
    return quality.check_result(
        reconciled,
        quality.not_null("clip_id", "description", "agreed_describers")
        + [quality.unique("clip_id"), quality.between("n_agreed", 1, n_describers), quality.in_set("visual_label", {0, 1})],
        "video_descriptions",
        "every_clip_described",
        ([f"{empty} empty descriptions"] if empty else [])
        + ([f"{unusable} clips whose every describer output was rejected as not clean text"] if unusable else [])
        + ([f"clips without description: {missing[:5]}"] if missing else [])
        + too_many,
    )


@stage_asset(
    SPEC,
    op_tags=gpu_op_tags(),
    group="video_data",
    checks={
        "every_clip_described": "A curated clip has no reconciled description, or an empty one (also when every "
        "describer's output was rejected as not clean text), or one that no describer (or more describers than ran) agreed with."
    },
)
def video_descriptions(st: Stage, curated_videos: StageData) -> dg.MaterializeResult:
    """What each curated clip shows, in text (every describer's, reconciled into one): the queries are written from it."""
    curated = curated_videos.table("curated.parquet")
    clips = [{"clip_id": r.clip_id, "caption": r.caption, "frames": load_frames(r.frames_path)} for r in curated.itertuples()]
    per_describer = describe_all(clips, st.settings, st.log)
    rejected = screen(per_describer)
    raw = raw_frame(clips, per_describer, rejected)
    described = reconciled_frame(curated, per_describer, rejected, build_role("reconciler", st.settings))
    failed, reconciled = described[described["failure"].notna()], described[described["failure"].isna()].drop(columns="failure")
    st.write_table(raw, "describers.parquet")
    st.write_table(failed[["clip_id", "failure"]], "failed.parquet")
    out = st.write_table(reconciled, "reconciled.parquet")
    limit = max_failure_rate(st.settings, "reconciler")
    check = descriptions_check(curated, reconciled, len(st.settings.describers), failed, limit)
    rejections = rejection_metadata(raw)
    if rejections["describer_outputs_rejected"]:
        st.log.warning(f"{rejections['describer_outputs_rejected']} describer outputs rejected as not clean text (describers.parquet)")

    agreement = {name: float(reconciled["agreed_describers"].str.contains(f'"{name}"').mean()) for name in per_describer}
    examples = "\n\n".join(f"**{r.describer}** ({r.clip_id}): {r.description}" for r in raw.head(len(per_describer) * 2).itertuples())
    return st.finish(
        {
            **table_metadata(reconciled, out, ["clip_id", "scene_category", "description", "agreed_describers"], "scene_category"),
            "describer_agreement": dg.MetadataValue.json(agreement),
            "raw_descriptions": dg.MetadataValue.md(examples),
            **rejections,
            "reconciler_failed": dg.MetadataValue.md(markdown_table(failed[["clip_id", "failure"]]) if len(failed) else "_none_"),
        },
        [check],
        {
            "clips": len(reconciled),
            "reconciler_failures": len(failed),
            "rejected_outputs": rejections["describer_outputs_rejected"],
            **{f"agreement.{k}": v for k, v in agreement.items()},
        },
    )
