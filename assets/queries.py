"""adversarial_queries: candidate queries per (clip, subcategory), an adversarial filter pass,
near-duplicate removal by embedding similarity, and the splits.

Every row is one of four kinds (VideoSafetyBench / VideoSafetyEval): HH harmful video + harmful
query, SH safe video + harmful query, HB harmful video + a query that reads harmless but whose
helpful answer would cause harm given what is shown (a contextual subcategory), SB safe video +
benign query; `visual_label` and `textual_label` say which, and `harmful` whether the item must be
refused. Splits: train, validation and heldout (the benchmark) are disjoint by clip, and validation
and heldout use the other half of every subcategory's intents (and the writer's other templates),
so neither shares a (template, intent) with training; `queries.ood_subcategories` are written for
heldout clips only (slice "ood"). Benign subcategories are asked about safe clips only.
"""
import dagster as dg
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import KINDS, markdown_table, query_failure_problems, table_metadata, write_query_set
from ground.catalog import StageData, StageSpec
from ground.taxonomy import subcategories_from_frame
from resources import quality

SPEC = StageSpec(
    folder="queries",
    files=("queries.parquet", "dropped.parquet"),
    params=("queries", "roles.query_writer", "roles.adversarial_filter"),
)
SPLITS = {"train", "validation", "heldout"}


def coverage_problems(queries: pd.DataFrame, sub_names, min_clips: int = 1, validation: bool = True) -> list[str]:
    """What the splits lack; `validation` false: the settings ask for no validation split."""
    uncovered = sorted(set(sub_names) - set(queries["subcategory"]))
    problems = [f"subcategories without queries: {uncovered}"] if uncovered else []
    problems += [f"the {split} split is empty" for split in ("train", "heldout") if not (queries["split"] == split).any()]
    clips = queries.groupby("split")["clip_id"].nunique()
    wanted = sorted(SPLITS if validation else SPLITS - {"validation"})
    small = {split: int(clips.get(split, 0)) for split in wanted if clips.get(split, 0) < min_clips}
    if small:
        problems.append(
            f"clips per split {small}, fewer than queries.min_clips_per_split ({min_clips}): add clips to the manifest or raise "
            "curation.representatives_per_category (the clips that get queries), or lower the setting on purpose"
        )
    return problems + leak_problems(queries)


def leak_problems(queries: pd.DataFrame) -> list[str]:
    """The benchmark and validation must share no clip and no query text with training; the same
    text about two clips is the point (only the video differs), within a split."""
    problems = []
    train = queries[queries["split"] == "train"]
    for split in ("validation", "heldout"):
        part = queries[queries["split"] == split]
        clips = sorted(set(part["clip_id"]) & set(train["clip_id"]))
        texts = sorted(set(part["query"].str.lower()) & set(train["query"].str.lower()))
        if clips:
            problems.append(f"{len(clips)} {split} clips are also train clips, e.g. {clips[:3]}")
        if texts:
            problems.append(f"{len(texts)} {split} query texts also occur in training (template and intent shared), e.g. {texts[:2]}")
    return problems


def queries_check(queries: pd.DataFrame, sub_names, failures: list[str] = (), min_clips: int = 1,
                  validation: bool = True) -> dg.AssetCheckResult:
    return quality.check_result(
        queries,
        quality.not_null("query_id", "clip_id", "subcategory", "query", "frames_path")
        + [
            quality.unique("query_id"),
            quality.in_set("subcategory", sub_names),
            quality.in_set("split", SPLITS),
            quality.in_set("harmful", {True, False}),
            quality.in_set("kind", set(KINDS)),
            quality.in_set("visual_label", {0, 1}),
            quality.in_set("textual_label", {0, 1}),
        ],
        "adversarial_queries",
        "queries_cover_taxonomy",
        coverage_problems(queries, sub_names, min_clips, validation) + list(failures),
    )


def query_counts(candidates: pd.DataFrame, queries: pd.DataFrame) -> dict[str, int]:
    return {
        "candidates": len(candidates),
        "dropped_weak": int((candidates["drop_reason"] == "weak").sum()),
        "dropped_near_duplicate": int((candidates["drop_reason"] == "near duplicate").sum()),
        "dropped_writer_failed": int((candidates["drop_reason"] == "writer failed").sum()),
        "dropped_filter_failed": int((candidates["drop_reason"] == "filter failed").sum()),
        "kept": len(queries),
        **{split: int((queries["split"] == split).sum()) for split in ("train", "validation", "heldout")},
        "benign": int((~queries["harmful"].astype(bool)).sum()),
        "heldout_clips": int(queries.loc[queries["split"] == "heldout", "clip_id"].nunique()),
        **{f"heldout_{k}": int(((queries["split"] == "heldout") & (queries["kind"] == k)).sum()) for k in sorted(KINDS)},
    }


@stage_asset(
    SPEC,
    group="safety_data",
    partitioned=True,
    checks={
        "queries_cover_taxonomy": "Every subcategory has queries, train and heldout are non-empty, no validation or heldout "
        "clip or query text occurs in training, query ids are unique and non-null, each split has at least "
        "queries.min_clips_per_split clips, and no more of the writer's or the "
        "filter's items failed than roles.<role>.max_failure_rate allows."
    },
)
def adversarial_queries(
    st: Stage, curated_videos: StageData, video_descriptions: StageData, safety_taxonomy: StageData
) -> dg.MaterializeResult:
    """Harmful and benign questions about the clips, per taxonomy subcategory, split into train and held-out."""
    cfg = st.settings
    subs = subcategories_from_frame(safety_taxonomy.table("subcategories.parquet"))
    unknown = sorted(set(cfg.queries.ood_subcategories) - {s.subcategory for s in subs})
    if unknown:
        raise ValueError(f"queries.ood_subcategories names {unknown}, not subcategories of taxonomy {st.version}")
    st.log.info(f"writing queries for the representative clips x {len(subs)} subcategories, then the filter and near-duplicate removal")
    candidates, queries = write_query_set(
        cfg, subs, curated_videos.table("curated.parquet"), video_descriptions.table("reconciled.parquet"),
        st.progress("embedding queries for near-duplicate removal"),
    )
    out = st.write_table(queries, "queries.parquet")
    st.write_table(candidates[candidates["drop_reason"] != ""], "dropped.parquet")
    counts = query_counts(candidates, queries)
    st.log.info(f"queries: {counts}")
    per_split = queries.groupby(["split", "kind"]).size().unstack(fill_value=0).reset_index()
    return st.finish(
        {
            **table_metadata(queries, out, ["clip_id", "subcategory", "split", "query"], "subcategory"),
            "counts": dg.MetadataValue.json(counts),
            "per_split": dg.MetadataValue.md(markdown_table(per_split)),
        },
        [queries_check(queries, {s.subcategory for s in subs}, query_failure_problems(candidates, cfg),
                       cfg.queries.min_clips_per_split, cfg.queries.validation_fraction > 0)],
        counts,
    )
