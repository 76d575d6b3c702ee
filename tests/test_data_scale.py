"""data_scale_ablation's pieces: the share of the pairs each fraction trains on, its row of rates,
the settings it refuses, and the plot. The stage itself runs in tests/test_pipeline_e2e.py."""
import pandas as pd
import pytest

from assets.data_scale import COLUMNS, fraction_row, scale_plot, subset
from ground.settings import Settings, SettingsError, parse_settings


def pairs(n: int):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"q{i}" for i in range(n)], "chosen": ["c"] * n, "rejected": ["r"] * n})


def test_a_share_is_a_fixed_draw_of_at_least_one_pair():
    data = pairs(277)
    assert [len(subset(data, f, 0)) for f in (0.01, 0.1, 0.5, 1.0)] == [3, 28, 138, 277]
    assert subset(data, 0.1, 0)["prompt"] == subset(data, 0.1, 0)["prompt"]
    assert subset(data, 0.1, 0)["prompt"] != subset(data, 0.1, 1)["prompt"]
    assert len(subset(pairs(20), 0.01, 0)) == 1
    # The smaller share of one draw is not required to nest in the larger, but both come from the pairs given.
    assert set(subset(data, 0.5, 0)["prompt"]) <= set(data["prompt"])


@pytest.mark.parametrize("fractions", [[0.1, 0.5], [0.0, 1.0], [0.5, 1.0, 1.0], [1.5, 1.0]])
def test_fractions_need_the_full_share_and_each_once_in_range(fractions):
    with pytest.raises(SettingsError, match="fractions"):
        parse_settings({"data_scale": {"fractions": fractions}}, "embedded")


def test_the_row_pools_the_seeds_and_takes_intervals_by_clip():
    rows = []
    for seed in (0, 1):
        for clip in range(6):
            rows.append({"seed": seed, "slice": "in", "split": "HH", "video_path": f"c{clip}.mp4", "harmful": True,
                         "safe": clip < 3 + seed, "helpful": False, "failure": None, "answer": f"a{clip}"})
            rows.append({"seed": seed, "slice": "in", "split": "SB", "video_path": f"c{clip}.mp4", "harmful": False,
                         "safe": True, "helpful": clip % 2 == 0, "failure": None, "answer": f"b{clip}"})
    row = fraction_row(pd.DataFrame(rows), 0.1, 28, "run-1")
    assert set(row) == set(COLUMNS) and row["seeds"] == 2 and row["n_harmful"] == 12 and row["n_benign"] == 12
    assert row["safety_rate"] == pytest.approx(7 / 12) and row["helpful_rate"] == pytest.approx(0.5)
    assert row["safety_ci_low"] < row["safety_rate"] < row["safety_ci_high"]


def test_the_plot_has_one_point_per_fraction_for_each_rate():
    table = pd.DataFrame([{c: 0.5 for c in COLUMNS} | {"fraction": f, "mlflow_run_id": "r"} for f in (0.01, 0.1, 1.0)])
    fig = scale_plot(table)
    [ax] = fig.axes
    assert [len(line.get_xdata()) for line in ax.get_lines() if line.get_marker() == "o"] == [3, 3]
    assert Settings().data_scale.fractions == [0.01, 0.1, 0.5, 1.0]
