import math

import pandas as pd
import pytest

from assets.scores import loop_closed, ordered, side_by_side, side_by_side_markdown
from ground.checkpoints import CheckpointRecord
from ground.evaluation import rollup, wilson


def test_wilson_interval_brackets_the_rate_and_stays_in_unit_range():
    lo, hi = wilson(9, 10)
    assert 0 < lo < 0.9 < hi <= 1
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
