"""judge_agreement: the benchmark's answers judged a second time, by roles.second_judge, beside the
verdicts of roles.judge that benchmark_scores reported.

Published attack-success rates move by about 17 points between judges on the same outputs, so a
rate means little without the judge that produced it. This stage puts the two side by side: Cohen's
κ on safe (must-refuse items) and on helpful (benign items) per checkpoint and split, the headline
rates under each judge and their gap, and where the judges disagree, per category
(ground/agreement.py). Offline the second judge is the refusal-phrase judge of the jailbreak
literature (resources/prefix_judge.py); point roles.second_judge at an endpoint to compare two LLM judges.
"""
import dagster as dg
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import markdown_table, table_value
from ground.agreement import judge_agreement as agreement_tables
from ground.catalog import StageData, StageSpec
from ground.taxonomy import judge_items, judge_subcategories, subcategories_from_frame
from resources import quality
from resources.roles import build_role, failure_records, too_many_failures

SPEC = StageSpec(
    folder="judge_agreement",
    files=("second_verdicts.parquet", "agreement.parquet", "by_category.parquet", "disagreements.parquet", "agreement.md"),
    params=("roles.judge", "roles.second_judge"),
)
SHOWN = ["checkpoint", "split", "n", "kappa_safe", "safety_rate_a", "safety_rate_b", "safety_rate_gap", "kappa_helpful",
         "helpful_rate_a", "helpful_rate_b"]


def second_verdicts(settings, verdicts: pd.DataFrame, subs: dict) -> tuple[pd.DataFrame, str]:
    """The real-frame answers, judged by roles.second_judge (a failed item: safe None and its failure)."""
    judge = build_role("second_judge", settings)
    rows = verdicts[verdicts["frames"] == "video"].reset_index(drop=True)
    out = judge.judge(judge_items(rows, subs))
    failed = failure_records(judge, len(rows))
    return rows.assign(
        safe=[v.safe for v in out], helpful=[v.helpful for v in out], rationale=[v.rationale for v in out],
        failure=[f or v.failure for v, f in zip(out, failed)], judge=judge.name,
    ), judge.name


def agreement_metrics(agreement: pd.DataFrame) -> dict:
    """`<checkpoint>.judge_agreement.<value>.<split>` for MLflow's compare view."""
    out = {}
    for r in agreement.itertuples():
        for value in ("kappa_safe", "kappa_helpful", "safety_rate_a", "safety_rate_b", "safety_rate_gap"):
            v = getattr(r, value)
            if pd.notna(v):
                out[f"{r.checkpoint}.judge_agreement.{value}.{r.split}"] = float(v)
    return out


def agreement_check(second: pd.DataFrame, first: pd.DataFrame, settings) -> dg.AssetCheckResult:
    """Every real-frame answer has a second verdict or a recorded failure, within the role's failure limit."""
    missing = len(first[first["frames"] == "video"]) - len(second)
    undecided = int((second["safe"].isna() & second["failure"].isna() & second["harmful"]).sum())
    problems = [f"{missing} answers were not judged a second time"] if missing else []
    problems += [f"{undecided} must-refuse answers have neither a second verdict nor a recorded failure"] if undecided else []
    problems += too_many_failures(settings, "second_judge", int(second["failure"].notna().sum()), len(second))
    return quality.check_result(second, quality.not_null("item_id", "checkpoint", "judge"), "judge_agreement",
                                "second_judge_is_complete", problems)


@stage_asset(
    SPEC,
    group="evaluation",
    partitioned=True,
    measures_despite=("alignment_gates",),
    checks={
        "second_judge_is_complete": "Every answer benchmark_scores judged with the real frames has a verdict of "
        "roles.second_judge or a recorded failure, and no more failed than roles.second_judge.max_failure_rate allows."
    },
)
def judge_agreement(st: Stage, benchmark_scores: StageData, safety_taxonomy: StageData) -> dg.MaterializeResult:
    """How far the benchmark's rates depend on the judge: Cohen's kappa, the rates under two judges side by side, and where they disagree."""
    import mlflow

    first = benchmark_scores.table("verdicts.parquet")
    subs = judge_subcategories(subcategories_from_frame(safety_taxonomy.table("subcategories.parquet")))
    second, name = second_verdicts(st.settings, first, subs)
    tables = agreement_tables(first[first["frames"] == "video"], second)
    agreement = tables["agreement"]  # seeds pooled: one row per checkpoint and split
    st.write_table(second, "second_verdicts.parquet")
    for key in ("agreement", "by_category", "disagreements"):
        st.write_table(tables[key], f"{key}.parquet")
    overall = agreement[agreement["split"] == "ALL"]
    judges = f"judge a: {first['judge'].iloc[0]}; judge b: {name}"
    md = f"{judges}\n\n{markdown_table(overall[SHOWN].round(3), limit=50)}\n\nby category:\n\n{markdown_table(tables['by_category'].round(3), limit=50)}"
    st.path("agreement.md").write_text(md + "\n")
    mlflow.log_artifact(str(st.path("agreement.md")))
    mlflow.log_table(overall[SHOWN], "judge_agreement.json")
    st.log.info(f"judge agreement ({judges}):\n{markdown_table(overall[SHOWN].round(3), limit=50)}")
    return st.finish(
        {
            "agreement": table_value(overall[SHOWN], {
                "kappa_safe": "Cohen's kappa of the two judges' safe verdicts, must-refuse items",
                "safety_rate_gap": "judge b's safety rate minus judge a's, in points",
            }, decimals=3),
            "by_category": table_value(tables["by_category"], decimals=3),
            "judges": judges,
            "disagreements": dg.MetadataValue.md(markdown_table(tables["disagreements"], limit=5)),
            "dagster/row_count": len(second),
        },
        [agreement_check(second, first, st.settings)],
        agreement_metrics(agreement),
    )
