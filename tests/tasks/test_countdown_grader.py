"""Countdown grader: extraction, safe parsing, number use, target (hand-written tables)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
from _task_hostile import HOSTILE

from tre_lightning.checks import ArgumentError
from tre_lightning.tasks.countdown_grader import (
    MAX_EXPRESSION_CHARS,
    CountdownGrader,
    ExpressionError,
    evaluate_rpn,
    extract_answer,
    to_rpn,
    tokenize,
)

NUMS, TARGET = [44, 19, 35], 98  # 44 + 19 + 35


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>hmm</think><answer>1 + 2</answer>", "1 + 2"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>a<answer>b</answer>", "b"),
        ("<answer>(21 + 14) - 9</answer></answer>", "(21 + 14) - 9"),  # stray second closing tag (issue 12)
        ("<answer>1</answer> <answer>2</answer></answer>", "2"),
        ("<answer>1 + 2</answer> then <answer>unclosed", "1 + 2"),
        ("<answer>open", None),
        ("close</answer>", None),
        ("nothing", None),
    ],
)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", Fraction(7)),
        ("(1 + 2) * 3", Fraction(9)),
        ("10 - 4 - 3", Fraction(3)),
        ("12 / 4 / 3", Fraction(1)),
        ("-3 + 5", Fraction(2)),
        ("2 * -3", Fraction(-6)),
        ("- - 4", Fraction(4)),
        ("7 / 2", Fraction(7, 2)),
        ("((((5))))", Fraction(5)),
    ],
)
def test_evaluation(expression: str, value: Fraction) -> None:
    assert evaluate_rpn(to_rpn(tokenize(expression))) == value


@pytest.mark.parametrize(
    "expression",
    ["", "1 +", "* 2", "1 2", "(1 + 2", "1 + 2)", "()", "2 ** 3", "2 ^ 3", "abs(2)", "1..2", ".",
     "(" * 65 + "1" + ")" * 65, "1" * 31],
)
def test_malformed_expressions(expression: str) -> None:
    with pytest.raises(ExpressionError):
        to_rpn(tokenize(expression))


def test_ascii_whitespace_is_space() -> None:
    """Decision (issue 12): form feed and vertical tab are whitespace, as for Python's eval in
    the reference; a non-ASCII space is not allowed."""
    assert tokenize("1\f+\v2\r\n*\t3") == ["1", "+", "2", "*", "3"]
    with pytest.raises(ExpressionError):
        tokenize("1\u00a0+ 2")


def test_division_by_zero_raises_zero_division() -> None:
    with pytest.raises(ZeroDivisionError):
        evaluate_rpn(to_rpn(tokenize("1 / (2 - 2)")))


CASES = [
    # (response, nums, target, binary score, score with format_score 0.1)
    ("<answer>44 + 19 + 35</answer>", NUMS, TARGET, 1.0, 1.0),
    ("<think>try</think>\n<answer> (44 + 19) + 35 </answer>", NUMS, TARGET, 1.0, 1.0),
    ("<answer>35 + 44 + 19</answer>", NUMS, TARGET, 1.0, 1.0),
    ("<answer>44 + 19 - 35</answer>", NUMS, TARGET, 0.0, 0.1),  # wrong value
    ("<answer>44 + 19</answer>", NUMS, TARGET, 0.0, 0.1),  # a number unused
    ("<answer>44 + 19 + 35 + 0</answer>", NUMS, TARGET, 0.0, 0.1),  # an extra number
    ("<answer>44 + 44 + 10</answer>", NUMS, TARGET, 0.0, 0.1),  # a number used twice
    ("<answer>98</answer>", NUMS, TARGET, 0.0, 0.1),
    ("<answer>44 + 19 + 35 = 98</answer>", NUMS, TARGET, 0.0, 0.0),  # '=' is not allowed
    ("<answer>44.0 + 19 + 35</answer>", NUMS, TARGET, 0.0, 0.1),  # decimals never match the numbers
    ("44 + 19 + 35", NUMS, TARGET, 0.0, 0.0),  # no tags
    ("<answer>44 × 19 + 35</answer>", NUMS, TARGET, 0.0, 0.0),  # only ASCII operators, as in the reference
    ("<answer>(95 - 5) / 3</answer>", [95, 5, 3], 30, 1.0, 1.0),
    ("<answer>7 / 2 * 2</answer>", [7, 2, 2], 7, 1.0, 1.0),  # exact rational arithmetic
    ("<answer>1 / 3 * 3</answer>", [1, 3, 3], 1, 1.0, 1.0),
    ("<answer>10 / (5 - 5)</answer>", [10, 5, 5], 2, 0.0, 0.1),  # division by zero: wrong
    ("<answer>-(3 - 10) + 1</answer>", [3, 10, 1], 8, 1.0, 1.0),
    ("<answer>2 + 3</answer>", [2, 3], 5.000001, 1.0, 1.0),  # within 1e-5
    ("<answer>2 + 3</answer>", [2, 3], 5.0001, 0.0, 0.1),
    # issue 12: the last complete pair is graded
    ("<answer>(21 + 14) - 9</answer></answer>", [21, 14, 9], 26, 1.0, 1.0),
    # decision: of a doubled opening tag the later one counts (the reference grades "<answer>..." as malformed)
    ("<answer><answer>(21 + 14) - 9</answer>", [21, 14, 9], 26, 1.0, 1.0),
    ("<answer>44 + 19 <answer>+ 35</answer>", NUMS, TARGET, 0.0, 0.1),  # only "+ 35" is the answer
    # decision: "82." is a decimal literal, never the integer 82 (the reference accepts it)
    ("<answer>80 + 2.</answer>", [80, 2], 82, 0.0, 0.1),
    ("<answer>(44 + 19 + 35).</answer>", NUMS, TARGET, 0.0, 0.0),  # a sentence dot: not an expression
    # decision: form feed and vertical tab are spaces
    ("<answer>44\f+ 19\v+ 35</answer>", NUMS, TARGET, 1.0, 1.0),
]


@pytest.mark.parametrize(("response", "nums", "target", "binary", "shaped"), CASES)
def test_grader_table(response: str, nums: list[int], target: float, binary: float, shaped: float) -> None:
    assert CountdownGrader().grade(response, nums, target) == binary
    assert CountdownGrader(format_score=0.1).grade(response, nums, target) == shaped


def test_right_value_with_an_unused_number_scores_zero() -> None:
    """Mutation audit (issue 15): 3 * 5 = 15 is the target but leaves 7 unused. The table's
    "unused number" case also has the wrong value, so it could not catch a grader that
    checks only that the literals are some of the numbers. Checked: replacing the multiset
    equality in ``check_expression`` by a sub-multiset test (``Counter(literals) <=
    Counter(nums)``) makes this test fail."""
    assert CountdownGrader().grade("<answer>3 * 5</answer>", [3, 5, 7], 15) == 0.0
    assert CountdownGrader(format_score=0.1).grade("<answer>3 * 5</answer>", [3, 5, 7], 15) == 0.1
    assert CountdownGrader().grade("<answer>3 * 5 + 7 - 7</answer>", [3, 5, 7, 7], 15) == 1.0


def test_reused_number_without_a_foreign_number_scores_zero() -> None:
    """Mutation audit (issue 15): 5 * 5 - 7 - 3 = 15 uses every given number and none other,
    but 5 twice. Checked: comparing the literals as sets (``set(literals) == set(nums)``)
    instead of multisets makes this test fail."""
    assert CountdownGrader().grade("<answer>5 * 5 - 7 - 3</answer>", [3, 5, 7], 15) == 0.0
    assert CountdownGrader(format_score=0.1).grade("<answer>5 * 5 - 7 - 3</answer>", [3, 5, 7], 15) == 0.1
    assert CountdownGrader().grade("<answer>5 * 5 - 7 - 3</answer>", [3, 5, 5, 7], 15) == 1.0


@pytest.mark.parametrize("format_score", [0.0, 0.1])
def test_hostile_outputs_are_bounded_by_construction(
    format_score: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every hostile output scores 0 (or the format score) without running model text, and
    each oversized one is refused by a size limit (the mechanism that bounds the time; the
    time itself is measured by ``benchmarks/graders.py``, not asserted: issue 15)."""
    monkeypatch.chdir(tmp_path)
    grader = CountdownGrader(format_score=format_score)
    sentinel = tmp_path / "pwned"
    payload = f"<answer>__import__('pathlib').Path({str(sentinel)!r}).touch()</answer>"
    for response in [*HOSTILE, payload]:
        score = grader.grade(response, NUMS, TARGET)
        assert score in (0.0, format_score), response[:80]
        expression = extract_answer(response)
        if expression is not None and len(expression) > MAX_EXPRESSION_CHARS:
            with pytest.raises(ExpressionError, match="longer than"):
                tokenize(expression)
            assert score == 0.0
    assert not sentinel.exists()
    assert grader.stats.as_dict()["errors"] == 0


def test_failures_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    from tre_lightning.tasks import countdown_grader

    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    grader = CountdownGrader()
    monkeypatch.setattr(countdown_grader, "check_expression", boom)
    assert grader.grade("<answer>1</answer>", [1], 1) == 0.0
    assert grader.stats.as_dict() == {"checks": 1, "timeouts": 0, "errors": 1, "failures": 1}


@pytest.mark.parametrize("value", [-0.1, 1.0, 2.0, "0.1", float("nan"), True])
def test_format_score_validation(value: object) -> None:
    with pytest.raises(ArgumentError, match="format_score"):
        CountdownGrader(format_score=value)


@pytest.mark.parametrize("value", [0, 2.5, "1000"])
def test_max_response_chars_validation(value: object) -> None:
    with pytest.raises(ArgumentError, match="max_response_chars"):
        CountdownGrader(max_response_chars=value)
