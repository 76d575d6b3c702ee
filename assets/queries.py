"""adversarial_queries: candidate queries per (clip, subcategory), an adversarial filter pass,
near-duplicate removal by embedding similarity, and a held-out split (SafeVidBench-Base style).

The held-out split is by clip, so the benchmark asks about videos the model never trained on.
"""
import hashlib

import dagster as dg
import numpy as np
import pandas as pd

from assets.common import markdown_table, read_table, record_lineage, table_metadata, write_table
from assets.taxonomy import read_subcategories
from dagster_project.partitions import taxonomy_partitions
from dagster_project.settings import PipelineSettings
from resources import quality
from resources.roles import QueryRequest, build_role
from resources.dvc import DvcTracker
from resources.tracking import MlflowTracker


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


@dg.asset(
    deps=["video_descriptions", "curated_videos", "safety_taxonomy"],
    partitions_def=taxonomy_partitions,
    group_name="data",
    code_version="1",
    check_specs=[dg.AssetCheckSpec("queries_cover_taxonomy", asset="adversarial_queries", blocking=True)],
)
def adversarial_queries(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow: MlflowTracker, dvc: DvcTracker):
    """Queries grounded in each representative clip's description, one set per taxonomy subcategory."""
    cfg = settings.load()
    version = context.partition_key
    subs = read_subcategories(cfg, version)
    curated = read_table(cfg.path("curated", "curated.parquet"), "curated_videos")
    described = read_table(cfg.path("descriptions", "reconciled.parquet"), "video_descriptions")
    clips = curated[curated["is_representative"]].merge(
        described[["clip_id", "description"]], on="clip_id", how="inner"
    )
    candidates = candidate_frame(clips, subs, build_role("query_writer", cfg), cfg.queries.per_subcategory)
    sub_by_name = {s.subcategory: s for s in subs}
    adversarial = build_role("adversarial_filter", cfg).keep(
        [(q, sub_by_name[s]) for q, s in zip(candidates["query"], candidates["subcategory"])]
    )
    candidates["kept_by_filter"] = adversarial
    candidates["drop_reason"] = np.where(adversarial, "", "not adversarial")
    candidates.loc[candidates["query"] == "", "drop_reason"] = "empty"

    from resources.embeddings import embed_texts

    live = candidates[candidates["drop_reason"] == ""].index
    mask = near_duplicate_mask(
        embed_texts(candidates.loc[live, "query"].tolist()),
        candidates.loc[live, "subcategory"].tolist(),
        cfg.queries.near_duplicate_threshold,
    )
    candidates.loc[live[~mask], "drop_reason"] = "near duplicate"

    queries = candidates[candidates["drop_reason"] == ""].drop(columns=["kept_by_filter", "drop_reason"]).copy()
    queries = queries.merge(
        curated[["clip_id", "path", "frames_path"]].rename(columns={"path": "video_path"}), on="clip_id"
    )
    queries.insert(0, "query_id", [hashlib.sha256(f"{version}:{c}:{q}".encode()).hexdigest()[:16] for c, q in zip(queries["clip_id"], queries["query"])])
    held = heldout_clips(sorted(clips["clip_id"]), cfg.queries.heldout_fraction, cfg.queries.seed)
    queries["split"] = np.where(queries["clip_id"].isin(held), "heldout", "train")
    queries = queries.reset_index(drop=True)

    out = write_table(queries, cfg.path("queries", version, "queries.parquet"))
    dropped = candidates[candidates["drop_reason"] != ""]
    write_table(dropped, cfg.path("queries", version, "dropped.parquet"))

    uncovered = sorted(set(sub_by_name) - set(queries["subcategory"]))
    problems = [f"subcategories without queries: {uncovered}"] if uncovered else []
    for split in ("train", "heldout"):
        if not (queries["split"] == split).any():
            problems.append(f"the {split} split is empty")
    check = quality.check_result(
        queries,
        quality.not_null("query_id", "clip_id", "subcategory", "query", "frames_path")
        + [
            quality.unique("query_id"),
            quality.in_set("subcategory", sub_by_name),
            quality.in_set("split", {"train", "heldout"}),
            quality.in_set("harmful", {True, False}),
        ],
        "adversarial_queries",
        "queries_cover_taxonomy",
        problems,
    )
    counts = {
        "candidates": len(candidates),
        "dropped_not_adversarial": int((candidates["drop_reason"] == "not adversarial").sum()),
        "dropped_near_duplicate": int((candidates["drop_reason"] == "near duplicate").sum()),
        "kept": len(queries),
        "heldout": int((queries["split"] == "heldout").sum()),
        "benign": int((~queries["harmful"]).sum()),
    }
    with mlflow.run(
        context, cfg.profile, {"query_writer": cfg.query_writer, "adversarial_filter": cfg.adversarial_filter, **cfg.queries.model_dump()},
        inputs={
            "video_descriptions": cfg.path("descriptions", "reconciled.parquet"),
            "safety_taxonomy": cfg.path("taxonomy", version, "subcategories.parquet"),
        },
    ) as run:
        import mlflow as mlf

        mlf.log_metrics(counts)
        mlf.set_tag("check.queries_cover_taxonomy", str(check.passed))
    context.log.info(f"queries: {counts}")
    return dg.MaterializeResult(
        metadata={
            **table_metadata(queries, out, ["clip_id", "subcategory", "split", "query"], "subcategory"),
            "counts": dg.MetadataValue.json(counts),
            "per_split": dg.MetadataValue.md(
                markdown_table(queries.groupby(["split", "harmful"]).size().rename("count").reset_index())
            ),
            "mlflow_run_id": run.info.run_id, **record_lineage(context, dvc, mlflow, run, "adversarial_queries"),
        },
        check_results=[check],
    )

