"""Reward functions: table-driven checks with tricky strings, combining, resolving, errors."""

from __future__ import annotations

import sys
import types

import pytest

from pmetal.errors import PmetalError
from pmetal.rewards import (
    LengthReward,
    OverlongPunishment,
    RewardSet,
    accuracy_reward,
    answers_match,
    extract_answer,
    parse_number,
    resolve_reward,
    think_format_reward,
)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>2+2 is 4</think>The answer is 4.", 1.0),
        ("  <thinking>\nadd them\n</thinking>\n\n4", 1.0),
        ("reasoning here</think> 4", 1.0),  # the prompt opened <think> (Qwen3-style)
        ("<think>2+2</think>", 0.0),  # no answer after the block
        ("<think></think>4", 0.0),  # empty reasoning
        ("<think>a</thinking>4", 0.0),  # mismatched tags
        ("The answer is 4", 0.0),
        ("Sure! <think>x</think> 4", 0.0),  # block not at the start
        ("<think>a</think>b<think>c</think>d", 0.0),  # two blocks
        ("<think>unclosed and 4", 0.0),
    ],
)
def test_think_format_reward(completion, expected):
    assert think_format_reward(["q"], [completion]) == [expected]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The total is 1,000 apples.", "1,000"),
        ("<answer> 42 </answer>", "42"),
        ("first \\boxed{3} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{x^{2}+1}", "x^{2}+1"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("<think>maybe 5 or 6</think> It is 7", "7"),
        ("<think>the answer is 5</think>", None),  # nothing after the reasoning
        ("no number here", None),
        ("-3.5 degrees", "-3.5"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "predicted, reference, match",
    [
        ("1,000", "1000", True),
        ("1000.0", "1000", True),
        ("$1,000.00", "1000", True),
        ("50%", "50", True),
        ("\\frac{1}{2}", "0.5", True),
        ("1/2", "0.5", True),
        ("The answer is 42.", "42", True),
        ("42", "43", False),
        ("1000", "100", False),
        ("Paris", "paris", True),
        ("\\text{Paris}.", "Paris", True),
        ("Lyon", "Paris", False),
        (None, "1", False),
    ],
)
def test_answers_match(predicted, reference, match):
    assert answers_match(predicted, reference) is match


def test_parse_number_rejects_non_numbers():
    assert parse_number("12abc") is None
    assert parse_number("1/0") is None
    assert parse_number("1,000,000") == 1_000_000.0


def test_accuracy_reward_with_answer_and_solution_columns():
    completions = [
        "<think>48/2 = 24, 48 + 24 = 72</think> 72",
        "<think>...</think> The answer is 72.0",
        "<think>72</think> 70",  # a number inside the reasoning is not the answer
        "\\boxed{1,000}",
    ]
    answers = ["72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", "1000"]
    assert accuracy_reward(["q"] * 4, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0]
    solutions = ["so the result is \\boxed{72}"] * 2
    assert accuracy_reward(["q"] * 2, ["72", "71"], solution=solutions) == [1.0, 0.0]


def test_accuracy_reward_without_answers_is_a_clear_error():
    with pytest.raises(PmetalError, match="'answer'"):
        accuracy_reward(["q"], ["4"])


def test_length_and_overlong_rewards():
    length = LengthReward(min_chars=5, max_chars=20)
    assert length(["q"] * 3, ["abc", "just right", "x" * 21]) == [-0.5, 0.1, -0.1]
    overlong = OverlongPunishment(buffer=4)
    lengths = [10, 12, 14, 16]
    # L_max 16, buffer 4: 0 up to 12, then (12 - L) / 4
    assert overlong(["q"] * 4, ["c"] * 4, completion_lengths=lengths, max_completion_length=16) == [0.0, 0.0, -0.5, -1.0]
    with pytest.raises(PmetalError, match="completion_lengths"):
        overlong(["q"], ["c"])


def test_reward_set_weights_and_per_function_scores():
    rewards = RewardSet.from_specs(["accuracy"], [2.0], reasoning=True)
    assert rewards.names == ["think_format", "accuracy", "length", "accuracy_3"]
    total, per = rewards.score(["q", "q"], ["<think>sum</think> 4", "5"], answer=["4", "4"], max_completion_length=64)
    assert per["think_format"] == [1.0, 0.0] and per["accuracy"] == [1.0, 0.0]
    assert per["length"] == [0.1, -0.5]
    assert total == pytest.approx([1.0 + 1.0 + 0.2 * 0.1 + 2.0, 0.2 * -0.5])


def test_no_reward_is_an_error_never_a_constant():
    with pytest.raises(PmetalError, match="no reward function"):
        RewardSet.from_specs([])


def test_resolve_reward_by_import_path_and_its_errors():
    module = types.ModuleType("pmetal_test_rewards")
    module.shout = lambda prompts, completions, **kw: [float(c.isupper()) for c in completions]
    module.not_callable = 3
    sys.modules["pmetal_test_rewards"] = module
    try:
        fn = resolve_reward("pmetal_test_rewards:shout")
        assert fn(["q", "q"], ["HI", "hi"]) == [1.0, 0.0]
        with pytest.raises(PmetalError, match="cannot import module 'no_such_pkg.rewards'"):
            resolve_reward("no_such_pkg.rewards:fn")
        with pytest.raises(PmetalError, match="has no attribute 'missing'"):
            resolve_reward("pmetal_test_rewards:missing")
        with pytest.raises(PmetalError, match="is a int, not a function"):
            resolve_reward("pmetal_test_rewards:not_callable")
        with pytest.raises(PmetalError, match="unknown reward 'acuracy'"):
            resolve_reward("acuracy")
    finally:
        del sys.modules["pmetal_test_rewards"]


def test_reward_function_returning_wrong_count_is_an_error():
    rewards = RewardSet([lambda prompts, completions, **kw: [1.0]])
    with pytest.raises(PmetalError, match="returned 1 scores for 2 completions"):
        rewards.score(["q", "q"], ["a", "b"])
