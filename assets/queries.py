"""adversarial_queries: candidate queries per (clip, subcategory), an adversarial filter pass,
near-duplicate removal by embedding similarity, and a held-out split (SafeVidBench-Base style).

The held-out split is by clip, so the benchmark asks about videos the model never trained on.
"""
import functools
import hashlib

import dagster as dg
import numpy as np
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import markdown_table, table_metadata
from ground.catalog import StageData, StageSpec
from ground.roles import QueryRequest
from ground.taxonomy import subcategories_from_frame
from resources import quality
from resources.roles import build_role

SPEC = StageSpec(
    folder="queries",
    files=("queries.parquet", "dropped.parquet"),
    params=("queries", "roles.query_writer", "roles.adversarial_filter"),
)
SPLITS = {"train", "heldout"}


def heldout_clips(clip_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A stable share of clips (at least one) whose queries form the benchmark split."""
    ranked = sorted(clip_ids, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    return set(ranked[: max(1, round(fraction * len(ranked)))])


def near_duplicate_mask(embeddings: np.ndarray, groups: list[str], threshold: float) -> np.ndarray:
    """Keep the first of every set of queries (within one group) at cosine similarity >= threshold."""
    keep = np.ones(len(groups), dtype=bool)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for idx in by_group.values():
        kept: list[int] = []
        for i in idx:
            if kept and float((embeddings[kept] @ embeddings[i]).max()) >= threshold:
                keep[i] = False
            else:
                kept.append(i)
    return keep


def representative_clips(curated: pd.DataFrame, described: pd.DataFrame) -> pd.DataFrame:
    """The representative clips that have a reconciled description: the ones queries are written about."""
    return curated[curated["is_representative"]].merge(described[["clip_id", "description"]], on="clip_id", how="inner")


def candidate_frame(clips: pd.DataFrame, subs, writer, per_subcategory: int) -> pd.DataFrame:
    requests = [
        QueryRequest(r.clip_id, r.description, r.scene_category, s, per_subcategory)
        for r in clips.itertuples()
        for s in subs
    ]
    rows = []
    for req, queries in zip(requests, writer.write(requests)):
        for q in queries:
            rows.append(
                {
                    "clip_id": req.clip_id,
                    "scene_category": req.scene_category,
                    "principle": req.sub.principle,
                    "category": req.sub.category,
                    "subcategory": req.sub.subcategory,
                    "harmful": req.sub.harmful,
                    "query": q.strip(),
                    "description": req.description,
                }
            )
    return pd.DataFrame(rows)


def mark_drops(candidates: pd.DataFrame, subs, adversarial_filter, threshold: float, embed) -> pd.DataFrame:
    """Each candidate's drop_reason ("" when kept): empty, not adversarial, or near duplicate."""
    sub_by_name = {s.subcategory: s for s in subs}
    candidates = candidates.copy()
    adversarial = adversarial_filter.keep([(q, sub_by_name[s]) for q, s in zip(candidates["query"], candidates["subcategory"])])
    candidates["kept_by_filter"] = adversarial
    candidates["drop_reason"] = np.where(adversarial, "", "not adversarial")
    candidates.loc[candidates["query"] == "", "drop_reason"] = "empty"
    live = candidates[candidates["drop_reason"] == ""].index
    # Only queries that survived the filter are embedded: the others can't shadow a kept one.
    mask = near_duplicate_mask(embed(candidates.loc[live, "query"].tolist()), candidates.loc[live, "subcategory"].tolist(), threshold)
    candidates.loc[live[~mask], "drop_reason"] = "near duplicate"
    return candidates


def query_table(candidates: pd.DataFrame, curated: pd.DataFrame, held: set[str], version: str) -> pd.DataFrame:
    """The kept candidates with their video and frames, a stable query_id and their split."""
    queries = candidates[candidates["drop_reason"] == ""].drop(columns=["kept_by_filter", "drop_reason"])
    queries = queries.merge(curated[["clip_id", "path", "frames_path"]].rename(columns={"path": "video_path"}), on="clip_id")
    ids = [hashlib.sha256(f"{version}:{c}:{q}".encode()).hexdigest()[:16] for c, q in zip(queries["clip_id"], queries["query"])]
    queries.insert(0, "query_id", ids)
    queries["split"] = np.where(queries["clip_id"].isin(held), "heldout", "train")
    return queries.reset_index(drop=True)


def coverage_problems(queries: pd.DataFrame, sub_names) -> list[str]:
    uncovered = sorted(set(sub_names) - set(queries["subcategory"]))
    problems = [f"subcategories without queries: {uncovered}"] if uncovered else []
    problems += [f"the {split} split is empty" for split in ("train", "heldout") if not (queries["split"] == split).any()]
    return problems


def queries_check(queries: pd.DataFrame, sub_names) -> dg.AssetCheckResult:
    return quality.check_result(
        queries,
        quality.not_null("query_id", "clip_id", "subcategory", "query", "frames_path")
        + [
            quality.unique("query_id"),
            quality.in_set("subcategory", sub_names),
            quality.in_set("split", SPLITS),
            quality.in_set("harmful", {True, False}),
        ],
        "adversarial_queries",
        "queries_cover_taxonomy",
        coverage_problems(queries, sub_names),
    )


def query_counts(candidates: pd.DataFrame, queries: pd.DataFrame) -> dict[str, int]:
    return {
        "candidates": len(candidates),
        "dropped_not_adversarial": int((candidates["drop_reason"] == "not adversarial").sum()),
        "dropped_near_duplicate": int((candidates["drop_reason"] == "near duplicate").sum()),
        "kept": len(queries),
        "heldout": int((queries["split"] == "heldout").sum()),
        "benign": int((~queries["harmful"].astype(bool)).sum()),
    }


@stage_asset(
    SPEC,
    group="safety_data",
    partitioned=True,
    checks={
        "queries_cover_taxonomy": "Every subcategory has queries, both splits are non-empty, and query ids are unique and non-null."
    },
)
def adversarial_queries(
    st: Stage, curated_videos: StageData, video_descriptions: StageData, safety_taxonomy: StageData
) -> dg.MaterializeResult:
    """Harmful and benign questions about the clips, per taxonomy subcategory, split into train and held-out."""
    from resources.embeddings import embed_texts

    cfg = st.settings
    subs = subcategories_from_frame(safety_taxonomy.table("subcategories.parquet"))
    curated = curated_videos.table("curated.parquet")
    clips = representative_clips(curated, video_descriptions.table("reconciled.parquet"))
    st.log.info(f"writing queries for {len(clips)} clips x {len(subs)} subcategories")
    candidates = candidate_frame(clips, subs, build_role("query_writer", cfg), cfg.queries.per_subcategory)
    st.log.info(f"{len(candidates)} candidates: adversarial filter, then near-duplicate removal")
    embed = functools.partial(embed_texts, progress=st.progress("embedding queries for near-duplicate removal"))
    candidates = mark_drops(candidates, subs, build_role("adversarial_filter", cfg), cfg.queries.near_duplicate_threshold, embed)
    held = heldout_clips(sorted(clips["clip_id"]), cfg.queries.heldout_fraction, cfg.queries.seed)
    queries = query_table(candidates, curated, held, st.version)
    out = st.write_table(queries, "queries.parquet")
    st.write_table(candidates[candidates["drop_reason"] != ""], "dropped.parquet")
    counts = query_counts(candidates, queries)
    st.log.info(f"queries: {counts}")
    per_split = queries.groupby(["split", "harmful"]).size().rename("count").reset_index()
    return st.finish(
        {
            **table_metadata(queries, out, ["clip_id", "subcategory", "split", "query"], "subcategory"),
            "counts": dg.MetadataValue.json(counts),
            "per_split": dg.MetadataValue.md(markdown_table(per_split)),
        },
        [queries_check(queries, {s.subcategory for s in subs})],
        counts,
    )
