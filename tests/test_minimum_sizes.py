"""A sample too small to measure anything is a blocking error naming the numbers and the setting:
with 9 real clips the held-out split was one clip (28 items) and every check passed."""
import numpy as np
import pandas as pd

from assets.benchmark import benchmark_check
from assets.preferences import pair_problems
from assets.queries import coverage_problems
from ground.settings import Settings


def _queries(clips_per_split: dict[str, int]) -> pd.DataFrame:
    rows = []
    for split, n in clips_per_split.items():
        for c in range(n):
            rows.append({"split": split, "clip_id": f"{split}_{c}", "subcategory": "weapons", "query": f"{split} {c}?"})
    return pd.DataFrame(rows)


def test_a_split_with_too_few_clips_fails_the_queries_check_and_says_what_to_change():
    assert coverage_problems(_queries({"train": 4, "validation": 2, "heldout": 2}), {"weapons"}, min_clips=2) == []
    (problem,) = coverage_problems(_queries({"train": 4, "validation": 2, "heldout": 1}), {"weapons"}, min_clips=2)
    assert "{'heldout': 1}" in problem and "queries.min_clips_per_split (2)" in problem
    assert "curation.representatives_per_category" in problem


def test_too_few_pairs_fail_the_pairs_check():
    pairs = pd.DataFrame({"chosen": [f"no {i}" for i in range(5)], "rejected": [f"yes {i}" for i in range(5)],
                          "video_path": [__file__] * 5, "frames_path": [__file__] * 5, "harmful": [True] * 5,
                          "subcategory": ["weapons"] * 5})
    assert pair_problems(pairs, {"weapons"}, min_pairs=5) == []
    (problem,) = pair_problems(pairs, {"weapons"}, min_pairs=6)
    assert problem.startswith("5 preference pairs") and "preferences.min_pairs (6)" in problem


def test_a_benchmark_with_too_few_held_out_items_fails_its_check(tmp_path):
    frames = tmp_path / "f.npy"
    np.save(frames, np.zeros((1, 2, 2, 3), np.uint8))
    n = 28
    df = pd.DataFrame({"item_id": [str(i) for i in range(n)], "query": ["q"] * n, "subcategory": ["weapons"] * n,
                       "frames_path": [str(frames)] * n, "harmful": [True] * n, "source": ["heldout"] * n})
    from ground.taxonomy import Subcategory

    subs = [Subcategory("harmless", "violence", "weapons", "harmful", "d", "g", ("i",))]
    assert benchmark_check(df, subs, min_items=28).passed
    failed = benchmark_check(df, subs, min_items=Settings().benchmark.min_items + 9)
    assert not failed.passed and "held-out split has 28 items" in str(failed.metadata)


def test_the_embedded_profile_asks_for_more_than_the_bare_defaults():
    from ground.settings import load_settings

    s, d = load_settings(), Settings()
    assert s.queries.min_clips_per_split > d.queries.min_clips_per_split
    assert s.preferences.min_pairs > d.preferences.min_pairs and s.benchmark.min_items > d.benchmark.min_items
