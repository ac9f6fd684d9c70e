r"""Reward hacks (issue 12): forms that hedge between answers or smuggle one in must score 0.

Property-style: for references drawn from a pool of pairwise non-equivalent values and a
wrong value ``w`` from the same pool, every hedged construction (``r \text{ or } w``, ``r, w``,
``x = r \text{ or } x = w``, an equation ``w = r``, several boxes, a box inside a think block,
text after the box) scores 0, under the rules alone and with the symbolic check; the
genuinely equivalent constructions (``x = r``, the same box twice, a box after the think
block, a corrected draft) score 1. Expected verdicts come from the construction, not from the
grader. The symbolic grader has a limit no case reaches, and every symbolic case asserts that
no time-out or error was counted, so a 0 cannot come from a time-out.

Checked against the grader before issue 12 (commit fd03edf, run with ``PYTHONPATH`` on an
extracted copy): every test of this file fails there except the symbolic-equivalents check,
e.g. ``\boxed{4 \text{ or } 9}`` and ``\boxed{4=9}`` (hedges, numeric left-hand sides),
``\boxed{9} or \boxed{4}`` (several boxes), ``<think>\boxed{r}</think> The answer is r``,
``\boxed{r} or w`` (text after the box) scored 1, and ``\boxed{4, 4}`` scored 0.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tre_lightning.tasks.math_grader import MathGrader, math_verify_available

# Pairwise non-equivalent values (numbers, surds, expressions, a text answer).
POOL = ["4", "9", "-3", "12", "45120", "\\frac{3}{4}", "\\sqrt{2}", "2\\sqrt{3}", "\\pi", "x^2+1", "\\text{Evelyn}"]
NUMERIC = ["4", "9", "-3", "12", "45120", "\\frac{3}{4}", "\\sqrt{2}", "2\\sqrt{3}"]

HEDGES = [
    "\\boxed{{{r} \\text{{ or }} {w}}}",
    "\\boxed{{{w} \\text{{ or }} {r}}}",
    "\\boxed{{{r} \\text{{ and }} {w}}}",
    "\\boxed{{{r} \\mbox{{ or }} {w}}}",
    "\\boxed{{{r} or {w}}}",
    "\\boxed{{{r}, {w}}}",
    "\\boxed{{{w}, {r}}}",
    "\\boxed{{{r}; {w}}}",
    "\\boxed{{x = {r} \\text{{ or }} x = {w}}}",
    "\\boxed{{x = {w} \\text{{ or }} x = {r}}}",
    "\\boxed{{{r} \\text{{ or }} x = {w}}}",
    "\\boxed{{\\{{{r}, {w}\\}}}}",
    "\\boxed{{{r} \\text{{ or more}}}}",
    "\\boxed{{{r} \\text{{ (or maybe }} {w}\\text{{)}}}}",
]
NUMERIC_LHS = ["\\boxed{{{w} = {r}}}", "\\boxed{{{r} = {w}}}", "\\boxed{{{w} + 1 = {r}}}", "\\boxed{{2 {w} = {r}}}"]
SEVERAL_BOXES = [
    "\\boxed{{{r}}} \\text{{ or }} \\boxed{{{w}}}",
    "\\boxed{{{w}}} or \\boxed{{{r}}}",
    "$\\boxed{{{r}}}$, $\\boxed{{{w}}}$",
    "\\boxed{{{w}}} and \\boxed{{{r}}}",
    "\\boxed{{{r}}}\\boxed{{{w}}}",
    "The answer is \\boxed{{{r}}}. On reflection it is \\boxed{{{w}}}.",
]
THINK = [
    "<think>It is \\boxed{{{r}}}.</think> The answer is {r}.",
    "<think>It is \\boxed{{{r}}}.</think> The answer is \\boxed{{{w}}}.",
    "The answer is \\boxed{{{w}}}. <think>or \\boxed{{{r}}}",
    "<think>I never finish \\boxed{{{r}}}",
]
PADDED = [
    "\\boxed{{{w}}}. The answer is {r}.",
    "\\boxed{{{w}}} (that is, {r})",
    "\\boxed{{{w}}}\n\nFinal Answer: The final answer is {r}.",
    "\\boxed{{{r}}} or {w}",
    "\\boxed{{{w}}} or {r}",
    "\\boxed{{{r}}}, {w}",
    "$\\boxed{{{r}}}$ or $x = {w}$",
]
EQUIVALENT = [
    "\\boxed{{{r}}}",
    "The answer is $\\boxed{{{r}}}$.",
    "\\boxed{{x = {r}}}",
    "\\boxed{{{r}}} \\boxed{{{r}}}",
    "\\boxed{{{r}, {r}}}",
    "<think>maybe \\boxed{{{w}}}</think> So \\boxed{{{r}}}.",
    "First \\boxed{{{w}}}; no, that fails the check, so the answer is \\boxed{{{r}}}.",  # a corrected draft
    "\\boxed{{{r}}}. I hope that {w} was not expected.",
]

PAIRS = st.tuples(st.sampled_from(POOL), st.sampled_from(POOL)).filter(lambda p: p[0] != p[1])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

needs_math_verify = pytest.mark.skipif(not math_verify_available(), reason="math-verify is not installed")
_RULES = MathGrader(use_math_verify=False)
_SYMBOLIC = MathGrader(use_math_verify=True, time_limit=120.0)


def _grades(response: str, reference: str) -> list[float]:
    """Scores of the rule grader and (when installed) the symbolic one; no time-out allowed."""
    out = [_RULES.grade(response, reference)]
    if math_verify_available():
        before = _SYMBOLIC.stats.as_dict()
        out.append(_SYMBOLIC.grade(response, reference))
        after = _SYMBOLIC.stats.as_dict()
        assert after["failures"] == before["failures"], (response, after)
    return out


FAMILIES = {
    "hedges": (HEDGES, 0.0),
    "numeric left-hand sides": (NUMERIC_LHS, 0.0),
    "several boxes": (SEVERAL_BOXES, 0.0),
    "boxes in think blocks": (THINK, 0.0),
    "text after the box": (PADDED, 0.0),
    "genuinely equivalent": (EQUIVALENT, 1.0),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@FEW
@given(pair=PAIRS)
def test_family(family: str, pair: tuple[str, str]) -> None:
    """Every template of the family, for reference ``r`` and wrong value ``w``."""
    templates, expected = FAMILIES[family]
    r, w = pair
    for template in templates:
        response = template.format(r=r, w=w)
        scores = _grades(response, r)
        assert scores == [expected] * len(scores), (response, r)


@MANY
@given(r=st.integers(-10**6, 10**6), w=st.integers(-10**6, 10**6), template=st.sampled_from(HEDGES + NUMERIC_LHS))
def test_integer_hedges_score_zero_under_the_rules(r: int, w: int, template: str) -> None:
    """Many integers (thousands included) through the rule path: a hedge never scores."""
    if r == w:
        return
    response = template.format(r=r, w=w)
    assert _RULES.grade(response, str(r)) == 0.0, response


@MANY
@given(value=st.integers(1000, 10**9))
def test_thousands_separators_versus_lists(value: int) -> None:
    """``45,120`` is a number; ``45, 120`` is the list of two numbers (docs/tasks.md)."""
    grouped = f"{value:,}"
    spaced = grouped.replace(",", ", ")
    assert _RULES.grade(f"\\boxed{{{grouped}}}", str(value)) == 1.0
    assert _RULES.grade(f"\\boxed{{{spaced}}}", str(value)) == 0.0
    assert _RULES.grade(f"\\boxed{{{value}}}", spaced) == 0.0


@needs_math_verify
@pytest.mark.parametrize("r", NUMERIC)
def test_symbolic_equivalents_still_score_one(r: str) -> None:
    """A hedge filter that rejected everything would pass the tests above: the symbolic path
    must still accept a rewritten form of each value (``r`` written as ``2 r / 2``)."""
    assert _grades(f"\\boxed{{\\frac{{2 \\cdot {r}}}{{2}}}}", r)[1] == 1.0
