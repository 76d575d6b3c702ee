import math

import pandas as pd
import pytest

from assets.scores import judged, ordered, score_problems
from ground.taxonomy import judge_subcategories
from ground.checkpoints import CheckpointRecord
from ground.evaluation import rollup, wilson


def test_wilson_interval_brackets_the_rate_and_stays_in_unit_range():
    # 9 of 10: the Wilson score interval's textbook value, asymmetric around 0.9
    assert wilson(9, 10) == pytest.approx((0.5958, 0.9821), abs=1e-4)
    assert wilson(0, 5)[0] == 0 and wilson(5, 5)[1] == 1
    assert all(math.isnan(v) for v in wilson(0, 0))


def _verdicts(n_repeat: int = 1):
    rows = []
    for name, safe_flags in (("base", [False, False, True, None]), ("safevid-dpo", [True, True, True, True])):
        for r in range(n_repeat):
            for i, s in enumerate(safe_flags):
                rows.append({"item_id": f"{r}.{i}", "checkpoint": name, "category": "violence" if i < 2 else "theft", "harmful": True,
                             "safe": s, "helpful": False, "failure": "unparseable" if s is None else None})
            rows.append({"item_id": f"{r}.b", "checkpoint": name, "category": "everyday", "harmful": False, "safe": True,
                         "helpful": name == "base", "failure": None})
    return pd.DataFrame(rows)


def test_judge_failures_count_against_safety():
    scores = rollup(_verdicts()).set_index(["checkpoint", "category"])
    assert scores.loc[("base", "ALL"), "safety_rate"] == pytest.approx(0.25)
    assert scores.loc[("base", "theft"), "judge_failures"] == 1
    assert scores.loc[("safevid-dpo", "ALL"), "helpful_rate"] == 0.0
    assert scores.loc[("base", "ALL"), "helpful_rate"] == 1.0


# side_by_side / loop_closed moved to ground/gates.py (evaluate_gates, loop_closed, results_markdown):
# tests/test_gates.py covers the change per split, the intervals that must separate, and the markdown.


def _scored(checkpoints=(("base", 0), ("safevid-dpo", 0), ("safevid-dpo", 1)), items=("i1", "i2", "i3")) -> pd.DataFrame:
    """Every (checkpoint, seed) judged on the same items with real and zeroed frames, all decided."""
    rows = [
        {"item_id": i, "checkpoint": c, "seed": s, "frames": f, "harmful": i != "i3", "safe": True, "failure": None}
        for c, s in checkpoints for f in ("video", "zeroed") for i in items
    ]
    return pd.DataFrame(rows).astype({"safe": object, "failure": object})


def test_score_problems_none_when_every_checkpoint_seed_and_frame_saw_the_same_items():
    assert score_problems(_scored(), ["base", "safevid-dpo"]) == []


def test_score_problems_report_different_item_sets_across_seeds_and_frames():
    frame = _scored()
    missing_seed = frame.drop(frame[(frame["seed"] == 1) & (frame["item_id"] == "i2")].index)
    assert score_problems(missing_seed, ["base", "safevid-dpo"]) == [
        f"safevid-dpo seed 1 ({f} frames) was scored on different items than base" for f in ("video", "zeroed")
    ]
    missing_zeroed = frame.drop(frame[(frame["checkpoint"] == "base") & (frame["frames"] == "zeroed") & (frame["item_id"] == "i1")].index)
    [problem] = score_problems(missing_zeroed, ["base", "safevid-dpo"])
    assert problem.startswith("base seed 0 (zeroed frames)")
    extra = pd.concat([frame, frame.tail(1).assign(item_id="i4")], ignore_index=True)  # the last group: safevid-dpo seed 1, zeroed
    [problem] = score_problems(extra, ["base", "safevid-dpo"])
    assert problem.startswith("safevid-dpo seed 1 (zeroed frames)")


def test_score_problems_report_undecided_harmful_items_and_nothing_to_compare():
    frame = _scored()
    frame.loc[(frame["item_id"] == "i1") & (frame["seed"] == 1), "safe"] = None  # no verdict, no failure recorded
    frame.loc[(frame["item_id"] == "i2") & (frame["seed"] == 1), ["safe", "failure"]] = [None, "unparseable"]  # a recorded failure
    frame.loc[frame["item_id"] == "i3", "safe"] = None  # benign: safety is not asked of it
    assert score_problems(frame, ["base", "safevid-dpo"]) == ["2 harmful items have neither a verdict nor a recorded failure"]
    only_base = _scored(checkpoints=(("base", 0),))
    assert score_problems(only_base, ["base"]) == ["only ['base'] to score: nothing to compare against the base"]


def test_judged_rows_carry_checkpoint_seed_frames_and_kind_as_split():
    from ground.roles import Verdict

    bench = pd.DataFrame({"item_id": ["a", "b"], "kind": ["HB", "SB"], "harmful": [True, False]})
    rec = CheckpointRecord(name="safevid-dpo", method="dpo", base_model="m", base_model_local=False, taxonomy_version="v", seed=3)
    verdicts = [Verdict(safe=True, helpful=True, rationale="ok"), Verdict(safe=None, helpful=None, failure="unparseable")]
    out = judged(bench, rec, "zeroed", ["no", "yes"], ["no", "yes"], verdicts, "offline")
    assert out[["checkpoint", "seed", "frames", "judge"]].drop_duplicates().values.tolist() == [["safevid-dpo", 3, "zeroed", "offline"]]
    assert out["split"].tolist() == ["HB", "SB"] and out["answer"].tolist() == ["no", "yes"]
    assert out["safe"].tolist() == [True, None]
    assert out["failure"].isna().tolist() == [True, False] and out["failure"].iloc[1] == "unparseable"
    unseeded = judged(bench, rec.model_copy(update={"seed": None}), "video", ["x", "y"], ["x", "y"], verdicts, "offline")
    assert set(unseeded["seed"]) == {0}


def test_judge_subcategories_answer_to_subcategory_and_category_names():
    from assets.taxonomy import TAXONOMY_DIR
    from ground.taxonomy import load_taxonomy

    _, subs = load_taxonomy(TAXONOMY_DIR / "safevid-v1.yaml")
    by_name = judge_subcategories(subs)
    assert all(by_name[s.subcategory] is s for s in subs)
    # An external item may name only a category: it gets that category's first subcategory.
    assert by_name["violence"].subcategory == "physical_harm" and by_name["dangerous_context"].subcategory == "dangerous_objects"


def test_roots_come_first():
    def rec(name, parent):
        return CheckpointRecord(name=name, method="x", base_model="m", base_model_local=False, parent=parent, taxonomy_version="v")

    assert [r.name for r in ordered([rec("a-dpo", "base"), rec("base", None), rec("at-sft", "base")])] == ["base", "a-dpo", "at-sft"]


def test_cluster_bootstrap_is_wider_when_items_share_a_clip():
    from ground.evaluation import cluster_bootstrap

    # 40 items: 10 clips of 4 identical outcomes each vs 40 independent items, same 50% rate.
    hits = [c % 2 == 0 for c in range(10) for _ in range(4)]
    lo_c, hi_c = cluster_bootstrap(hits, [c for c in range(10) for _ in range(4)])
    lo_i, hi_i = cluster_bootstrap(hits, list(range(40)))
    assert lo_c <= 0.5 <= hi_c and (hi_c - lo_c) > 1.5 * (hi_i - lo_i)
    assert cluster_bootstrap(hits, list(range(40))) == (lo_i, hi_i)  # seeded
    assert all(math.isnan(v) for v in cluster_bootstrap([], []))


def test_mcnemar_counts_only_discordant_pairs():
    from ground.evaluation import mcnemar

    before, after = [False] * 20 + [True] * 5, [True] * 20 + [True] * 5
    test = mcnemar(before, after)
    assert (test["gained"], test["lost"]) == (20, 0) and test["p_value"] < 1e-5
    assert mcnemar([True, False], [False, True])["p_value"] == 1.0
    assert mcnemar([True] * 3, [True] * 3) == {"gained": 0, "lost": 0, "p_value": 1.0}
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_paired_tests_compare_each_checkpoint_with_the_base():
    from ground.evaluation import paired_tests

    tests = paired_tests(_verdicts(n_repeat=10), "base").set_index("rate")
    assert tests.loc["safety", "gained"] == 30 and tests.loc["safety", "lost"] == 0 and tests.loc["safety", "p_value"] < 1e-6
    assert tests.loc["helpful", "lost"] == 10 and tests.loc["helpful", "p_value"] < 0.01


# --- external benchmark files: reported apart, per source and topic --------------------------------

def _held_and_external(external: bool = True) -> pd.DataFrame:
    """Held-out items (6 in-distribution HH and SB on 3 clips, 2 OOD) and, with `external`, a video source
    of 3 items on 2 topics and a text-only source of 10 items; base and dpo, real and zeroed frames."""
    items = [{"item_id": f"h{i}", "video_path": f"c{i % 3}.mp4", "split": "HH" if i < 4 else "SB", "slice": "in",
              "category": "theft" if i < 4 else "everyday", "harmful": i < 4, "source": "heldout", "topic": "theft"} for i in range(6)]
    items += [{"item_id": f"o{i}", "video_path": f"o{i}.mp4", "split": "SH", "slice": "ood", "category": "deception",
               "harmful": True, "source": "heldout", "topic": "fraud"} for i in range(2)]
    if external:
        items += [{"item_id": f"v{i}", "video_path": "bike.mp4", "split": "HB", "slice": "external", "category": "illegal_activity",
                   "harmful": True, "source": "vsb.jsonl", "topic": "Theft" if i < 2 else "Fake Notices"} for i in range(3)]
        items += [{"item_id": f"t{i}", "video_path": "", "split": "SH", "slice": "external", "category": "deception",
                   "harmful": True, "source": "jbb", "topic": "Fraud"} for i in range(10)]
    rows = [{**item, "checkpoint": name, "seed": 0, "frames": frames, "safe": name == "dpo" or n % 2 == 0, "helpful": True,
             "failure": None, "answer": f"{name} {frames} {item['item_id']}"}
            for name in ("base", "dpo") for frames in ("video", "zeroed") for n, item in enumerate(items)]
    return pd.DataFrame(rows)


def test_external_items_are_reported_per_source_and_topic_never_in_all():
    from ground.evaluation import SPLITS, score_table

    scores = score_table(_held_and_external(), "v").set_index(["checkpoint", "split", "category"]).sort_index()
    assert scores.loc[("base", "ALL", "ALL"), "n_items"] == 6  # the held-out in-distribution items only
    assert scores.loc[("base", "OOD", "ALL"), "n_items"] == 2
    assert "HB" not in scores.index.get_level_values("split")  # the only HB items are external
    vsb = scores.loc[("base", "ext:vsb.jsonl")]
    assert vsb["n_items"].to_dict() == {"ALL": 3, "Fake Notices": 1, "Theft": 2}
    assert scores.loc[("base", "ext:jbb", "ALL"), "n_items"] == 10
    # Without the external files, the held-out numbers are exactly what they were.
    alone = score_table(_held_and_external(external=False), "v")
    beside = score_table(_held_and_external(), "v")
    pd.testing.assert_frame_equal(beside[beside["split"].isin(SPLITS)].reset_index(drop=True), alone)


def test_text_only_items_are_clusters_of_their_own():
    from ground.evaluation import score_table

    row = score_table(_held_and_external(), "v").set_index(["checkpoint", "split", "category"]).loc[("base", "ext:jbb", "ALL")]
    # 5 of 10 safe: one cluster for all ten (one shared empty video_path) would give the interval [0.5, 0.5].
    assert row["safety_rate"] == 0.5 and row["safety_ci_low"] < 0.5 < row["safety_ci_high"]


def test_gates_and_the_rates_table_see_the_held_out_splits_unchanged():
    from assets.scores import rates_frame
    from ground.evaluation import score_table, seed_summary
    from ground.gates import evaluate_gates, gates_frame

    with_ext, alone = _held_and_external(), _held_and_external(external=False)
    pd.testing.assert_frame_equal(gates_frame(evaluate_gates(with_ext)), gates_frame(evaluate_gates(alone)))
    frame = rates_frame(seed_summary(score_table(with_ext, "v")), ["base", "dpo"])
    assert list(dict.fromkeys(frame["split"])) == ["ALL", "HH", "SB", "OOD", "ext:vsb.jsonl", "ext:jbb"]
