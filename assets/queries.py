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
import dataclasses
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
SPLITS = {"train", "validation", "heldout"}
KINDS = {"HH", "SH", "HB", "SB"}


def clip_splits(clips: pd.DataFrame, heldout: float, validation: float, seed: int) -> dict[str, str]:
    """clip_id → train / validation / heldout: a stable share of each visual label's clips (at least
    one heldout), so every split holds safe and harmful clips."""
    out = {}
    for _, group in clips.groupby("visual_label", sort=True):
        ranked = sorted(group["clip_id"], key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
        n_held = max(1, round(heldout * len(ranked)))
        n_val = round(validation * len(ranked))
        for i, clip in enumerate(ranked):
            out[clip] = "heldout" if i < n_held else "validation" if i < n_held + n_val else "train"
    return out


def intent_pool(sub, pool: str):
    """The subcategory with only its pool's intents: the first half trains, the second half evaluates."""
    half = (len(sub.intents) + 1) // 2
    intents = sub.intents[:half] if pool == "train" or len(sub.intents) < 2 else sub.intents[half:]
    return dataclasses.replace(sub, intents=intents)


def kind_of(textual_label: int, visual_label: int) -> str:
    return ("H" if visual_label else "S") + ("H" if textual_label else "B")


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
    columns = ["clip_id", "description", "visual_label"]
    return curated[curated["is_representative"]].drop(columns=["visual_label"], errors="ignore").merge(
        described[columns], on="clip_id", how="inner"
    )


def query_requests(clips: pd.DataFrame, subs, splits: dict[str, str], q) -> list[tuple[QueryRequest, str, int]]:
    """(request, split, visual label) per clip and subcategory it is asked about."""
    out = []
    for r in clips.itertuples():
        split, visual = splits[r.clip_id], int(r.visual_label)
        pool = "train" if split == "train" else "eval"
        for s in subs:
            if s.subcategory in q.ood_subcategories and split != "heldout":
                continue
            if s.kind == "benign" and visual:  # SB only: a benign question about a dangerous clip is none of the four kinds
                continue
            out.append((QueryRequest(r.clip_id, r.description, r.scene_category, intent_pool(s, pool), q.count(s.kind), pool), split, visual))
    return out


def candidate_frame(clips: pd.DataFrame, subs, writer, q, splits: dict[str, str]) -> pd.DataFrame:
    requests = query_requests(clips, subs, splits, q)
    rows = []
    for (req, split, visual), queries in zip(requests, writer.write([r for r, _, _ in requests])):
        textual = int(req.sub.harmful)
        for text in queries:
            rows.append(
                {
                    "clip_id": req.clip_id,
                    "scene_category": req.scene_category,
                    "principle": req.sub.principle,
                    "category": req.sub.category,
                    "subcategory": req.sub.subcategory,
                    "kind": kind_of(textual, visual),
                    "visual_label": visual,
                    "textual_label": textual,
                    # Must be refused: a harmful question, or a contextual one about a dangerous clip.
                    "harmful": bool(textual or (req.sub.kind == "contextual" and visual)),
                    "split": split,
                    "slice": "ood" if req.sub.subcategory in q.ood_subcategories else "in",
                    "query": text.strip(),
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
    # Per clip: the same question about two clips is two items (only the video differs).
    groups = (candidates.loc[live, "clip_id"] + "\x00" + candidates.loc[live, "subcategory"]).tolist()
    mask = near_duplicate_mask(embed(candidates.loc[live, "query"].tolist()), groups, threshold)
    candidates.loc[live[~mask], "drop_reason"] = "near duplicate"
    return candidates


def query_table(candidates: pd.DataFrame, curated: pd.DataFrame, version: str) -> pd.DataFrame:
    """The kept candidates with their video and frames and a stable query_id."""
    queries = candidates[candidates["drop_reason"] == ""].drop(columns=["kept_by_filter", "drop_reason"])
    queries = queries.merge(curated[["clip_id", "path", "frames_path"]].rename(columns={"path": "video_path"}), on="clip_id")
    ids = [hashlib.sha256(f"{version}:{c}:{q}".encode()).hexdigest()[:16] for c, q in zip(queries["clip_id"], queries["query"])]
    queries.insert(0, "query_id", ids)
    return queries.reset_index(drop=True)


def coverage_problems(queries: pd.DataFrame, sub_names) -> list[str]:
    uncovered = sorted(set(sub_names) - set(queries["subcategory"]))
    problems = [f"subcategories without queries: {uncovered}"] if uncovered else []
    problems += [f"the {split} split is empty" for split in ("train", "heldout") if not (queries["split"] == split).any()]
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


def queries_check(queries: pd.DataFrame, sub_names) -> dg.AssetCheckResult:
    return quality.check_result(
        queries,
        quality.not_null("query_id", "clip_id", "subcategory", "query", "frames_path")
        + [
            quality.unique("query_id"),
            quality.in_set("subcategory", sub_names),
            quality.in_set("split", SPLITS),
            quality.in_set("harmful", {True, False}),
            quality.in_set("kind", KINDS),
            quality.in_set("visual_label", {0, 1}),
            quality.in_set("textual_label", {0, 1}),
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
        "clip or query text occurs in training, and query ids are unique and non-null."
    },
)
def adversarial_queries(
    st: Stage, curated_videos: StageData, video_descriptions: StageData, safety_taxonomy: StageData
) -> dg.MaterializeResult:
    """Harmful and benign questions about the clips, per taxonomy subcategory, split into train and held-out."""
    from resources.embeddings import embed_texts

    cfg = st.settings
    subs = subcategories_from_frame(safety_taxonomy.table("subcategories.parquet"))
    unknown = sorted(set(cfg.queries.ood_subcategories) - {s.subcategory for s in subs})
    if unknown:
        raise ValueError(f"queries.ood_subcategories names {unknown}, not subcategories of taxonomy {st.version}")
    curated = curated_videos.table("curated.parquet")
    clips = representative_clips(curated, video_descriptions.table("reconciled.parquet"))
    st.log.info(f"writing queries for {len(clips)} clips x {len(subs)} subcategories")
    splits = clip_splits(clips, cfg.queries.heldout_fraction, cfg.queries.validation_fraction, cfg.queries.seed)
    candidates = candidate_frame(clips, subs, build_role("query_writer", cfg), cfg.queries, splits)
    st.log.info(f"{len(candidates)} candidates: adversarial filter, then near-duplicate removal")
    embed = functools.partial(embed_texts, progress=st.progress("embedding queries for near-duplicate removal"))
    candidates = mark_drops(candidates, subs, build_role("adversarial_filter", cfg), cfg.queries.near_duplicate_threshold, embed)
    queries = query_table(candidates, curated, st.version)
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
        [queries_check(queries, {s.subcategory for s in subs})],
        counts,
    )
