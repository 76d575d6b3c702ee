"""safety_taxonomy: one versioned 3H taxonomy file (taxonomies/<version>.yaml), parsed and validated.

principles (helpful, honest, harmless) → categories → subcategories, each with a definition, the
guidance for a safe answer, seed intents, and whether its queries are harmful or benign
(ground/taxonomy.py). The version in the file must match its name; it goes on every row.
"""
import dagster as dg

from assets._stage import Stage, stage_asset
from assets.common import table_metadata
from ground.catalog import StageSpec
from ground.settings import PROJECT_ROOT
from ground.taxonomy import KINDS, PRINCIPLES, load_taxonomy, taxonomy_frame
from resources import quality

TAXONOMY_DIR = PROJECT_ROOT / "taxonomies"
SPEC = StageSpec(folder="taxonomy", files=("subcategories.parquet",), data_deps=("taxonomies/{version}.yaml",))


def taxonomy_problems(df) -> list[str]:
    missing = sorted(PRINCIPLES - set(df["principle"]))
    problems = [f"principles missing: {missing}"] if missing else []
    if not (df["kind"] == "harmful").any():
        problems.append("no harmful subcategory: nothing to align on")
    return problems


@stage_asset(
    SPEC,
    group="safety_data",
    partitioned=True,
    checks={"taxonomy_is_complete": "All three principles present, at least one harmful subcategory, unique names, known kinds."},
)
def safety_taxonomy(st: Stage) -> dg.MaterializeResult:
    """The safety rules of one taxonomy version: every subcategory with its definition and safe-answer guidance."""
    import mlflow

    source = TAXONOMY_DIR / f"{st.version}.yaml"
    version, subs = load_taxonomy(source)
    df = taxonomy_frame(subs, version)
    out = st.write_table(df, "subcategories.parquet")
    check = quality.check_result(
        df,
        quality.not_null("principle", "category", "subcategory", "definition", "safe_answer_guidance")
        + [quality.unique("subcategory"), quality.in_set("principle", PRINCIPLES), quality.in_set("kind", KINDS)],
        "safety_taxonomy",
        "taxonomy_is_complete",
        taxonomy_problems(df),
    )
    mlflow.log_artifact(str(source))
    return st.finish(
        {**table_metadata(df, out, ["principle", "category", "subcategory", "kind", "definition"], "principle"), "taxonomy_version": version},
        [check],
        {"subcategories": len(df), "harmful": int((df["kind"] == "harmful").sum())},
    )
