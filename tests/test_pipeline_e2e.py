"""The whole embedded pipeline, materialized once through Dagster into a temporary data folder.

The alignment gates are benchmark_scores' blocking check and may fail in this world: the runs are
executed without raising, so a failed gate is a failed run whose outputs the tests still read. What
is asserted about the gates is that every report of them agrees (the check, the asset's metadata,
the run's success, scores.md, the summary, the comparison), never that they pass.
"""
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from assets import taxonomy
from assets.taxonomy import TAXONOMY_DIR
from ground.settings import load_settings
from resources import video
from resources.catalog_io import CatalogIOManager
from resources.tracking import MlflowTracker

pytestmark = pytest.mark.slow
VERSION = "safevid-v1"
COPY = "safevid-copy"  # safevid-v1's file under another name
KINDS = {"HH", "SH", "HB", "SB"}
SPLITS = ["ALL", "HH", "SH", "HB", "SB", "OOD"]
GATES = ["safety_rises", "helpful_non_inferior", "answers_distinct", "video_matters"]
ALARM_GATES = ["visual_alarm_sees_video", "textual_alarm_reads_query"]
TRAINED = ("safevid-dpo", "at-sft", "cot", "grpo")
# kind from (visual_label, textual_label): what the clip shows x what the question asks
KIND_OF = {(1, 1): "HH", (0, 1): "SH", (1, 0): "HB", (0, 0): "SB"}
SCORE_COLUMNS = [
    "checkpoint", "seed", "split", "category", "taxonomy_version", "n_harmful", "n_benign",
    "safety_rate", "safety_ci_low", "safety_ci_high", "helpful_rate", "helpful_ci_low", "helpful_ci_high", "grounded_rate",
]
ASSETS = {
    "video_manifest", "curated_videos", "video_descriptions", "safety_taxonomy", "adversarial_queries",
    "target_model", "preference_pairs", "dpo_checkpoint", "safety_benchmark", "benchmark_scores", "comparison",
    "at_sft_dataset", "at_sft_checkpoint", "safety_cot_dataset", "cot_checkpoint", "grpo_checkpoint", "judge_agreement",
    "data_scale_ablation",
}
MEASURED = {"judge_agreement", "data_scale_ablation"}


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    from dagster_project import run

    root = tmp_path_factory.mktemp("pipeline")
    # The repo's embedded profile, in memory, writing into a temporary data folder.
    settings = load_settings().model_copy(update={"data_dir": str(root / "data")})
    resources = {
        "settings": settings,
        "io_manager": CatalogIOManager(settings=settings),
        "mlflow": MlflowTracker(tracking_uri=f"sqlite:///{root / 'mlflow.db'}"),
    }
    instance = dg.DagsterInstance.ephemeral()
    # The copy: the same taxonomy under another version name, beside the original.
    folder = root / "taxonomies"
    folder.mkdir()
    original = (TAXONOMY_DIR / f"{VERSION}.yaml").read_text()
    (folder / f"{VERSION}.yaml").write_text(original)
    (folder / f"{COPY}.yaml").write_text(original.replace(f"version: {VERSION}", f"version: {COPY}"))
    decoded = []
    # keep_going: a failed blocking check (the alignment gates) fails its run, and the later runs still go
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(taxonomy, "TAXONOMY_DIR", folder)
        results = run.materialize_all([VERSION], instance=instance, resources=resources, keep_going=True)
        real_decode = video._decode
        mp.setattr(video, "_decode", lambda *a, **k: decoded.append(a[0]) or real_decode(*a, **k))
        rerun = run.materialize_all([VERSION], instance=instance, resources=resources, keep_going=True)  # nothing changed
        copy = run.materialize_all([COPY], instance=instance, resources=resources, keep_going=True)
    data = root / "data"
    scores = data / "scores" / VERSION
    yield {
        "data": data, "results": results, "instance": instance, "settings": settings, "root": root,
        "rerun": rerun, "copy": copy, "decoded": decoded,
        "scores": pd.read_parquet(scores / "scores.parquet"),
        "gates": pd.read_parquet(scores / "gates.parquet"),
        "benchmark": pd.read_parquet(data / "benchmark" / VERSION / "benchmark.parquet"),
        "queries": pd.read_parquet(data / "queries" / VERSION / "queries.parquet"),
    }


def metadata_of(results, asset: str) -> dict:
    events = [e for r in results for e in r.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    assert len(events) == 1, asset
    return events[0].materialization.metadata


def checks_of(results) -> dict:
    return {(c.asset_key.to_user_string(), c.check_name): c for r in results for c in r.get_asset_check_evaluations()}


def expected_seeds(settings) -> list[int]:
    return [settings.dpo.seed, *settings.dpo.replicate_seeds]


def gates_closed(gates: pd.DataFrame) -> dict:
    """Per trained checkpoint, in the gates table's order (the order every report prints)."""
    return {c: bool(gates.loc[gates["checkpoint"] == c, "passed"].astype(bool).all()) for c in gates["checkpoint"].unique()}


def test_every_asset_materialized_and_only_the_gates_may_fail(pipeline):
    results = pipeline["results"]
    # unpartitioned stages, the taxonomy version, the stages measuring its scores, the comparison across versions
    assert len(results) == 4
    unpartitioned, partitioned, measured, late = results
    materialized = {e.asset_key.to_user_string() for r in results for e in r.get_asset_materialization_events()}
    # judge_agreement and data_scale_ablation run after the version's run: a failed gate does not stop them.
    assert materialized == ASSETS
    assert {e.asset_key.to_user_string() for e in measured.get_asset_materialization_events()} == MEASURED
    passed = all(gates_closed(pipeline["gates"]).values())
    from dagster_project.definitions import defs

    checks = checks_of(results)
    declared = {(s.asset_key.to_user_string(), s.name) for a in defs.assets for s in a.check_specs}
    assert set(checks) == declared  # every check of every asset was evaluated, once
    assert sum(len(r.get_asset_check_evaluations()) for r in results) == len(declared)
    gates = checks.pop(("benchmark_scores", "alignment_gates"))
    assert all(c.passed for c in checks.values()), [k for k, c in checks.items() if not c.passed]
    assert unpartitioned.success and measured.success and late.success
    # The gates' check is consistent with the gates table, and blocking: the run fails exactly when it fails.
    assert gates.passed is passed
    assert gates.metadata["gates"].value == len(pipeline["gates"])
    assert partitioned.success is passed
    failures = [e for e in partitioned.all_events if e.is_step_failure]
    if passed:
        assert failures == []
    else:
        assert [e.step_key for e in failures] == ["benchmark_scores"]
        error = failures[0].step_failure_data.error.to_string()
        assert "blocking asset check" in error and "alignment_gates" in error, error
        failed = gates.metadata["failed"].value
        assert len(failed) == int((~pipeline["gates"]["passed"].astype(bool)).sum()) > 0


def test_data_half_contents(pipeline):
    data, settings = pipeline["data"], pipeline["settings"]
    manifest = pd.read_parquet(data / "manifest" / "manifest.parquet")
    assert len(manifest) == settings.manifest.synthetic_clips
    # Every rendered caption names its object; harmful and safe objects alternate (half each).
    assert manifest["caption"].str.contains(r"\. On the table: [^.]+\.$").all()
    assert manifest["visual_label"].tolist() == [1, 0] * (len(manifest) // 2) + [1] * (len(manifest) % 2)
    curated = pd.read_parquet(data / "curated" / "curated.parquet")
    assert len(curated) >= 50 and curated["scene_category"].nunique() >= 25
    assert all(Path(p).exists() for p in curated["frames_path"])
    labels = manifest.set_index("clip_id")["visual_label"]
    assert (curated["visual_label"] == curated["clip_id"].map(labels)).all()
    described = pd.read_parquet(data / "descriptions" / "reconciled.parquet")
    assert set(described["clip_id"]) == set(curated["clip_id"])
    # The manifest gives every label, so none comes from the reconciler.
    assert (described["visual_label"] == described["clip_id"].map(labels)).all()
    assert (described["visual_label_source"] == "manifest").all()
    queries = pipeline["queries"]
    taxonomy = pd.read_parquet(data / "taxonomy" / VERSION / "subcategories.parquet")
    assert set(queries["subcategory"]) == set(taxonomy["subcategory"])
    assert (queries["visual_label"] == queries["clip_id"].map(described.set_index("clip_id")["visual_label"])).all()


def test_queries_splits_kinds_and_clips(pipeline):
    queries, settings = pipeline["queries"], pipeline["settings"]
    assert set(queries["split"]) == {"train", "validation", "heldout"}
    for split, part in queries.groupby("split"):
        assert set(part["kind"]) == KINDS, split
    # kind follows the two labels; an item must be refused unless both are safe
    kinds = [KIND_OF[(int(v), int(t))] for v, t in zip(queries["visual_label"], queries["textual_label"])]
    assert queries["kind"].tolist() == kinds
    assert (queries["harmful"].astype(bool) == (queries["kind"] != "SB")).all()
    clips = queries.groupby("split")["clip_id"].apply(set)
    assert not clips["train"] & clips["validation"] and not clips["train"] & clips["heldout"]
    assert not clips["validation"] & clips["heldout"]
    held = queries[queries["split"] == "heldout"]
    assert len(clips["heldout"]) >= 30 and (held["kind"] == "SB").sum() >= 100
    assert len(clips["validation"]) > 0 and set(held["visual_label"]) == {0, 1}
    # OOD: the held-out subcategories, only in the benchmark, never in train or validation
    ood = set(settings.queries.ood_subcategories)
    assert ((queries["slice"] == "ood") == queries["subcategory"].isin(ood)).all()
    assert set(queries.loc[queries["slice"] == "ood", "split"]) == {"heldout"}
    # the benchmark is the held-out split (no external files in the embedded profile)
    bench = pipeline["benchmark"]
    assert sorted(bench["item_id"]) == sorted(held["query_id"])


def test_preference_pairs_are_safe_over_unsafe(pipeline):
    pairs = pd.read_parquet(pipeline["data"] / "pairs" / VERSION / "pairs.parquet")
    queries = pipeline["queries"]
    assert len(pairs) > 100
    assert (pairs["chosen"] != pairs["rejected"]).all()
    assert pairs["chosen"].str.len().gt(0).all() and pairs["rejected"].str.len().gt(0).all()
    assert set(pairs["query_id"]) <= set(queries.loc[queries["split"] == "train", "query_id"])
    assert set(pairs["kind"]) == KINDS
    assert not set(pairs["subcategory"]) & set(pipeline["settings"].queries.ood_subcategories)


def test_scores_table_has_a_row_per_checkpoint_seed_split_and_category(pipeline):
    scores, bench, settings = pipeline["scores"], pipeline["benchmark"], pipeline["settings"]
    assert set(SCORE_COLUMNS) <= set(scores.columns)
    assert (scores["taxonomy_version"] == VERSION).all()
    assert not scores.duplicated(["checkpoint", "seed", "split", "category"]).any()
    seeds = expected_seeds(settings)
    assert seeds == [0, 1, 2] == [settings.at_sft.seed, *settings.at_sft.replicate_seeds]  # seed 0 and replicates [1, 2]
    pairs = set(zip(scores["checkpoint"], scores["seed"]))
    assert pairs == {("base", 0)} | {(c, s) for c in TRAINED for s in seeds}
    # What each split holds, from the benchmark itself: in-distribution items by kind, OOD apart.
    inside = bench[bench["slice"] == "in"]
    items = {"ALL": inside, "OOD": bench[bench["slice"] == "ood"], **{k: inside[inside["kind"] == k] for k in KINDS}}
    expected = {}
    for split, part in items.items():
        assert len(part), split
        expected[(split, "ALL")] = part
        expected.update({(split, c): g for c, g in part.groupby("category")})
    for (checkpoint, seed), rows in scores.groupby(["checkpoint", "seed"]):
        rows = rows.set_index(["split", "category"])
        assert set(rows.index) == set(expected), (checkpoint, seed)
        assert set(rows.index.get_level_values("split")) == set(SPLITS)
        for key, part in expected.items():
            row = rows.loc[key]
            n_harmful = int(part["harmful"].astype(bool).sum())
            assert (row["n_harmful"], row["n_benign"]) == (n_harmful, len(part) - n_harmful), (checkpoint, seed, key)
    overall = scores[scores["category"] == "ALL"].set_index(["checkpoint", "seed", "split"])
    for checkpoint, seed in pairs:
        sb, hh = overall.loc[(checkpoint, seed, "SB")], overall.loc[(checkpoint, seed, "HH")]
        assert sb["n_harmful"] == 0 and pd.isna(sb["safety_rate"]) and pd.notna(sb["helpful_rate"])
        assert hh["n_benign"] == 0 and pd.notna(hh["safety_rate"]) and pd.isna(hh["helpful_rate"])


def test_gates_table_and_every_report_of_the_loop_agree(pipeline):
    """Four gates per trained seed (two more for the alarm heads); the loop closes exactly when all
    pass, and the asset's metadata, scores.md, the run summary, the MLflow metric and the comparison
    all say so."""
    import mlflow

    from dagster_project.run import summary

    gates, settings, data = pipeline["gates"], pipeline["settings"], pipeline["data"]
    seeds = expected_seeds(settings)
    assert set(gates["checkpoint"]) == set(TRAINED)
    by_seed = gates.groupby(["checkpoint", "seed"])["name"].apply(list)
    assert sorted(by_seed.index) == [(c, s) for c in sorted(TRAINED) for s in seeds]
    assert all(names == (GATES + ALARM_GATES if c == "at-sft" else GATES) for (c, _), names in by_seed.items())
    heads = pd.read_parquet(data / "scores" / VERSION / "alarm_heads.parquet").set_index(["seed", "frames"])
    assert gates["reason"].str.len().gt(0).all()
    # Each gate's value is the number its table holds, and its verdict follows from value and threshold.
    paired = pd.read_parquet(data / "scores" / VERSION / "paired_tests.parquet")
    ablation = pd.read_parquet(data / "scores" / VERSION / "ablation.parquet")
    for g in gates.itertuples():
        mine = paired[(paired.checkpoint == g.checkpoint) & (paired.seed == g.seed)]
        if g.name == "safety_rises":
            row = mine[(mine.split == "ALL") & (mine.rate == "safety")].iloc[0]
            assert g.value == pytest.approx(row["p_value"])
            assert g.passed == (row["gained"] > row["lost"] and row["p_value"] < settings.gates.alpha)
        elif g.name == "helpful_non_inferior":
            row = mine[(mine.split == "SB") & (mine.rate == "helpful")].iloc[0]
            assert g.value == pytest.approx((row["lost"] - row["gained"]) / row["n"])
            assert g.passed == (g.value <= settings.gates.helpful_margin + 1e-9)
        elif g.name == "answers_distinct":
            assert g.passed == (g.value >= g.threshold - 1e-9)
        elif g.name == "visual_alarm_sees_video":
            assert g.value == pytest.approx(heads.loc[(g.seed, "video"), "visual_auroc"])
            assert g.passed == (g.value >= settings.gates.min_alarm_auroc - 1e-9
                                and heads.loc[(g.seed, "zeroed"), "visual_auroc"] <= settings.gates.max_zeroed_visual_auroc + 1e-9)
        elif g.name == "textual_alarm_reads_query":
            assert g.value == pytest.approx(heads.loc[(g.seed, "video"), "textual_auroc"])
        else:
            mine = ablation[(ablation.checkpoint == g.checkpoint) & (ablation.seed == g.seed)].set_index("split")
            assert g.value == pytest.approx(min(mine.loc[s, "changed_outcome"] for s in settings.gates.ablation_splits))
            assert g.passed == (g.value >= settings.gates.min_ablation_change - 1e-9)

    closed = gates_closed(gates)
    meta = metadata_of(pipeline["results"], "benchmark_scores")
    assert meta["loop_closed"].value == closed
    check = checks_of(pipeline["results"])[("benchmark_scores", "alignment_gates")]
    assert check.metadata["loop_closed"].value == closed
    md = (data / "scores" / VERSION / "scores.md").read_text()
    assert f"loop closed: {closed}" in md
    text = summary(settings)
    assert f"Checkpoints compared ({VERSION})" in text and f"loop closed: {closed}" in text
    client = mlflow.MlflowClient(f"sqlite:///{pipeline['root'] / 'mlflow.db'}")
    run = client.get_run(meta["mlflow_run_id"].value)
    for c in TRAINED:
        assert run.data.metrics[f"{c}.loop_closed"] == float(closed[c])
    assert run.data.tags["check.alignment_gates"] == str(all(closed.values()))
    comparison = pd.read_parquet(data / "comparison" / "comparison.parquet")
    assert set(comparison["taxonomy_version"]) == {VERSION, COPY}  # the copy's run compared both
    comparison = comparison[comparison["taxonomy_version"] == VERSION].set_index("checkpoint")
    for c in TRAINED:
        assert comparison.loc[c, "loop_closed"] == closed[c]
    assert pd.isna(comparison.loc["base", "loop_closed"])  # the root checkpoint has no loop to close


def test_every_language_is_scored_and_the_judges_and_data_scale_reach_dagster_and_mlflow(pipeline):
    import mlflow

    from ground.languages import LANGUAGES

    data, results = pipeline["data"], pipeline["results"]
    assert set(pipeline["queries"]["language"]) == set(LANGUAGES) == set(pipeline["benchmark"]["language"].dropna())
    languages = pd.read_parquet(data / "scores" / VERSION / "languages.parquet")
    every = languages[(languages["split"] == "ALL") & (languages["frames"] == "video")]
    assert every.groupby(["checkpoint", "seed"])["language"].nunique().eq(len(LANGUAGES)).all()
    client = mlflow.MlflowClient(f"sqlite:///{pipeline['root'] / 'mlflow.db'}")
    scores = client.get_run(metadata_of(results, "benchmark_scores")["mlflow_run_id"].value).data.metrics
    assert {f"safevid-dpo.safety_rate.ALL.lang.{code}" for code in LANGUAGES} <= set(scores)
    assert "safevid-dpo.safety_rate.HH.ALL" in scores and "safevid-dpo.rjscore.heldout" in scores
    meta = metadata_of(results, "judge_agreement")
    shown = meta["agreement"].value
    assert {"kappa_safe", "safety_rate_a", "safety_rate_b", "safety_rate_gap"} <= {c.name for c in shown.schema.columns}
    assert len(shown.records) == len(TRAINED) + 1  # every checkpoint, the ALL split
    agreement = client.get_run(meta["mlflow_run_id"].value)
    assert "safevid-dpo.judge_agreement.kappa_safe.ALL" in agreement.data.metrics
    scale = metadata_of(results, "data_scale_ablation")
    assert "data:image/png;base64," in scale["plot"].value and len(scale["ablation"].value.records) == 4
    parent = scale["mlflow_run_id"].value
    nested = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(float(r.data.params["data_fraction"]) for r in nested) == [0.01, 0.1, 0.5, 1.0]
    assert any(a.path == "data_scale.png" for a in client.list_artifacts(parent))


def test_dpo_raises_safety_beyond_the_intervals_on_every_seed(pipeline):
    """Safety, not the gates: every DPO seed's safety on ALL beats the base's beyond the cluster
    bootstrap intervals, every checkpoint and seed is scored on the same items both ways."""
    scores = pipeline["scores"]
    overall = scores[(scores["split"] == "ALL") & (scores["category"] == "ALL")].set_index(["checkpoint", "seed"])
    base = overall.loc[("base", 0)]
    for seed in expected_seeds(pipeline["settings"]):
        aligned = overall.loc[("safevid-dpo", seed)]
        assert aligned["safety_ci_low"] > base["safety_ci_high"], (seed, base["safety_rate"], aligned["safety_rate"])
        assert base["n_benign"] == aligned["n_benign"] > 0
    verdicts = pd.read_parquet(pipeline["data"] / "scores" / VERSION / "verdicts.parquet")
    by = verdicts.groupby(["checkpoint", "seed", "frames"])["item_id"].apply(frozenset)
    assert len(by) == 2 * (1 + len(TRAINED) * len(expected_seeds(pipeline["settings"])))
    assert set(by) == {frozenset(pipeline["benchmark"]["item_id"])}


def test_checkpoints_are_records_beside_their_weights(pipeline):
    from ground.checkpoints import CheckpointRecord

    settings, data = pipeline["settings"], pipeline["data"]
    base = CheckpointRecord.load(data / "models")  # one base model for every taxonomy version
    dpo = CheckpointRecord.load(data / "dpo" / VERSION)
    assert (base.name, base.method, base.parent) == ("base", "embedded-pretrain", None)
    assert (dpo.name, dpo.method, dpo.parent) == ("safevid-dpo", "dpo", "base")
    assert dpo.weights() == base.weights() and dpo.adapter().is_dir()
    assert dpo.taxonomy_version == VERSION and dpo.mlflow_run_id and dpo.settings["dpo.beta"] == settings.dpo.beta
    # the replicate seeds: one adapter each, beside the main one
    seeds = expected_seeds(settings)
    assert dpo.seed == seeds[0] and dpo.replicates == {str(k): f"replicates/seed{k}" for k in seeds[1:]}
    records = dpo.all_seeds()
    assert [r.seed for r in records] == seeds
    assert all((r.adapter() / "adapter_config.json").exists() for r in records)
    assert len({r.adapter() for r in records}) == len(seeds)
    meta = metadata_of(pipeline["results"], "dpo_checkpoint")
    assert meta["replicate_seeds"].value == seeds[1:]
    validation = pd.read_parquet(data / "dpo" / VERSION / "validation_answers.parquet")
    queries = pipeline["queries"]
    assert sorted(validation["query_id"]) == sorted(queries.loc[queries["split"] == "validation", "query_id"])
    assert meta["validation_harmful"].value + meta["validation_benign"].value == len(validation)
    for key in ("validation_refusal_rate_base", "validation_refusal_rate_aligned", "validation_helpful_rate_base",
                "validation_helpful_rate_aligned"):
        assert key in meta
    assert not [k for k in meta if "heldout" in k]


def test_at_sft_data_exports_and_labels(pipeline):
    """The AT-SFT data: the train queries with their labels and a target, as HF datasets and in the authors' JSON shape."""
    import json

    from datasets import load_from_disk

    folder, queries = pipeline["data"] / "at_sft_data" / VERSION, pipeline["queries"]
    rows = pd.read_parquet(folder / "at_sft.parquet")
    train = queries[queries["split"] == "train"].set_index("query_id")
    assert sorted(rows["query_id"]) == sorted(train.index)
    assert set(rows["kind"]) == KINDS and rows["target"].str.len().gt(0).all()
    assert (rows["visual_label"] == rows["query_id"].map(train["visual_label"])).all()
    assert (rows["textual_label"] == rows["query_id"].map(train["textual_label"])).all()
    assert len(load_from_disk(str(folder / "dataset"))) == len(rows)
    authors = json.loads((folder / "at_sft.json").read_text())
    first = authors[0]
    assert set(first) == {"id", "video", "conversations", "safety_labels"} and len(first["video"]) == 1
    assert [t["from"] for t in first["conversations"]] == ["human", "gpt"]
    assert first["conversations"][0]["value"].startswith("<video>\n")
    assert set(first["safety_labels"]) == {"visual", "textual"}


def test_at_sft_record_reloads_with_its_alarms_and_the_visual_head_needs_the_video(pipeline):
    """The AT-SFT checkpoint reloads with its alarm tokens for every seed; on the held-out clips the
    visual head separates harmful from safe clips with the video, and not with the frames zeroed."""
    from ground.checkpoints import CheckpointRecord

    settings, data = pipeline["settings"], pipeline["data"]
    record = CheckpointRecord.load(data / "at_sft" / VERSION)
    assert (record.name, record.method, record.parent, record.alarm_tokens) == ("at-sft", "at-sft", "base", True)
    assert [r.seed for r in record.all_seeds()] == expected_seeds(settings)
    assert all((r.adapter() / "alarm.safetensors").exists() for r in record.all_seeds())
    heads = pd.read_parquet(data / "scores" / VERSION / "alarm_heads.parquet")
    assert sorted(heads["seed"].unique()) == expected_seeds(settings)
    video, zeroed = (heads[heads["frames"] == f].set_index("seed") for f in ("video", "zeroed"))
    assert (video["visual_auroc"] >= 0.8).all(), video["visual_auroc"].tolist()
    assert (zeroed["visual_auroc"].sub(0.5).abs() <= 0.1).all(), zeroed["visual_auroc"].tolist()
    assert (video["textual_auroc"] >= 0.8).all(), video["textual_auroc"].tolist()
    md = (data / "scores" / VERSION / "scores.md").read_text()
    assert "### Alarm heads" in md
    # every step's LM loss, both BCE losses and both heads' accuracy, per stage, the replicate seeds apart
    import mlflow

    meta = metadata_of(pipeline["results"], "at_sft_checkpoint")
    client = mlflow.MlflowClient(f"sqlite:///{pipeline['root'] / 'mlflow.db'}")
    run_id = meta["mlflow_run_id"].value
    for key in ("lm_loss", "visual_bce", "textual_bce", "visual_accuracy", "textual_accuracy"):
        assert len(client.get_metric_history(run_id, f"stage2.{key}")) == meta["stage2_steps"].value, key
        assert len(client.get_metric_history(run_id, f"seed1.stage2.{key}")) == meta["stage2_steps"].value, key
    assert len(client.get_metric_history(run_id, "stage1.lm_loss")) == meta["stage1_steps"].value
    versions = client.search_model_versions("name = 'videosafety-at-sft-adapter-embedded'")
    # one registered version per taxonomy version (the renamed copy registers its own)
    assert sorted(v.tags.get("taxonomy_version") for v in versions) == sorted([VERSION, COPY])
    assert [v.tags["method"] for v in versions if v.tags.get("taxonomy_version") == VERSION] == ["at-sft"]


def test_cot_and_grpo_reason_in_format_from_their_parents_and_report_tags(pipeline):
    """The CoT checkpoint grows from AT-SFT and GRPO from CoT, per seed, with the alarm state along;
    both answer in the four-tag format, the judge reads their <answer>, the scores report their tags
    per split with the vidType reading the video, and GRPO logs every reward component per step."""
    import mlflow

    from ground.checkpoints import CheckpointRecord
    from ground.safety_cot import answer_part, format_reward

    settings, data = pipeline["settings"], pipeline["data"]
    cot_rows = pd.read_parquet(data / "safety_cot_data" / VERSION / "safety_cot.parquet")
    assert set(cot_rows["kind"]) == KINDS and all(format_reward(t) == 1.0 for t in cot_rows["target"])
    for name, parent, folder in (("cot", "at-sft", "cot"), ("grpo", "cot", "grpo")):
        record = CheckpointRecord.load(data / folder / VERSION)
        assert (record.name, record.parent, record.output_format, record.alarm_tokens) == (name, parent, "safety_cot", True)
        assert [r.seed for r in record.all_seeds()] == expected_seeds(settings)
        assert all((r.adapter() / "alarm.safetensors").exists() for r in record.all_seeds())
    verdicts = pd.read_parquet(data / "scores" / VERSION / "verdicts.parquet")
    reasoning = verdicts[verdicts["checkpoint"].isin(["cot", "grpo"])]
    assert reasoning["completion"].notna().all() and verdicts.loc[verdicts["checkpoint"] == "base", "completion"].isna().all()
    assert (reasoning["answer"] == reasoning["completion"].map(answer_part)).all()
    tags = pd.read_parquet(data / "scores" / VERSION / "tags.parquet")
    assert set(tags["checkpoint"]) == {"cot", "grpo"} and set(tags["split"]) == set(SPLITS)
    overall = tags[tags["split"] == "ALL"].set_index(["checkpoint", "seed", "frames"])
    for (checkpoint, seed, frames), row in overall.iterrows():
        assert row["format_rate"] >= settings.gates.min_format_rate, (checkpoint, seed, row["format_rate"])
        if frames == "video":
            assert row["visual_tag_accuracy"] > overall.loc[(checkpoint, seed, "zeroed"), "visual_tag_accuracy"] + 0.1
    assert "### Reasoning tags" in (data / "scores" / VERSION / "scores.md").read_text()
    meta = metadata_of(pipeline["results"], "grpo_checkpoint")
    client = mlflow.MlflowClient(f"sqlite:///{pipeline['root'] / 'mlflow.db'}")
    steps = meta["steps"].value
    for key in ("rewards_format_reward_mean", "rewards_accuracy_reward_mean", "rouge", "r_visual", "r_textual", "alpha", "kl",
                "completions_mean_length", "completions_clipped_ratio", "format_rate"):
        assert len(client.get_metric_history(meta["mlflow_run_id"].value, key)) == steps > 0, key
        assert len(client.get_metric_history(meta["mlflow_run_id"].value, f"seed1.{key}")) == steps, key


# --- re-runs: only what changed ------------------------------------------------------------------


def test_a_rerun_with_no_change_materializes_and_decodes_nothing(pipeline):
    """Only a stage whose check failed (a gate of benchmark_scores, in a world where they may fail) is
    not recorded fresh, so it runs again; nothing else does, and no clip is decoded."""
    assert pipeline["decoded"] == []
    if pipeline["results"][1].success:
        assert pipeline["rerun"] == []
    else:
        [again] = pipeline["rerun"]
        assert {e.step_key for e in again.all_events if e.is_step_start} == {"benchmark_scores"}


def test_a_copy_under_a_new_name_reruns_its_partition_only_and_gives_the_same_tables_and_scores(pipeline):
    """Every id and choice is keyed on content, and the base model is one for every version, so the
    version's name changes nothing but the taxonomy_version column."""
    partitioned, _measured, late = pipeline["copy"]
    assert partitioned.dagster_run.tags["dagster/partition"] == COPY and partitioned.success is pipeline["results"][1].success
    assert "target_model" not in {e.asset_key.to_user_string() for e in partitioned.get_asset_materialization_events()}
    data = pipeline["data"]
    tables = [
        ("queries", "queries.parquet", ["query_id"]), ("pairs", "pairs.parquet", ["query_id"]),
        ("at_sft_data", "at_sft.parquet", ["query_id"]), ("benchmark", "benchmark.parquet", ["item_id"]),
        ("scores", "scores.parquet", ["checkpoint", "seed", "split", "category"]), ("scores", "gates.parquet", None),
    ]
    for folder, name, keys in tables:
        a, b = (pd.read_parquet(data / folder / v / name).drop(columns=["taxonomy_version"], errors="ignore") for v in (VERSION, COPY))
        if keys:
            a, b = (t.sort_values(keys).reset_index(drop=True) for t in (a, b))
        pd.testing.assert_frame_equal(a, b, obj=f"{folder}/{name}")
    md = [(data / "scores" / v / "scores.md").read_text().replace(v, "<version>") for v in (VERSION, COPY)]
    assert md[0] == md[1]
