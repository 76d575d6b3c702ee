"""safety_cot_dataset: VideoSafety-R1's reasoning targets (stage 3) and RL prompts (stage 4).

One row per AT-SFT row: the same clip, query, labels and safe-or-helpful answer, and a target in
the authors' format, `<think>reasoning</think><answer>answer</answer><vidType>v</vidType>
<textType>t</textType>` (ground/safety_cot.py). The safe-answer role writes the reasoning from the
reconciled description and the subcategory's guidance (offline: resources/prompts/offline_writer.yaml;
an endpoint: resources/prompts/safety_reasoning.md); the tags are the clip's and the query's labels.
GRPO reads the same rows: `prompt` is the query, `reference` the answer its ROUGE is measured
against. A reasoning the role failed to write is recorded and its row left out.
"""
import dagster as dg
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import KINDS, counts_table, labelled_rows_check, markdown_table, save_dataset
from ground import safety_cot
from ground.catalog import StageData, StageSpec
from ground.roles import ReasoningRequest
from ground.taxonomy import item_subs, subcategories_from_frame
from resources.roles import build_role, failure_records, too_many_failures

SPEC = StageSpec(folder="safety_cot_data", files=("safety_cot.parquet", "failed.parquet", "dataset/"), params=("roles.safe_answerer",))
COLUMNS = [
    "query_id", "clip_id", "video_path", "frames_path", "query", "prompt", "reasoning", "reference", "target", "kind",
    "visual_label", "textual_label", "harmful", "subcategory", "category",
]


def reasoning_requests(rows: pd.DataFrame, subs: dict) -> list[ReasoningRequest]:
    return [
        ReasoningRequest(r.query, r.description, sub, r.target, int(r.visual_label), int(r.textual_label))
        for r, sub in zip(rows.itertuples(), item_subs(rows, subs))
    ]


def cot_rows(rows: pd.DataFrame, reasoning: list[str], failures: list | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rows with their CoT target, the rows whose reasoning failed or came back empty, with the
    role's failure record)."""
    rows = rows.assign(reasoning=[r.strip() for r in reasoning], reference=rows["target"], prompt=rows["query"],
                       failure=failures if failures is not None else [None] * len(rows))
    failed = rows[(rows["reasoning"] == "") | rows["failure"].notna()]
    kept = rows[(rows["reasoning"] != "") & rows["failure"].isna()].copy()
    kept["target"] = [
        safety_cot.cot_target(r.reasoning, r.reference, r.visual_label, r.textual_label) for r in kept.itertuples()
    ]
    return kept[COLUMNS].reset_index(drop=True), failed[["query_id", "query", "failure"]].reset_index(drop=True)


def target_problems(rows: pd.DataFrame) -> list[str]:
    """Every target in the exact four-tag format, its tags the row's labels, its answer the reference."""
    problems = []
    bad_format = rows[[safety_cot.format_reward(t) != 1.0 for t in rows["target"]]]
    if len(bad_format):
        problems.append(f"{len(bad_format)} targets are not in the four-tag format, e.g. {bad_format['query_id'].iloc[0]}")
    for tag, column in (("vidType", "visual_label"), ("textType", "textual_label")):
        wrong = sum(safety_cot.label_of(t, tag) != int(v) for t, v in zip(rows["target"], rows[column]))
        if wrong:
            problems.append(f"{wrong} targets state a {tag} other than the row's {column}")
    mismatched = sum(safety_cot.answer_part(t) != a.strip() for t, a in zip(rows["target"], rows["reference"]))
    if mismatched:
        problems.append(f"{mismatched} targets' <answer> differs from their reference answer")
    return problems


def data_check(rows: pd.DataFrame, failure_problems: list[str] = ()) -> dg.AssetCheckResult:
    return labelled_rows_check(rows, COLUMNS, "reasoning", "safety_cot_dataset", "safety_cot_data_is_usable",
                               target_problems(rows) + list(failure_problems))


@stage_asset(
    SPEC,
    group="videosafety_r1",
    partitioned=True,
    checks={
        "safety_cot_data_is_usable": "Every target is in the exact <think>/<answer>/<vidType>/<textType> format, states the "
        "row's two labels and its reference answer, every reasoning is non-empty, every video and frames file exists, and "
        "all four kinds are present."
    },
)
def safety_cot_dataset(st: Stage, at_sft_dataset: StageData, adversarial_queries: StageData, safety_taxonomy: StageData) -> dg.MaterializeResult:
    """Reasoning targets for the CoT cold start and prompts with references for GRPO, from the AT-SFT rows."""
    at_sft = at_sft_dataset.table("at_sft.parquet")
    descriptions = adversarial_queries.table("queries.parquet").set_index("query_id")["description"]
    rows = at_sft.assign(description=descriptions.reindex(at_sft["query_id"]).to_numpy())
    subs = {s.subcategory: s for s in subcategories_from_frame(safety_taxonomy.table("subcategories.parquet"))}
    answerer = build_role("safe_answerer", st.settings)
    kept, failed = cot_rows(rows, answerer.reason(reasoning_requests(rows, subs)), failure_records(answerer, len(rows)))
    if len(failed):
        st.log.warning(f"{len(failed)} reasonings failed and their rows were left out, e.g. {failed['query_id'].iloc[0]}: "
                       f"{failed['failure'].iloc[0]}")
    too_many = too_many_failures(st.settings, "safe_answerer", int(failed["failure"].notna().sum()), len(rows))
    parquet = st.write_table(kept, "safety_cot.parquet")
    st.write_table(failed, "failed.parquet")
    dataset_dir = save_dataset(kept, st.path("dataset"))
    counts = {"rows": len(kept), "failed_reasonings": len(failed), **{f"rows_{k}": int((kept["kind"] == k).sum()) for k in KINDS}}
    st.log.info(f"safety CoT data: {counts}")
    return st.finish(
        {
            "dagster/row_count": len(kept),
            "path": dg.MetadataValue.path(str(parquet)),
            "dataset": dg.MetadataValue.path(str(dataset_dir)),
            "counts": dg.MetadataValue.json(counts),
            "failed": dg.MetadataValue.md(markdown_table(failed, limit=10) if len(failed) else "_none_"),
            "per_kind": dg.MetadataValue.md(counts_table(kept, "kind")),
            "preview": dg.MetadataValue.md(markdown_table(kept[["kind", "query", "target"]], limit=8, width=160)),
        },
        [data_check(kept, too_many)],
        counts,
    )
