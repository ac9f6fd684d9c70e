"""The Countdown grader: the last ``<answer>`` expression, parsed and evaluated safely.

Rules (those of the TinyZero scorer the paper used, minus its ``eval``; each
difference from it is named):

* the answer is the text of the last complete ``<answer> … </answer>`` pair:
  the last opening tag that has a closing tag after it, up to the first
  closing tag after it. A stray second closing tag is ignored, as in the
  reference. Of a doubled opening tag (``<answer><answer>1 + 2</answer>``)
  the later one counts (the reference grades ``<answer>1 + 2`` and rejects it);
* the expression may contain only integers, ``+ - * /``, parentheses and
  ASCII whitespace (form feed and vertical tab included, as ``eval`` reads
  them; non-ASCII spaces are rejected); unary ``+``/``-`` are accepted
  (Python's ``eval`` in the reference accepted them too);
* the integers written must be exactly the given numbers, each used once (a
  multiset comparison of the literals). A decimal literal (``2.0``,
  ``2.5``, and ``82.`` with a trailing dot) is never one of the numbers:
  the answer is well formed but wrong. (The reference reads the digit runs
  of ``2.0`` as the numbers 2 and 0, and so also rejects it, but reads
  ``82.`` as 82 and accepts it.);
* its value must be within 1e-5 of the target. Arithmetic is exact
  (``fractions.Fraction``); division by zero makes the answer wrong.

Score: 1.0 when correct; ``format_score`` when the answer is well formed (the
tags are present and the expression parses) but wrong; 0.0 otherwise. The
reference scorer gives its format score (0.1) to any tagged answer, even an
unparsable one; here an unparsable answer scores 0. The paper's runs are
binary (``format_score = 0``).

Bounded by construction: only the last ``MAX_RESPONSE_CHARS`` characters are
scanned, expressions longer than ``MAX_EXPRESSION_CHARS`` or nested deeper
than ``MAX_DEPTH`` are rejected, literals are limited to ``MAX_DIGITS``
digits, and the parser and evaluator are iterative (shunting-yard to
reverse Polish notation, then a stack), so there is no recursion to exhaust.
No text is ever executed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from fractions import Fraction

from tre_lightning import checks
from tre_lightning.tasks.timeouts import GraderStats

log = logging.getLogger(__name__)

MAX_RESPONSE_CHARS = 200_000
MAX_EXPRESSION_CHARS = 1_000
MAX_DEPTH = 64
MAX_DIGITS = 30
MAX_BITS = 4_096  # numerators/denominators beyond this are rejected
TOLERANCE = Fraction(1, 100_000)

_OPEN, _CLOSE = "<answer>", "</answer>"
_WHITESPACE = " \t\r\n\f\v"  # ASCII whitespace, as Python's eval in the reference reads it
_BINARY = {"+": 1, "-": 1, "*": 2, "/": 2}
_UNARY_PREC = 3


class ExpressionError(ValueError):
    """The expression is not a well-formed arithmetic expression."""


def extract_answer(response: str, max_chars: int = MAX_RESPONSE_CHARS) -> str | None:
    """The text of the last complete ``<answer>…</answer>`` pair, or None. Linear time.

    The pair is the last opening tag that has a closing tag after it, and the
    first closing tag after that opening tag. So a stray extra closing tag
    (``<answer>1 + 2</answer></answer>``) is ignored, and of a doubled
    opening tag (``<answer><answer>1 + 2</answer>``) the later one counts.
    """
    if not isinstance(response, str):
        return None
    tail = response[-max_chars:] if len(response) > max_chars else response
    last_close = tail.rfind(_CLOSE)
    if last_close < 0:
        return None
    start = tail.rfind(_OPEN, 0, last_close)
    if start < 0:
        return None
    start += len(_OPEN)
    return tail[start : tail.find(_CLOSE, start)]


def tokenize(expression: str) -> list[str]:
    """Split into integer literals (strings), operators and parentheses.

    Raises:
        ExpressionError: a character outside digits, ``+-*/()``, ``.`` and
            ASCII whitespace (space, tab, newline, carriage return, form
            feed, vertical tab); a malformed decimal (``1..2``); an over-long
            literal or expression. A decimal literal (``2.5``, ``2.0``,
            ``82.``) is returned as such: well formed, never one of the numbers.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens: list[str] = []
    i, n = 0, len(expression)
    while i < n:
        c = expression[i]
        if c in _WHITESPACE:
            i += 1
        elif c in "+-*/()":
            tokens.append(c)
            i += 1
        elif "0" <= c <= "9" or c == ".":
            j = i
            while j < n and ("0" <= expression[j] <= "9" or expression[j] == "."):
                j += 1
            literal = expression[i:j]
            if j - i > MAX_DIGITS:
                raise ExpressionError(f"literal longer than {MAX_DIGITS} characters")
            if literal.count(".") > 1 or literal == ".":
                raise ExpressionError(f"malformed number {literal!r}")
            # A decimal is well formed but never correct: the reference reads the
            # digits of "2.5" as the numbers 2 and 5.
            tokens.append(literal)
            i = j
        else:
            raise ExpressionError(f"character {c!r} is not allowed")
    return tokens


def to_rpn(tokens: Sequence[str]) -> list[str]:
    """Shunting-yard: infix tokens to reverse Polish notation (unary ops as ``u+``/``u-``).

    Raises:
        ExpressionError: unbalanced parentheses, a missing operand, adjacent
            operands, nesting deeper than ``MAX_DEPTH``, or an empty expression.
    """
    out: list[str] = []
    ops: list[str] = []
    expect_operand = True
    depth = 0
    for tok in tokens:
        if tok[0].isdigit() or tok[0] == ".":
            if not expect_operand:
                raise ExpressionError("two operands in a row")
            out.append(tok)
            expect_operand = False
        elif tok == "(":
            if not expect_operand:
                raise ExpressionError("'(' after an operand")
            depth += 1
            if depth > MAX_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
            ops.append(tok)
        elif tok == ")":
            if expect_operand:
                raise ExpressionError("')' where an operand was expected")
            while ops and ops[-1] != "(":
                out.append(ops.pop())
            if not ops:
                raise ExpressionError("unbalanced ')'")
            ops.pop()
            depth -= 1
        elif expect_operand:
            if tok not in "+-":
                raise ExpressionError(f"operator {tok!r} without a left operand")
            if sum(1 for op in ops[-MAX_DEPTH:] if op.startswith("u")) >= MAX_DEPTH:
                raise ExpressionError("too many unary operators")
            ops.append("u" + tok)
        else:
            prec = _BINARY[tok]
            while ops and ops[-1] != "(":
                top = ops[-1]
                top_prec = _UNARY_PREC if top.startswith("u") else _BINARY[top]
                if top_prec >= prec:  # all binary operators are left-associative
                    out.append(ops.pop())
                else:
                    break
            ops.append(tok)
            expect_operand = True
    if expect_operand:
        raise ExpressionError("expression ends without an operand")
    while ops:
        op = ops.pop()
        if op == "(":
            raise ExpressionError("unbalanced '('")
        out.append(op)
    return out


def evaluate_rpn(rpn: Sequence[str]) -> Fraction:
    """Exact value of a reverse-Polish expression.

    Raises:
        ZeroDivisionError: division by zero.
        ExpressionError: a malformed RPN or a value beyond ``MAX_BITS``.
    """
    stack: list[Fraction] = []
    for tok in rpn:
        if tok[0].isdigit() or tok[0] == ".":
            try:
                stack.append(Fraction(tok))
            except ValueError as exc:
                raise ExpressionError(f"bad literal {tok!r}") from exc
            continue
        if tok.startswith("u"):
            if not stack:
                raise ExpressionError("missing operand")
            if tok == "u-":
                stack[-1] = -stack[-1]
            continue
        if len(stack) < 2:
            raise ExpressionError("missing operand")
        b = stack.pop()
        a = stack.pop()
        if tok == "+":
            v = a + b
        elif tok == "-":
            v = a - b
        elif tok == "*":
            v = a * b
        else:
            v = a / b  # ZeroDivisionError propagates: a wrong answer
        if v.numerator.bit_length() > MAX_BITS or v.denominator.bit_length() > MAX_BITS:
            raise ExpressionError("value too large")
        stack.append(v)
    if len(stack) != 1:
        raise ExpressionError("malformed expression")
    return stack[0]


def check_expression(expression: str, nums: Sequence[int], target: float) -> tuple[bool, bool]:
    """(well_formed, correct) for one answer expression. Never raises on text.

    Well formed: tokenises and parses. Correct: additionally its integer
    literals are exactly ``nums`` (as a multiset) and its value is within
    1e-5 of ``target``.
    """
    try:
        tokens = tokenize(expression)
        rpn = to_rpn(tokens)
    except ExpressionError:
        return False, False
    literals = [t for t in tokens if t[0].isdigit() or t[0] == "."]
    if any("." in t for t in literals):
        return True, False
    if sorted(int(t) for t in literals) != sorted(int(x) for x in nums):
        return True, False
    try:
        value = evaluate_rpn(rpn)
    except ZeroDivisionError:
        return True, False
    except ExpressionError:
        return True, False
    return True, abs(value - Fraction(target)) < TOLERANCE


class CountdownGrader:
    """Scores Countdown responses: 1.0 correct, ``format_score`` well formed, else 0.0.

    Args:
        format_score: reward for a well-formed but wrong answer, in [0, 1)
            (0.1 in the reference scorer; 0.0 = the paper's binary reward).
        max_response_chars: trailing characters of a response that are searched.
    """

    def __init__(self, format_score: float = 0.0, max_response_chars: int = MAX_RESPONSE_CHARS) -> None:
        self.format_score = checks.real("format_score", format_score, 0.0, 1.0, high_open=True)
        self.max_response_chars = checks.integer("max_response_chars", max_response_chars, 1)
        self.stats = GraderStats()

    def grade(self, response: str, nums: Sequence[int], target: float) -> float:
        """Score one response. Never raises on model output."""
        self.stats.add("checks")
        try:
            expression = extract_answer(response, self.max_response_chars)
            if expression is None:
                return 0.0
            well_formed, correct = check_expression(expression, nums, target)
        except Exception:  # noqa: BLE001 - a grader never raises on model output
            log.debug("Countdown check failed", exc_info=True)
            self.stats.add("errors")
            return 0.0
        if correct:
            return 1.0
        return self.format_score if well_formed else 0.0
