"""A query set: candidate queries per (clip, subcategory) from the query writer, an adversarial
filter pass, near-duplicate removal by embedding similarity, and the clip splits.

adversarial_queries writes one per taxonomy version; target_model writes the one of the taxonomy
the embedded base model is pretrained on (`target_model.pretraining_taxonomy`), with the same
roles, so its requests come from the same cache.
"""
import dataclasses
import functools
import hashlib

import numpy as np
import pandas as pd

from ground.roles import QueryRequest
from resources.roles import build_role


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


def query_id(clip_id: str, subcategory: str, query: str) -> str:
    """What identifies an item: its clip, subcategory and text, never the taxonomy version, so an
    unchanged query keeps its id (and every choice keyed on it) in a new version; the subcategory
    tells apart one question asked under two subcategories of a clip."""
    return hashlib.sha256(f"{clip_id}\x00{subcategory}\x00{query}".encode()).hexdigest()[:16]


def query_table(candidates: pd.DataFrame, curated: pd.DataFrame) -> pd.DataFrame:
    """The kept candidates with their video and frames and a stable query_id."""
    queries = candidates[candidates["drop_reason"] == ""].drop(columns=["kept_by_filter", "drop_reason"])
    queries = queries.merge(curated[["clip_id", "path", "frames_path"]].rename(columns={"path": "video_path"}), on="clip_id")
    ids = [query_id(c, s, q) for c, s, q in zip(queries["clip_id"], queries["subcategory"], queries["query"])]
    queries.insert(0, "query_id", ids)
    return queries.reset_index(drop=True)


def write_query_set(cfg, subs, curated: pd.DataFrame, described: pd.DataFrame, progress) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every candidate with its drop_reason, the kept queries) for these subcategories over the
    representative clips; `progress` reports the embedding pass."""
    from resources.embeddings import embed_texts

    clips = representative_clips(curated, described)
    splits = clip_splits(clips, cfg.queries.heldout_fraction, cfg.queries.validation_fraction, cfg.queries.seed)
    candidates = candidate_frame(clips, subs, build_role("query_writer", cfg), cfg.queries, splits)
    embed = functools.partial(embed_texts, progress=progress)
    candidates = mark_drops(candidates, subs, build_role("adversarial_filter", cfg), cfg.queries.near_duplicate_threshold, embed)
    return candidates, query_table(candidates, curated)
