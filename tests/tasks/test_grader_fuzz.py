"""Property tests on every grader: never raise, allowed values only, bounded by their own limits.

No wall-clock bound is asserted (issue 15): the rule paths are bounded by construction (size
limits), the symbolic check by its time limit, which these tests check is applied to every
call. ``benchmarks/graders.py`` measures the times.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
from _task_hostile import HOSTILE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tre_lightning.tasks import CountdownTask, MathTask
from tre_lightning.tasks.countdown_grader import CountdownGrader
from tre_lightning.tasks.math_grader import MathGrader, math_verify_available

FRAGMENTS = [
    "\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "\\{", "\\}", "\\frac", "\\dfrac", "\\sqrt", "\\left(",
    "\\right)", "\\text{ cm}", "^{", "^", "_", "=", ",", ".", "$", "\\%", "\\\\", "x", "\\pi", "9", "0", "-",
    "+", "*", "/", "(", ")", " ", "\n", "<answer>", "</answer>", "<think>", "__import__('os')", "**",
    "1e999", "\\infty", "\\int", "\\sum", "!", "\x00", "é", "١",
]
SOUP = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=8), max_size=60).map("".join)
RESPONSES = st.one_of(st.text(max_size=300), SOUP, st.sampled_from(HOSTILE))
COMMON = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@COMMON
@given(response=RESPONSES, reference=st.sampled_from(["5", "\\frac{1}{2}", "(1,2)", "x^2+1", "\\sqrt{2}"]))
def test_math_rules_never_raise(response: str, reference: str) -> None:
    before = _RULES.stats.as_dict()["errors"]
    assert _RULES.grade(response, reference) in (0.0, 1.0)
    assert _RULES.stats.as_dict()["errors"] == before


@pytest.mark.skipif(not math_verify_available(), reason="math-verify not installed")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(response=st.one_of(SOUP.map(lambda s: "\\boxed{" + s + "}"), st.sampled_from(HOSTILE)))
def test_math_symbolic_never_raises_and_respects_the_limit(response: str) -> None:
    """Every helper call of a check carries the grader's time limit, and each call either
    answers or is counted (time-out / error): nothing waits without a limit."""
    worker = _SYMBOLIC._workers[0]
    limits: list[float] = []
    real_call = worker.call

    def spy(request: dict, timeout: float) -> dict:
        limits.append(timeout)
        return real_call(request, timeout=timeout)

    before = _SYMBOLIC.stats.as_dict()
    worker.call = spy  # type: ignore[method-assign]
    try:
        score = _SYMBOLIC.grade(response, "\\frac{\\sqrt{2}}{2}")
    finally:
        del worker.call
    after = _SYMBOLIC.stats.as_dict()
    assert score in (0.0, 1.0)
    assert limits in ([], [_SYMBOLIC.time_limit])
    assert after["checks"] == before["checks"] + 1
    assert after["failures"] - before["failures"] <= len(limits)


@COMMON
@given(
    response=st.one_of(RESPONSES, SOUP.map(lambda s: "<answer>" + s + "</answer>")),
    nums=st.lists(st.integers(0, 1000), min_size=1, max_size=6),
    target=st.integers(-10**6, 10**6),
    format_score=st.sampled_from([0.0, 0.1]),
)
def test_countdown_never_raises(response: str, nums: list[int], target: int, format_score: float) -> None:
    grader = CountdownGrader(format_score=format_score)
    score = grader.grade(response, nums, target)
    assert score in (0.0, format_score, 1.0)
    assert grader.stats.as_dict()["errors"] == 0


def _combine(parts: tuple) -> tuple:
    (left, a, na), op, (right, b, nb) = parts
    if a is None or b is None or (op == "/" and b == 0):
        value = None
    else:
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
    return f"({left} {op} {right})", value, na + nb


EXPRESSIONS = st.recursive(
    st.integers(1, 100).map(lambda n: (str(n), Fraction(n), [n])),
    lambda inner: st.tuples(inner, st.sampled_from("+-*/"), inner).map(_combine),
    max_leaves=6,
)


@COMMON
@given(case=EXPRESSIONS)
def test_countdown_accepts_every_well_formed_expression(case: tuple) -> None:
    # The expected value is computed here, independently, with fractions.
    expr, value, nums = case
    grader = CountdownGrader(format_score=0.1)
    if value is None:  # division by zero: well formed but wrong
        assert grader.grade(f"<answer>{expr}</answer>", nums, 0) == 0.1
        return
    target = float(value)
    expected = 1.0 if abs(Fraction(target) - value) < Fraction(1, 100_000) else 0.1
    assert grader.grade(f"<answer>{expr}</answer>", nums, target) == expected
    assert grader.grade(f"<answer>{expr}</answer>", nums, target + 1) == 0.1
    if len(nums) > 1:
        assert grader.grade(f"<answer>{expr}</answer>", nums[1:], target) == 0.1


def test_task_score_batches_of_hostile_outputs() -> None:
    math_task = MathTask(use_math_verify=False)
    countdown = CountdownTask(train_size=1, val_size=1)
    examples_m = [{"problem": "p", "solution": "\\boxed{42}"}] * len(HOSTILE)
    examples_c = [{"nums": [1, 2], "target": 3}] * len(HOSTILE)
    assert math_task.score(examples_m, HOSTILE) == [0.0] * len(HOSTILE)
    assert countdown.score(examples_c, HOSTILE) == [0.0] * len(HOSTILE)
    assert math_task.failure_counts() == {"checks": len(HOSTILE), "timeouts": 0, "errors": 0, "failures": 0}
    assert countdown.failure_counts()["checks"] == len(HOSTILE)


_RULES = MathGrader(use_math_verify=False)
_SYMBOLIC = MathGrader(use_math_verify=True, time_limit=0.5)
