"""Rewards (docs/algorithms.md section 7): the last brace-matched \\boxed{}, compared by math-verify."""

import pytest

from edge_kernels.train.rewards import accuracy_reward, answers_match, format_reward, last_boxed, score_responses


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{7}.", "7"),
    (r"\boxed{1} then \boxed{2}", "2"),  # the last box counts
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # braces matched, not the first "}"
    (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
    (r"\boxed {3}", "3"),
    (r"\boxed{4} and an unclosed \boxed{5", "4"),  # an unclosed last box falls back to the previous one
    (r"\boxed{}", ""),
    ("no box at all", None),
    (r"\boxed", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("response, answer", [
    (r"The answer is \boxed{\frac{1}{2}}.", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{12}", "12"),
    (r"\boxed{x + 1}", "1 + x"),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34"),
    (r"wrong \boxed{3} then right \boxed{7}", "7"),
])
def test_math_verify_equivalence(response, answer):
    assert accuracy_reward(response, answer) == 1.0


@pytest.mark.parametrize("response, answer", [
    (r"\boxed{7}", "8"),
    (r"right \boxed{7} then wrong \boxed{3}", "7"),  # only the last box counts
    ("7", "7"),  # no box, no reward
    (r"\boxed{}", "1"),
    (r"\boxed{\frac{1}{3}}", "0.5"),
])
def test_incorrect(response, answer):
    assert accuracy_reward(response, answer) == 0.0


def test_format_reward_is_separate():
    assert format_reward(r"\boxed{3}") == 1.0
    assert format_reward("3") == 0.0
    rewards, correct = score_responses([r"\boxed{3}", r"\boxed{4}", "4"], ["4", "4", "4"], format_weight=0.5)
    assert rewards == [0.5, 1.5, 0.0]
    assert correct == [False, True, False]
    rewards, _ = score_responses([r"\boxed{3}", r"\boxed{4}"], ["4", "4"])
    assert rewards == [0.0, 1.0]


def test_answers_match_never_raises_on_junk():
    assert answers_match(r"\frac{", "1") in (False, True)
    assert accuracy_reward(r"\boxed{\\\\}", "1") == 0.0
