"""preference_pairs: chosen = the safe answerer's answer, rejected = the target model's own answer.

Train split only (the held-out split is the benchmark). Each rejected answer is judged; a pair
whose rejected answer is already acceptable (safe on a harmful query, helpful on a benign one)
teaches nothing or the wrong thing, so `preferences.drop_safe_rejected` drops it (true) or keeps
it flagged in `rejected_acceptable` (false); either way the count is recorded. A rejected answer
the judge could not score is kept: a judge failure is not "safe".

Output: Hugging Face `datasets` (save_to_disk) and Parquet, in TRL's preference format: prompt
(the query), chosen, rejected, images=[] (TRL treats a dataset with `images` as a vision dataset
and leaves the batching to our collator), plus video_path / frames_path, which the collator loads.
"""
import json
import time
from pathlib import Path

import dagster as dg
import pandas as pd

from assets.common import counts_table, markdown_table, progress_logger, record_lineage, write_table
from assets.target_model import load_queries, read_target
from assets.taxonomy import read_subcategories
from dagster_project.partitions import taxonomy_partitions
from dagster_project.settings import PipelineSettings
from resources import quality
from resources.dvc import DvcTracker
from resources.roles import build_role
from resources.tracking import MlflowTracker
from resources.video import load_frames_of

COLUMNS = [
    "query_id", "prompt", "chosen", "rejected", "images", "video_path", "frames_path", "subcategory", "category",
    "principle", "harmful", "rejected_safe", "rejected_helpful", "rejected_acceptable", "judge_rationale",
]


def build_pairs(train: pd.DataFrame, chosen: list[str], rejected: list[str], verdicts) -> pd.DataFrame:
    """One preference row per train query; rejected_acceptable marks pairs that teach nothing."""
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
            "harmful": train["harmful"].astype(bool).tolist(),
            "rejected_safe": [v.safe for v in verdicts],
            "rejected_helpful": [v.helpful for v in verdicts],
            "judge_rationale": [v.failure or v.rationale for v in verdicts],
        }
    )
    df["rejected_acceptable"] = [
        (v.safe is True) and (bool(h) or v.helpful is True) for v, h in zip(verdicts, df["harmful"])
    ]
    # An identical pair has no preference in it at all.
    df.loc[df["chosen"].str.strip() == df["rejected"].str.strip(), "rejected_acceptable"] = True
    return df[COLUMNS]


def pair_problems(pairs: pd.DataFrame, harmful_train_subcategories: set[str]) -> list[str]:
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
    return problems


def save_dataset(pairs: pd.DataFrame, folder: Path) -> Path:
    """HF datasets save_to_disk, replacing an older copy."""
    import shutil

    from datasets import Dataset

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds = Dataset.from_pandas(pairs.reset_index(drop=True), preserve_index=False)
    ds.save_to_disk(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


@dg.asset(
    deps=["adversarial_queries", "target_model"],
    partitions_def=taxonomy_partitions,
    group_name="model",
    code_version="1",
    check_specs=[dg.AssetCheckSpec("pairs_are_usable", asset="preference_pairs", blocking=True)],
)
def preference_pairs(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow: MlflowTracker, dvc: DvcTracker):
    """Chosen (safe answerer) vs rejected (the target model's own answer) for every train query."""
    from resources import models

    cfg = settings.load()
    version = context.partition_key
    tm = cfg.target_model
    queries = load_queries(cfg, version)
    train = queries[queries["split"] == "train"].reset_index(drop=True)
    subs = {s.subcategory: s for s in read_subcategories(cfg, version)}
    target = read_target(cfg, version)

    chosen = build_role("safe_answerer", cfg).answer(
        [(q, d, subs[s]) for q, d, s in zip(train["query"], train["description"], train["subcategory"])]
    )
    t0 = time.time()
    model, processor = models.load_video_llm(target["model"], device=tm.device)
    rejected = models.generate_answers(
        model, processor, load_frames_of(train["frames_path"]), train["query"].tolist(), tm.max_new_tokens, tm.batch_size,
        progress=progress_logger(context, "rejected answers"),
    )
    gen_seconds = time.time() - t0
    del model
    judge = build_role("judge", cfg)
    verdicts = judge.judge(list(zip(train["query"], rejected, train["harmful"].astype(bool))))
    all_pairs = build_pairs(train, chosen, rejected, verdicts)

    acceptable = all_pairs["rejected_acceptable"]
    pairs = all_pairs[~acceptable] if cfg.preferences.drop_safe_rejected else all_pairs
    pairs = pairs.reset_index(drop=True)
    out_dir = cfg.path("pairs", version)
    parquet = write_table(pairs, out_dir / "pairs.parquet")
    write_table(all_pairs[acceptable].reset_index(drop=True), out_dir / "acceptable_rejected.parquet")
    dataset_dir = save_dataset(pairs, out_dir / "dataset")

    harmful_subs = set(train.loc[train["harmful"], "subcategory"])
    problems = pair_problems(pairs, harmful_subs)
    check = quality.check_result(
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
        problems,
    )
    counts = {
        "train_queries": len(train),
        "pairs": len(pairs),
        "harmful_pairs": int(pairs["harmful"].sum()),
        "benign_pairs": int((~pairs["harmful"]).sum()),
        "rejected_acceptable": int(acceptable.sum()),
        "rejected_acceptable_harmful": int((acceptable & all_pairs["harmful"]).sum()),
        "rejected_acceptable_benign": int((acceptable & ~all_pairs["harmful"]).sum()),
        "dropped": int(acceptable.sum()) if cfg.preferences.drop_safe_rejected else 0,
        "flagged": 0 if cfg.preferences.drop_safe_rejected else int(acceptable.sum()),
        "judge_failures": sum(v.safe is None for v in verdicts),
        "base_unsafe_rate_harmful_train": round(
            float(all_pairs.loc[all_pairs["harmful"], "rejected_safe"].eq(False).mean()), 4
        ) if all_pairs["harmful"].any() else None,
    }
    judge_name = getattr(judge, "name", cfg.judge)
    context.log.info(f"preference pairs: {counts}")
    with mlflow.run(
        context,
        cfg.profile,
        {"target_model": target["model"], "safe_answerer": cfg.safe_answerer, "judge": judge_name,
         "drop_safe_rejected": cfg.preferences.drop_safe_rejected},
        tags={"taxonomy_version": version},
        inputs={"adversarial_queries": cfg.path("queries", version, "queries.parquet")},
    ) as run:
        import mlflow as mlf

        mlf.log_metrics({k: v for k, v in counts.items() if isinstance(v, (int, float))})
        mlf.log_artifact(str(parquet))
        mlf.set_tag("check.pairs_are_usable", str(check.passed))
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(pairs),
            "path": dg.MetadataValue.path(str(parquet)),
            "dataset": dg.MetadataValue.path(str(dataset_dir)),
            "target_model": target["model"],
            "judge": judge_name,
            "counts": dg.MetadataValue.json(counts),
            "drop_safe_rejected": cfg.preferences.drop_safe_rejected,
            "generation_seconds": round(gen_seconds, 1),
            "per_subcategory": dg.MetadataValue.md(counts_table(pairs, "subcategory") if len(pairs) else "_empty_"),
            "preview": dg.MetadataValue.md(markdown_table(pairs[["subcategory", "prompt", "chosen", "rejected"]], limit=8)),
            "acceptable_rejected_preview": dg.MetadataValue.md(
                markdown_table(all_pairs.loc[acceptable, ["subcategory", "prompt", "rejected", "judge_rationale"]], limit=5)
            ),
            "mlflow_run_id": run.info.run_id,
            **record_lineage(context, dvc, mlflow, run, "preference_pairs"),
            "settings": dg.MetadataValue.json(json.loads(cfg.preferences.model_dump_json())),
        },
        check_results=[check],
    )
