import math

import pandas as pd
import pytest

from assets.scores import loop_closed, ordered, side_by_side, side_by_side_markdown
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


def test_side_by_side_reports_change_and_loop_for_every_trained_checkpoint():
    names = ["base", "safevid-dpo"]
    table = side_by_side(rollup(_verdicts()), names)
    assert table.iloc[0]["category"] == "ALL"
    assert table.iloc[0]["safety_safevid-dpo_change"] == pytest.approx(0.75)
    md = side_by_side_markdown(table, names)
    assert "+75 pts" in md and "everyday" in md and "safety safevid-dpo" in md
    assert loop_closed(table, names) == {"safevid-dpo": False}  # 4 items: the intervals still overlap
    many = side_by_side(rollup(_verdicts(n_repeat=10)), names)
    assert loop_closed(many, names) == {"safevid-dpo": True}


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
