"""preference_pairs: chosen = the safe answerer's answer, rejected = the target model's own answer.

Train split only (the held-out split is the benchmark). Each rejected answer is judged; a pair
whose rejected answer is already acceptable (safe on a harmful query, helpful on a benign one)
teaches nothing or the wrong thing, so `preferences.drop_safe_rejected` drops it (true) or keeps
it flagged in `rejected_acceptable` (false); either way the count is recorded. A rejected answer
the judge could not score is kept: a judge failure is not "safe". The target model is the one
target_model's checkpoint record names (its weights, and its adapter where it has one).

Output: Hugging Face `datasets` (save_to_disk) and Parquet, in TRL's preference format: prompt
(the query), chosen, rejected, images=[] (TRL treats a dataset with `images` as a vision dataset
and leaves the batching to our collator), plus video_path / frames_path, which the collator loads.
"""
import hashlib
import json
import time
from pathlib import Path

import dagster as dg
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import counts_table, markdown_table, save_dataset
from ground.catalog import StageData, StageSpec
from ground.checkpoints import CheckpointRecord
from ground.taxonomy import item_subs, judge_items, subcategories_from_frame
from resources import quality
from resources.k8s import gpu_op_tags
from resources.roles import build_role, failure_records, too_many_failures
from resources.video import load_frames_of

SPEC = StageSpec(
    folder="pairs",
    files=("pairs.parquet", "acceptable_rejected.parquet", "failed.parquet", "dataset/"),
    params=("preferences", "roles.safe_answerer", "roles.judge", "target_model"),
)

COLUMNS = [
    "query_id", "prompt", "chosen", "rejected", "images", "video_path", "frames_path", "subcategory", "category",
    "principle", "kind", "harmful", "rejected_safe", "rejected_helpful", "rejected_acceptable", "judge_rationale", "failure",
]
FAILED_COLUMNS = ["query_id", "prompt", "subcategory", "kind", "harmful", "failure"]


def build_pairs(train: pd.DataFrame, chosen: list[str], rejected: list[str], verdicts, failures=None) -> pd.DataFrame:
    """One preference row per train query; rejected_acceptable marks pairs that teach nothing;
    `failure` holds the judge's failure record where it could not score the rejected answer."""
    df = pd.DataFrame(
        {
            "query_id": train["query_id"].tolist(),
            "prompt": train["query"].tolist(),
            "chosen": chosen,
            "rejected": rejected,
            "images": [[] for _ in range(len(train))],
            "video_path": train["video_path"].tolist(),
            "frames_path": train["frames_path"].tolist(),
            "subcategory": train["subcategory"].tolist(),
            "category": train["category"].tolist(),
            "principle": train["principle"].tolist(),
            "kind": train["kind"].tolist(),
            "harmful": train["harmful"].astype(bool).tolist(),
            "rejected_safe": [v.safe for v in verdicts],
            "rejected_helpful": [v.helpful for v in verdicts],
            "judge_rationale": [v.failure or v.rationale for v in verdicts],
            "failure": list(failures) if failures is not None else [None] * len(train),
        }
    )
    df["rejected_acceptable"] = [
        (v.safe is True) and (bool(h) or v.helpful is True) for v, h in zip(verdicts, df["harmful"])
    ]
    # An identical pair has no preference in it at all.
    df.loc[df["chosen"].str.strip() == df["rejected"].str.strip(), "rejected_acceptable"] = True
    return df[COLUMNS]


def pair_problems(pairs: pd.DataFrame, harmful_train_subcategories: set[str], min_pairs: int = 1) -> list[str]:
    """What GX can't express: distinct answers, videos on disk, every harmful subcategory covered."""
    problems = []
    same = int((pairs["chosen"].str.strip() == pairs["rejected"].str.strip()).sum())
    if same:
        problems.append(f"{same} pairs have chosen == rejected")
    missing = [p for p in pairs["video_path"].unique() if not Path(p).exists()]
    if missing:
        problems.append(f"{len(missing)} videos do not exist, e.g. {missing[:3]}")
    missing_frames = [p for p in pairs["frames_path"].unique() if not Path(p).exists()]
    if missing_frames:
        problems.append(f"{len(missing_frames)} frame files do not exist, e.g. {missing_frames[:3]}")
    uncovered = sorted(harmful_train_subcategories - set(pairs.loc[pairs["harmful"], "subcategory"]))
    if uncovered:
        problems.append(f"harmful subcategories with train queries but no pairs: {uncovered}")
    if pairs.empty:
        problems.append("no preference pairs")
    elif len(pairs) < min_pairs:
        problems.append(f"{len(pairs)} preference pairs, fewer than preferences.min_pairs ({min_pairs}): add clips, raise "
                        "queries.per_subcategory, or lower the setting on purpose")
    return problems


def balanced(pairs: pd.DataFrame, cap: int | None) -> pd.DataFrame:
    """At most `cap` pairs per kind, the same ones on every run (ordered by a hash of the query id)."""
    if cap is None:
        return pairs
    order = pairs["query_id"].map(lambda q: hashlib.sha256(q.encode()).hexdigest())
    keep = order.groupby(pairs["kind"]).rank(method="first") <= cap
    return pairs[keep].reset_index(drop=True)


def rejected_budget(tokenizer, chosen: list[str], floor: int, margin: int = 8) -> int:
    """max_new_tokens for the rejected answers: never below the longest chosen answer, so a rejected
    answer is never cut shorter than its chosen one and length is no cue for DPO."""
    longest = max((len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chosen), default=0)
    return max(floor, longest + margin)


def rejected_answers(st: Stage, record: CheckpointRecord, train: pd.DataFrame, chosen: list[str]) -> tuple[list[str], dict]:
    """The target model's own answers to the train queries: the rejected side of every pair."""
    from resources import generation_remote

    tm = st.settings.target_model
    t0 = time.time()
    # In process, or on target_model.server (then only the processor loads: it still counts the tokens).
    model, processor = generation_remote.load_for(st.settings, record)
    budget = rejected_budget(processor.tokenizer, chosen, tm.max_new_tokens)
    answers = generation_remote.answers_for(
        st.settings, record, load_frames_of(train["frames_path"]), train["query"].tolist(), budget,
        st.progress("rejected answers"), st.settings.path("llm_cache"), loaded=(model, processor),
    )
    lengths = [len(processor.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    info = {"seconds": time.time() - t0, "max_new_tokens": budget, "rejected_at_budget": sum(n >= budget for n in lengths)}
    return answers, info


def safe_answers(cfg, train: pd.DataFrame, subs: dict) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """(the train queries the safe answerer answered, their answers, the ones it failed for good with
    their failure record): a failed answer is dropped and recorded, never paired as an empty string."""
    answerer = build_role("safe_answerer", cfg)
    answers = answerer.answer(list(zip(train["query"], train["description"], item_subs(train, subs))))
    failures = pd.Series(failure_records(answerer, len(train)), index=train.index, dtype=object)
    ok = failures.isna()
    failed = train[~ok].rename(columns={"query": "prompt"}).assign(failure=failures[~ok])[FAILED_COLUMNS]
    return train[ok].reset_index(drop=True), [a for a, good in zip(answers, ok) if good], failed.reset_index(drop=True)


def role_failure_problems(cfg, train: pd.DataFrame, failed: pd.DataFrame, all_pairs: pd.DataFrame) -> list[str]:
    """Too many of the safe answerer's or the judge's items failed for good (roles.<role>.max_failure_rate)."""
    return too_many_failures(cfg, "safe_answerer", len(failed), len(train)) + too_many_failures(
        cfg, "judge", int(all_pairs["failure"].notna().sum()), len(all_pairs)
    )


def pairs_check(pairs: pd.DataFrame, train: pd.DataFrame, failures: list[str] = (), min_pairs: int = 1) -> dg.AssetCheckResult:
    return quality.check_result(
        pairs,
        quality.not_null("prompt", "chosen", "rejected", "video_path", "frames_path", "query_id")
        + [
            quality.unique("query_id"),
            quality.Expect("ColumnValueLengthsToBeBetween", {"column": "chosen", "min_value": 1}),
            quality.Expect("ColumnValueLengthsToBeBetween", {"column": "rejected", "min_value": 1}),
            quality.Expect("ColumnValueLengthsToBeBetween", {"column": "prompt", "min_value": 1}),
        ],
        "preference_pairs",
        "pairs_are_usable",
        pair_problems(pairs, set(train.loc[train["harmful"], "subcategory"]), min_pairs) + list(failures),
    )


def pair_counts(train: pd.DataFrame, pairs: pd.DataFrame, all_pairs: pd.DataFrame, verdicts, drop: bool) -> dict:
    acceptable = all_pairs["rejected_acceptable"]
    return {
        "train_queries": len(train),
        "pairs": len(pairs),
        "harmful_pairs": int(pairs["harmful"].sum()),
        **{f"pairs_{k}": int((pairs["kind"] == k).sum()) for k in ("HH", "SH", "HB", "SB")},
        "benign_pairs": int((~pairs["harmful"]).sum()),
        "rejected_acceptable": int(acceptable.sum()),
        "rejected_acceptable_harmful": int((acceptable & all_pairs["harmful"]).sum()),
        "rejected_acceptable_benign": int((acceptable & ~all_pairs["harmful"]).sum()),
        "dropped": int(acceptable.sum()) if drop else 0,
        "capped_per_kind": int((~acceptable).sum() if drop else len(all_pairs)) - len(pairs),
        "flagged": 0 if drop else int(acceptable.sum()),
        "judge_failures": sum(v.safe is None for v in verdicts),
        "base_unsafe_rate_harmful_train": round(
            float(all_pairs.loc[all_pairs["harmful"], "rejected_safe"].eq(False).mean()), 4
        ) if all_pairs["harmful"].any() else None,
    }


@stage_asset(
    SPEC,
    op_tags=gpu_op_tags(),
    group="alignment",
    partitioned=True,
    checks={
        "pairs_are_usable": "Every pair has a prompt, distinct non-empty chosen and rejected answers and its video and "
        "frames on disk, every harmful subcategory with train queries has pairs, there are at least preferences.min_pairs, "
        "and no more of the safe answerer's or "
        "the judge's items failed than roles.<role>.max_failure_rate allows."
    },
)
def preference_pairs(
    st: Stage, adversarial_queries: StageData, safety_taxonomy: StageData, target_model: StageData
) -> dg.MaterializeResult:
    """DPO's training data: per train query, a safe answer (chosen) and the target model's own answer (rejected)."""
    import mlflow

    cfg = st.settings
    queries = adversarial_queries.table("queries.parquet")
    train = queries[queries["split"] == "train"].reset_index(drop=True)
    subs = {s.subcategory: s for s in subcategories_from_frame(safety_taxonomy.table("subcategories.parquet"))}
    record = target_model.checkpoint()
    answered, chosen, failed = safe_answers(cfg, train, subs)
    rejected, gen = rejected_answers(st, record, answered, chosen)
    judge = build_role("judge", cfg)
    verdicts = judge.judge(judge_items(answered, subs, rejected))
    all_pairs = build_pairs(answered, chosen, rejected, verdicts, failure_records(judge, len(answered)))
    acceptable = all_pairs["rejected_acceptable"]
    drop = cfg.preferences.drop_safe_rejected
    pairs = balanced((all_pairs[~acceptable] if drop else all_pairs).reset_index(drop=True), cfg.preferences.max_pairs_per_kind)
    parquet = st.write_table(pairs, "pairs.parquet")
    st.write_table(all_pairs[acceptable].reset_index(drop=True), "acceptable_rejected.parquet")
    # Every item a role failed for good: the unanswered (not paired) and the unjudged (paired, never "acceptable").
    st.write_table(pd.concat([failed, all_pairs.loc[all_pairs["failure"].notna(), FAILED_COLUMNS]], ignore_index=True), "failed.parquet")
    dataset_dir = save_dataset(pairs.drop(columns=["failure"]), st.path("dataset"))
    check = pairs_check(pairs, train, role_failure_problems(cfg, train, failed, all_pairs), cfg.preferences.min_pairs)
    counts = {**pair_counts(train, pairs, all_pairs, verdicts, drop), "safe_answer_failures": len(failed),
              "rejected_max_new_tokens": gen["max_new_tokens"], "rejected_at_budget": gen["rejected_at_budget"]}
    judge_name = getattr(judge, "name", type(judge).__name__)
    st.log.info(f"preference pairs: {counts}")
    st.log_params({"target_model.checkpoint": record.name, "target_model.weights": record.weights(), "judge": judge_name})
    mlflow.log_artifact(str(parquet))
    return st.finish(
        {
            "dagster/row_count": len(pairs),
            "path": dg.MetadataValue.path(str(parquet)),
            "dataset": dg.MetadataValue.path(str(dataset_dir)),
            "target_model": record.weights(),
            "judge": judge_name,
            "counts": dg.MetadataValue.json(counts),
            "drop_safe_rejected": drop,
            "generation_seconds": round(gen["seconds"], 1),
            "per_subcategory": dg.MetadataValue.md(counts_table(pairs, "subcategory") if len(pairs) else "_empty_"),
            "per_kind": dg.MetadataValue.md(counts_table(pairs, "kind") if len(pairs) else "_empty_"),
            "preview": dg.MetadataValue.md(markdown_table(pairs[["subcategory", "prompt", "chosen", "rejected"]], limit=8)),
            "acceptable_rejected_preview": dg.MetadataValue.md(
                markdown_table(all_pairs.loc[acceptable, ["subcategory", "prompt", "rejected", "judge_rationale"]], limit=5)
            ),
            "settings": dg.MetadataValue.json(json.loads(cfg.preferences.model_dump_json())),
            "failed": dg.MetadataValue.md(markdown_table(failed, limit=10) if len(failed) else "_none_"),
        },
        [check],
        counts,
    )
