"""VideoSafety-R1's reasoning format and GRPO rewards, as a table: format, tag labels, ROUGE against
rouge-score on known strings, and the dynamic weight alpha."""
import pytest

from ground.safety_cot import RewardSettings, accuracy_reward, alpha, answer_part, cot_target, format_reward, label_of, rouge

GOOD = "<think>The clip shows a knife.</think><answer>I can't help with that.</answer><vidType>1</vidType><textType>0</textType>"


@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),
    (GOOD.replace("</answer>", "</answer>\n "), 1.0),  # whitespace between tags is allowed
    (GOOD + " Anything else?", 0.0),  # text after </textType>
    (GOOD.replace("<think>The clip shows a knife.</think>", ""), 0.0),  # a tag missing
    (GOOD[: len(GOOD) // 2], 0.0),  # cut at the length limit
    ("Sure, here is how.", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


@pytest.mark.parametrize("tag_text, label", [("1", 1), (" 0 ", 0), ("0, 1", None), ("0|1", None), ("safe", None), ("", None)])
def test_a_tag_states_one_label_or_none(tag_text, label):
    assert label_of(GOOD.replace("<vidType>1</vidType>", f"<vidType>{tag_text}</vidType>"), "vidType") == label


def test_rouge_is_the_mean_of_three_f_measures_on_known_strings():
    from rouge_score import rouge_scorer

    assert rouge("the cat sat", "the cat sat") == pytest.approx(1.0)
    # "the cat" against "the cat sat": R1 F 0.8, R2 F 2/3 (one of two bigrams), RL F 0.8
    assert rouge("the cat", "the cat sat") == pytest.approx((0.8 + 2 / 3 + 0.8) / 3)
    assert rouge("dogs run", "the cat sat") == 0.0
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = scorer.score("I cannot help with hiding a knife", "I can't help with hiding knives")
    assert rouge("I can't help with hiding knives", "I cannot help with hiding a knife") == pytest.approx(
        sum(s.fmeasure for s in got.values()) / 3)


@pytest.mark.parametrize("vid, txt, alpha_expected", [(1, 0, 0.1), (0, 0, 0.5), (1, 1, 0.5), (0, 1, 0.5)])
def test_alpha_is_low_only_when_both_tags_are_right(vid, txt, alpha_expected):
    """GOOD states vidType 1, textType 0: labels (1, 0) make both right."""
    parts = accuracy_reward(GOOD, "I can't help with that.", vid, txt)
    assert parts["alpha"] == pytest.approx(alpha_expected)
    assert parts["accuracy"] == pytest.approx(alpha_expected * 1.0 + parts["r_visual"] + parts["r_textual"])


def test_listed_labels_earn_no_tag_reward():
    listed = GOOD.replace("<vidType>1</vidType>", "<vidType>0, 1</vidType>").replace("<textType>0</textType>", "<textType>0 1</textType>")
    parts = accuracy_reward(listed, "I can't help with that.", 1, 0)
    assert (parts["r_visual"], parts["r_textual"], parts["alpha"]) == (0.0, 0.0, 0.5)


def test_alpha_bounds_and_custom_settings():
    assert alpha(1, 1) == pytest.approx(0.1) and alpha(0, 1) == pytest.approx(0.5)
    assert alpha(0, 0, RewardSettings(alpha_min=0.2, alpha_max=0.9)) == pytest.approx(0.9)


def test_targets_round_trip_and_the_judge_reads_the_answer():
    target = cot_target(" It shows pills. ", "Please ask a pharmacist.", 1, 0)
    assert format_reward(target) == 1.0
    assert answer_part(target) == "Please ask a pharmacist."
    assert (label_of(target, "vidType"), label_of(target, "textType")) == (1, 0)
    assert answer_part("no tags at all") == "no tags at all"
