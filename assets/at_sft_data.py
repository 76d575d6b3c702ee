"""at_sft_dataset: VideoSafety-R1's AT-SFT data, built from the pipeline's own train split.

One row per train query: its clip (video and sampled frames), the query, the clip's visual label
and the query's textual label (0 safe, 1 harmful), and the SFT target, which the safe-answer role
writes from the clip's description and the subcategory's guidance: a safe answer where the
combination must be refused (HH, SH, HB), a helpful one where it is benign (SB). It is the same
request preference_pairs makes for its chosen answers, so the role's cache answers it.

Output, for the pipeline and for the authors' code: Parquet, Hugging Face `datasets`
(save_to_disk), and at_sft.json in the authors' shape (their README: `video` a one-item list,
`conversations` from/value turns with `<video>` in the human turn, `safety_labels` {visual,
textual}); video paths there are relative to the project root, their `--data_folder`.
"""
import json
from pathlib import Path

import dagster as dg
import pandas as pd

from assets._stage import Stage, stage_asset
from assets.common import KINDS, counts_table, labelled_rows_check, markdown_table, save_dataset
from ground.catalog import StageData, StageSpec
from ground.settings import PROJECT_ROOT
from ground.taxonomy import item_subs, subcategories_from_frame
from resources.roles import build_role

SPEC = StageSpec(folder="at_sft_data", files=("at_sft.parquet", "dataset/", "at_sft.json"), params=("roles.safe_answerer",))
COLUMNS = [
    "query_id", "clip_id", "video_path", "frames_path", "query", "target", "kind", "visual_label", "textual_label", "harmful",
    "subcategory", "category",
]


def at_sft_rows(train: pd.DataFrame, targets: list[str]) -> pd.DataFrame:
    rows = train.assign(target=targets)
    rows["visual_label"] = rows["visual_label"].astype(int)
    rows["textual_label"] = rows["textual_label"].astype(int)
    rows["harmful"] = rows["harmful"].astype(bool)
    return rows[COLUMNS].reset_index(drop=True)


def authors_path(path: str) -> str:
    """A video path as the authors' loader takes it: relative to the data folder (here the project root)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(PROJECT_ROOT.resolve()))
    except ValueError:
        return str(p)


def authors_json(rows: pd.DataFrame) -> list[dict]:
    """The rows in the authors' training JSON shape."""
    return [
        {
            "id": r.query_id,
            "video": [authors_path(r.video_path)],
            "conversations": [{"from": "human", "value": f"<video>\n{r.query}"}, {"from": "gpt", "value": r.target}],
            "safety_labels": {"visual": int(r.visual_label), "textual": int(r.textual_label)},
        }
        for r in rows.itertuples()
    ]


def data_check(rows: pd.DataFrame) -> dg.AssetCheckResult:
    return labelled_rows_check(rows, COLUMNS, "target", "at_sft_dataset", "at_sft_data_is_usable", [])


@stage_asset(
    SPEC,
    group="videosafety_r1",
    partitioned=True,
    checks={
        "at_sft_data_is_usable": "Visual and textual labels are 0/1, every target is non-empty, every video and frames file "
        "exists, and all four kinds (HH, SH, HB, SB) are present."
    },
)
def at_sft_dataset(st: Stage, adversarial_queries: StageData, safety_taxonomy: StageData) -> dg.MaterializeResult:
    """AT-SFT's training data: train queries with their clip, per-modality safety labels and a safe or helpful target."""
    queries = adversarial_queries.table("queries.parquet")
    train = queries[queries["split"] == "train"].reset_index(drop=True)
    subs = {s.subcategory: s for s in subcategories_from_frame(safety_taxonomy.table("subcategories.parquet"))}
    targets = build_role("safe_answerer", st.settings).answer(list(zip(train["query"], train["description"], item_subs(train, subs))))
    rows = at_sft_rows(train, targets)
    parquet = st.write_table(rows, "at_sft.parquet")
    dataset_dir = save_dataset(rows, st.path("dataset"))
    st.path("at_sft.json").write_text(json.dumps(authors_json(rows), indent=1, ensure_ascii=False))
    counts = {
        "rows": len(rows), **{f"rows_{k}": int((rows["kind"] == k).sum()) for k in KINDS},
        "visual_harmful": int(rows["visual_label"].sum()), "textual_harmful": int(rows["textual_label"].sum()),
        "clips": int(rows["clip_id"].nunique()),
    }
    st.log.info(f"AT-SFT data: {counts}")
    return st.finish(
        {
            "dagster/row_count": len(rows),
            "path": dg.MetadataValue.path(str(parquet)),
            "dataset": dg.MetadataValue.path(str(dataset_dir)),
            "authors_json": dg.MetadataValue.path(str(st.path("at_sft.json"))),
            "counts": dg.MetadataValue.json(counts),
            "per_kind": dg.MetadataValue.md(counts_table(rows, "kind")),
            "preview": dg.MetadataValue.md(markdown_table(rows[["kind", "visual_label", "textual_label", "query", "target"]], limit=8)),
        },
        [data_check(rows)],
        counts,
    )
