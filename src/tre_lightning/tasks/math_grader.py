r"""The MATH grader: the final boxed answer, MATH-style normalisation, symbolic check.

Pipeline for one response (every step bounded by construction except the
last, which runs in a helper process under a hard wall-clock limit). The
rules are stated for users in ``docs/tasks.md`` ("MATH: grading rules");
each rule below names the function that applies it.

1. :func:`final_answer`: the final answer of a response. Text up to the last
   ``</think>`` (and from an unclosed ``<think>`` on) is reasoning and is not
   searched. The answer is the content of the last ``\boxed{…}`` (nested
   braces, escaped ``\{ \}``), ``\boxed 5`` or ``\fbox{…}``; boxes right before
   it, joined only by commas, "and"/"or" and spacing, belong to it (the list
   ``a, b``). A value joined to the last box after it (``\boxed{4} or 9``,
   ``\boxed{4}, 9``) makes the answer a hedge: no answer. Only the last
   ``MAX_RESPONSE_CHARS`` characters are scanned; an answer longer than
   ``MAX_ANSWER_CHARS`` is rejected. No answer: reward 0.
2. :func:`answer_items`: the answer as a list of normalised items (one item
   for a single value). MATH-benchmark normalisation (Hendrycks et al.'s
   ``strip_string``) with the Minerva unit handling, restricted so that it
   cannot turn a hedge into a value: a trailing ``\text{ unit}`` is removed
   only when it holds words and no hedge word (``or``, ``and``, ``minus``,
   ``more``, …); ``or``/``and`` between values separate list items; a
   left-hand side is dropped only when it is a name (``x =``, ``a_1 =``,
   ``f(x) =``), never a number or an expression; a comma followed by a space
   separates items while ``45,120`` (digits grouped in threes, no space) is
   one number.
3. :func:`rule_equivalent`: equal single items (as strings or as exact
   numbers: ``0.5`` = ``\frac12`` = ``1/2``), or equal sets of items for
   unbracketed lists (``1, 2`` = ``2, 1``): reward 1.
4. Otherwise, when math-verify is installed (``pip install
   tre-lightning[math]``) and both answers have the same shape
   (:func:`same_shape`: as many values, an equation with a non-name left
   side on both sides or neither, no word the reference lacks): symbolic equivalence via math-verify on
   the rule-rewritten answers (:func:`symbolic_form`; LaTeX extraction only:
   its plain-expression path would call sympy's ``parse_expr``, i.e.
   ``eval``) in a persistent helper process with a per-check wall-clock
   limit, an address-space cap, and restart-on-hang
   (:class:`~tre_lightning.tasks.timeouts.SubprocessWorker`). A time-out or
   error scores 0 and is counted in :attr:`MathGrader.stats`.

Without math-verify the grader uses steps 1-3 only (documented fallback).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from queue import SimpleQueue

from tre_lightning import checks
from tre_lightning.tasks.timeouts import (
    GraderStats,
    SubprocessWorker,
    WorkerError,
    WorkerStartError,
    WorkerTimeout,
)

log = logging.getLogger(__name__)

MAX_RESPONSE_CHARS = 200_000
"""Only this many trailing characters of a response are searched for ``\\boxed``."""
MAX_ANSWER_CHARS = 1_000
"""A boxed answer longer than this is rejected (scores 0)."""
SYMBOLIC_MAX_CHARS = 400
"""Answers longer than this skip the symbolic check (rule-based result stands)."""
MAX_JOINED_BOXES = 16
"""At most this many adjacent boxes form one list answer; more: only the last ones."""

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


# --------------------------------------------------------------------------- extraction
def _last_command(text: str, cmd: str, end: int) -> int:
    """Index of the last ``cmd`` starting before ``end`` and not followed by a letter."""
    while True:
        i = text.rfind(cmd, 0, end)
        if i < 0:
            return -1
        after = i + len(cmd)
        if after >= len(text) or not text[after].isalpha():
            return i
        end = i


def _last_box_start(text: str, end: int) -> tuple[int, str]:
    """(index, command) of the last box command starting before ``end``; (-1, "") if none."""
    best, best_cmd = -1, ""
    for cmd in _BOX_COMMANDS:
        i = _last_command(text, cmd, end)
        if i > best:
            best, best_cmd = i, cmd
    return best, best_cmd


def _read_box(text: str, i: int, cmd: str) -> tuple[str, int] | None:
    """(content, end index) of the box whose command starts at ``i``, or None.

    None when its braces do not balance within ``MAX_ANSWER_CHARS`` or the
    content is longer than that. ``\\boxed 5`` runs up to whitespace or ``$``.
    """
    n = len(text)
    start = i + len(cmd)
    k = start
    while k < n and k - start <= MAX_ANSWER_CHARS and text[k] in " \t":
        k += 1
    if k < n and text[k] == "{":
        depth = 0
        m = k
        limit = min(n, k + MAX_ANSWER_CHARS + 2)
        while m < limit:
            c = text[m]
            if c == "\\" and m + 1 < n and text[m + 1] in "{}":
                m += 2  # escaped brace: part of the answer, not structure
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[k + 1 : m], m + 1
            m += 1
        return None
    if cmd == "\\boxed" and k > start:  # "\boxed 5": up to whitespace or "$"
        m = k
        limit = min(n, k + MAX_ANSWER_CHARS + 1)
        while m < limit and text[m] not in " \t\n$":
            m += 1
        answer = text[k:m]
        return (answer, m) if answer and m - k <= MAX_ANSWER_CHARS else None
    return None


def last_boxed_answer(text: str, max_chars: int = MAX_RESPONSE_CHARS) -> str | None:
    r"""The content of the last ``\boxed{…}`` / ``\boxed …`` / ``\fbox{…}`` in ``text``.

    Returns None when there is none, when its braces do not balance, or when
    the answer is longer than ``MAX_ANSWER_CHARS``. Linear in the scanned tail.
    Used for reference solutions; responses go through :func:`final_answer`.
    """
    if not isinstance(text, str) or not text:
        return None
    tail = text[-max_chars:] if len(text) > max_chars else text
    i, cmd = _last_box_start(tail, len(tail))
    if i < 0:
        return None
    box = _read_box(tail, i, cmd)
    return None if box is None else box[0]


def answer_region(text: str) -> str:
    """The part of a response that may hold the final answer (think blocks removed).

    Everything up to the last ``</think>`` is reasoning; so is everything from
    a ``<think>`` that is not closed after it.
    """
    close = text.rfind(_THINK_CLOSE)
    region = text[close + len(_THINK_CLOSE) :] if close >= 0 else text
    opened = region.find(_THINK_OPEN)
    return region[:opened] if opened >= 0 else region


# Between two boxes that form one list answer: only spacing, math delimiters,
# commas / semicolons and the connectives "and" / "or" (bare or in \text{}).
_JOIN_TOKENS = re.compile(
    r"\s+|\$|,|;|&|~|\\\\|\\[,;:! ()\[\]]|\\q?quad(?![a-zA-Z])"
    r"|(?<![a-zA-Z\\])(?:and|or)(?![a-zA-Z])"
    r"|\\(?:text|mbox|textnormal|textrm|mathrm)\s*\{\s*(?:and|or|,)?\s*\}"
)
_MAX_GAP_CHARS = 80
# Right after the last box: a connective followed by another value is a hedge.
_VALUE_START = r"[-+]?\s*\d|\\(?:boxed|fbox|frac|dfrac|tfrac|sqrt|pi|infty)(?![a-zA-Z])|\\\{"
_HEDGE_AFTER = re.compile(
    r"\s*(?:\$\$?|\\\)|\\\])?\s*(?:"
    # "or" / "and" / \pm: then a number, a command, a bracket, a variable or an expression
    r"(?:(?<![a-zA-Z\\])(?:or|and)(?![a-zA-Z])|\\(?:text|mbox)\s*\{\s*(?:or|and)\s*\}|\\(?:lor|vee|pm|mp)(?![a-zA-Z]))"
    r"\s*(?:\$\$?|\\\(|\\\[)?\s*(?:" + _VALUE_START
    + r"|\(|\[|\\(?:text|mbox|mathrm)\s*\{|[b-z](?![A-Za-z])|[A-Za-z]\s*[=^_+\-*/])"
    # "," / ";": then a number, a command, an expression or a one-word \text{} (", so x = 5",
    # ", (which ...)" and ", \text{which is even}" are prose)
    r"|[,;]\s*(?:\$\$?|\\\(|\\\[)?\s*(?:" + _VALUE_START
    + r"|[A-Za-z]\s*[\^_+\-*/]|\\(?:text|mbox|mathrm)\s*\{[^{}\s]{1,40}\}))"
)


def _is_join_gap(gap: str) -> bool:
    return len(gap) <= _MAX_GAP_CHARS and not _JOIN_TOKENS.sub("", gap)


def _hedged_after(text: str, end: int) -> bool:
    r"""True when another value follows the box ending at ``end`` through a connective.

    ``\boxed{4} or 9``, ``\boxed{4} or x^2``, ``\boxed{4} or \text{A}``, ``\boxed{4}, 9``,
    ``\boxed{4}, x^2+1`` and ``\boxed{4} \pm 1`` are hedges; ``\boxed{5}, so x = 5`` and
    ``\boxed{4} and I am done`` are not. Reads at most 200 characters after the box.
    """
    return _HEDGE_AFTER.match(text, end, min(len(text), end + 200)) is not None


def final_answer(text: str, max_chars: int = MAX_RESPONSE_CHARS) -> str | None:
    r"""The final answer of a response: the last box, with the boxes joined to it.

    * Only :func:`answer_region` of the last ``max_chars`` characters is searched.
    * Boxes right before the last one, separated from it only by spacing,
      ``$``, ``,``, ``;`` and "and"/"or" (bare or in ``\text{}``), are part of
      the answer: ``\boxed{2}, \boxed{3}`` is the list ``2, 3`` and
      ``\boxed{4} or \boxed{9}`` is the list ``4, 9`` (a hedge, unless the
      reference is that list). At most ``MAX_JOINED_BOXES`` are joined.
    * A value joined to the last box after it by a connective
      (``\boxed{4} or 9``, ``\boxed{4}, 9``, ``\boxed{4} \pm 1``): None.

    Returns None when there is no (balanced, short enough) box. Linear time.
    """
    if not isinstance(text, str) or not text:
        return None
    tail = text[-max_chars:] if len(text) > max_chars else text
    region = answer_region(tail)
    i, cmd = _last_box_start(region, len(region))
    if i < 0:
        return None
    box = _read_box(region, i, cmd)
    if box is None:
        return None
    content, end = box
    if _hedged_after(region, end):
        return None
    parts = [content]
    total = len(content)
    while len(parts) < MAX_JOINED_BOXES:
        j, prev_cmd = _last_box_start(region, i)
        if j < 0:
            break
        prev = _read_box(region, j, prev_cmd)
        if prev is None or prev[1] > i or not _is_join_gap(region[prev[1] : i]):
            break
        total += len(prev[0]) + 2
        if total > MAX_ANSWER_CHARS:
            return None
        parts.append(prev[0])
        i = j
    return ", ".join(reversed(parts))


# --------------------------------------------------------------------------- normalisation
_UNIT_WORDS = (
    "units?|cm|centimeters?|mm|millimeters?|meters?|km|kilometers?|inches|inch|feet|foot|ft|"
    "yards?|yd|miles?|mph|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|"
    "dollars?|cents?|degrees?|points?|pounds?|lbs?|ounces?|oz|grams?|kg|kilograms?|liters?|"
    "litres?|gallons?|ways|students|people|percent|sq\\.?\\s*units?"
)
_TRAILING_UNIT = re.compile(
    r"^(?P<value>.*?[\d}.)])\s*(?:(?:square|sq\.?|cubic)\s*)?(?:" + _UNIT_WORDS + r")(?:\^\{?[23]\}?)?\.?$"
)
# "\text{ cm}" at the end (leading space inside the braces: Minerva's unit form)
_TRAILING_TEXT_UNIT = re.compile(
    r"\\(?:text|mbox|textnormal)\{ (?P<unit>[^{}]*)\}\s*(?:\^\{?[23]\}?)?\s*\.?\s*$"
)
_UNIT_TEXT = re.compile(r"\s*[A-Za-z][A-Za-z .'/\-]*(?:\^\{?[23]\}?)?\.?\s*")
HEDGE_WORDS = frozenset(
    "or and nor not minus plus times but either neither except than more less least most maybe "
    "possibly perhaps probably approximately approx about around roughly nearly almost unless otherwise".split()
)
"""Words that make a trailing ``\\text{…}`` part of the answer, not a unit."""
_WORD = re.compile(r"[A-Za-z]+")
_CONNECTIVE = re.compile(r"(?<![A-Za-z\\])(?:,\s*)?(?:or|and)(?![A-Za-z])")
_TEXT_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|operatorname)\s*\{([^{}]*)\}"
)
_LATEX_SPACES = re.compile(r"\\[,;: ]|~|\\q?quad(?![a-zA-Z])")
_DIGIT_SPACE = re.compile(r"(?<=\d)\s+(?=\d)")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_SQRT_BARE = re.compile(r"\\sqrt([^{\[\\])")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_A_SLASH_B = re.compile(r"(-?\d+)/(\d+)")
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
_FRAC_RE = re.compile(r"([+-]?)\\frac\{(" + _NUMBER + r")\}\{(" + _NUMBER + r")\}")
_PLAIN_EQUALS = re.compile(r"(?<![<>!=\\])=(?!=)")
_GREEK = (
    "alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi|"
    "rho|sigma|tau|upsilon|phi|varphi|chi|psi|omega|Gamma|Delta|Theta|Lambda|Xi|Sigma|Phi|Psi|Omega"
)
_NAME = (
    rf"(?:[A-Za-z]|\\(?:{_GREEK}))(?![A-Za-z])"  # one letter or a Greek letter (not \pi)
    r"(?:_(?:\{[A-Za-z0-9]+\}|[A-Za-z0-9]))?"  # subscript
    r"(?:'+|\^\{?\\prime\}?)?"  # primes
    r"(?:\s*\(\s*[A-Za-z0-9]+(?:\s*,\s*[A-Za-z0-9]+)*\s*\))?"  # f(x), f(2), g(x, y)
)
_NAMED_EQUATION = re.compile(rf"\s*(?P<name>{_NAME})\s*(?<![<>!=\\])=(?!=)(?P<rest>.*)", re.DOTALL)
_FREE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_ROW_BREAK = "\x00"  # stands for LaTeX's "\\" while normalising


def _fix_fracs(s: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{2}`` -> ``\frac{1}{2}`` (iterative, linear)."""
    if "\\frac" not in s:
        return s
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        if s.startswith("\\frac", i) and not (i + 5 < n and s[i + 5].isalpha()):
            out.append("\\frac")
            i += 5
            for _ in range(2):
                if i >= n:
                    break
                if s[i] == "{":
                    depth, j = 0, i
                    while j < n:
                        if s[j] == "{":
                            depth += 1
                        elif s[j] == "}":
                            depth -= 1
                            if depth == 0:
                                break
                        j += 1
                    out.append(s[i : j + 1])
                    i = j + 1
                elif s[i] == "\\":
                    j = i + 1
                    while j < n and s[j].isalpha():
                        j += 1
                    out.append("{" + s[i:j] + "}")
                    i = j
                else:
                    out.append("{" + s[i] + "}")
                    i += 1
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _wrapped(s: str, open_: str, close: str) -> bool:
    """True when ``s`` is ``open_ … close`` with the first opener closing at the very end."""
    if len(s) < len(open_) + len(close) or not s.startswith(open_) or not s.endswith(close):
        return False
    depth = 0
    for j, c in enumerate(s):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0 and j != len(s) - 1:
                return False
    return depth == 0


def _strip_outer_braces(s: str) -> str:
    for _ in range(8):
        if not _wrapped(s, "{", "}"):
            return s
        s = s[1:-1].strip()
    return s


def _split_top(s: str, separators: str, need_space: bool = False) -> list[str]:
    """Split ``s`` at separator characters outside any bracket ``( [ {``.

    With ``need_space``, a ``,`` separates only when whitespace follows it.
    """
    parts: list[str] = []
    depth, last = 0, 0
    for j, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0 and c in separators:
            if need_space and c == "," and not (j + 1 < len(s) and s[j + 1].isspace()):
                continue
            parts.append(s[last:j])
            last = j + 1
    parts.append(s[last:])
    return parts


def _strip_trailing_text_unit(s: str) -> str:
    r"""``5\text{ cm}^2`` -> ``5``; ``4\text{ or more}`` and ``\text{ cm}`` alone stay."""
    m = _TRAILING_TEXT_UNIT.search(s)
    if m is None or not _UNIT_TEXT.fullmatch(m.group("unit")):
        return s
    if any(w.lower() in HEDGE_WORDS for w in _WORD.findall(m.group("unit"))):
        return s
    head = s[: m.start()].strip()
    return head if head else s


def _items_of(s: str) -> list[str]:
    r"""Top-level list items: ``;`` and ``,`` + space always separate; ``45,120`` is one number."""
    if _wrapped(s, "\\{", "\\}") and "\\{" not in s[2:-2] and "\\}" not in s[2:-2]:
        s = s[2:-2]  # a set written \{a, b\}: its elements are the items
    if "," not in s and ";" not in s:
        return [s.strip()] if s.strip() else []
    items: list[str] = []
    for chunk in _split_top(s, ",;", need_space=True):
        chunk = chunk.strip()
        if _THOUSANDS.fullmatch(chunk):
            items.append(chunk.replace(",", ""))
        else:
            items.extend(part.strip() for part in _split_top(chunk, ","))
    return [item for item in items if item]


def _drop_names(items: list[str]) -> list[str]:
    r"""Drop left-hand sides that are names: ``x = 3`` -> ``3``; ``4 = 9`` stays.

    One item: dropped when its left side is a name. Several items: dropped
    when every item assigns the same name (``x = 4, x = 9``), or when only the
    first item has an ``=`` (``x = 4, 9``). Distinct names (``x = 3, y = 4``)
    are kept: they are a point, not a set.
    """
    matches = [_NAMED_EQUATION.fullmatch(item) for item in items]
    ok = [m is not None and m.group("rest").strip() and not _PLAIN_EQUALS.search(m.group("rest")) for m in matches]
    if len(items) == 1:
        return [matches[0].group("rest").strip()] if ok[0] else items
    if all(ok):
        names = {re.sub(r"\s+", "", m.group("name")) for m in matches if m is not None}
        if len(names) == 1:
            return [m.group("rest").strip() for m in matches if m is not None]
        return items
    if ok[0] and not any(_PLAIN_EQUALS.search(item) for item in items[1:]):
        return [matches[0].group("rest").strip(), *items[1:]]
    return items


@functools.lru_cache(maxsize=4096)  # references repeat (several samples per prompt)
def rewrite_items(answer: str) -> tuple[str, ...]:
    r"""The answer as list items after the rules that decide *what* the answer is.

    LaTeX is kept (spaces included), so the items can still be parsed:
    ``$``, ``\%``, degrees, ``\left``/``\right`` and LaTeX spacing removed; a
    trailing unit removed; ``or`` / ``and`` made list separators; text
    wrappers unwrapped; list items split (:func:`_items_of`); left-hand sides
    that are names dropped (:func:`_drop_names`). ``\\`` is kept as ``\x00``.
    """
    s = str(answer).strip()
    s = s.replace(_ROW_BREAK, "").replace("\\\\", _ROW_BREAK)
    s = s.replace("\n", " ").replace("\\!", "").replace("{,}", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    s = _LEFT_RIGHT.sub("", s)
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    s = _LATEX_SPACES.sub(" ", s)
    s = _strip_trailing_text_unit(s)
    s = _CONNECTIVE.sub(", ", s)
    for _ in range(8):
        new = _TEXT_WRAPPER.sub(r"\1", s)
        if new == s:
            break
        s = new
    s = s.strip()
    m = _TRAILING_UNIT.match(s)
    if m:
        s = m.group("value")
    s = _DIGIT_SPACE.sub("", s)  # "1\,000" is 1000, as the canonical form (no spaces) reads it
    s = _strip_outer_braces(s.strip())
    items = [item[:-1].rstrip() if item.endswith(".") and not item.endswith("..") else item for item in _items_of(s)]
    return tuple(_drop_names([item for item in items if item]))


def _canonical(item: str) -> str:
    r"""One item in canonical form: no spaces, ``\frac{a}{b}``, ``\sqrt{a}``, no trailing ``.``."""
    s = re.sub(r"\s+", "", item)
    s = _SQRT_BARE.sub(r"\\sqrt{\1}", s)
    s = _fix_fracs(s)
    s = s.rstrip(".")
    if s.startswith("."):
        s = "0" + s
    s = s.replace("{.", "{0.").replace("-.", "-0.")
    m = _A_SLASH_B.fullmatch(s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    s = _strip_outer_braces(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return s.replace(_ROW_BREAK, "\\\\")


@functools.lru_cache(maxsize=4096)
def answer_items(answer: str) -> tuple[str, ...]:
    r"""Normalised list items of an answer (one item for a single value).

    Deterministic, linear-time (regexes are anchored or simple), never
    raises on a ``str``. An answer longer than ``MAX_ANSWER_CHARS`` is one
    item, only stripped of whitespace.
    """
    s = str(answer)
    if len(s) > MAX_ANSWER_CHARS:
        return (re.sub(r"\s+", "", s[: MAX_ANSWER_CHARS * 4]),)
    return tuple(c for c in (_canonical(item) for item in rewrite_items(s)) if c)


def normalize_answer(answer: str) -> str:
    r"""Normalise a final answer in the style of the MATH benchmark (items joined by ``,``).

    Examples (hand-checked): ``"\dfrac{1}{2}"`` -> ``"\frac{1}{2}"``,
    ``"5\text{ cm}"`` -> ``"5"``, ``"x = 3"`` -> ``"3"``, ``"1,000"`` ->
    ``"1000"``, ``"\left( 1, 2 \right)"`` -> ``"(1,2)"``, ``"0.5."`` ->
    ``"\frac{1}{2}"``, ``"4 \text{ or } 9"`` -> ``"4,9"``, ``"4 = 9"`` -> ``"4=9"``.
    """
    return ",".join(answer_items(answer))


def numeric_value(normalized: str) -> Fraction | None:
    r"""Exact value of an integer, decimal or ``\frac{a}{b}`` answer, else None."""
    if not normalized or len(normalized) > 100:
        return None
    try:
        if _NUMBER_RE.fullmatch(normalized):
            return Fraction(normalized)
        m = _FRAC_RE.fullmatch(normalized)
        if m:
            den = Fraction(m.group(3))
            if den == 0:
                return None
            value = Fraction(m.group(2)) / den
            return -value if m.group(1) == "-" else value
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def _key(item: str) -> object:
    value = numeric_value(item)
    return item if value is None else value


def rule_equivalent(pred: str, reference: str) -> bool:
    """Equal single items (strings or exact numbers), or equal sets of list items."""
    a, b = answer_items(pred), answer_items(reference)
    if not a or not b:
        return False
    if len(a) == 1 and len(b) == 1:
        return a[0] == b[0] or _key(a[0]) == _key(b[0])
    return {_key(x) for x in a} == {_key(x) for x in b}


def _shape(items: Sequence[str]) -> tuple[int, bool]:
    r"""(values, has an equation whose left side is not a name) of rewritten items.

    ``values``: distinct items, ``\pm``/``\mp`` counting two, and several
    assignments to distinct names (``x = 3, y = 4``) counting as one point.
    """
    named = [_NAMED_EQUATION.fullmatch(item) for item in items]
    odd = any(_PLAIN_EQUALS.search(item) and m is None for item, m in zip(items, named))
    if len(items) > 1 and all(named):
        return 1, odd
    values = len({re.sub(r"\s+", "", item) for item in items})
    values += sum(1 for item in items if "\\pm" in item or "\\mp" in item)
    return values, odd


def _words(items: Sequence[str]) -> set[str]:
    """Runs of 3+ letters that are not LaTeX commands (``maybe``, ``more``; not ``\\frac``)."""
    return {w for item in items for w in _FREE_WORD.findall(item)}


def same_shape(pred: str, reference: str) -> bool:
    r"""True when the symbolic check may decide: as many values, the same kind, no extra words.

    False for a list or hedge against a single value (``4, 9`` vs ``4``); for an
    equation with a non-name left side on one side only (``4 = 9`` vs ``9``,
    ``11a + c`` vs ``7 = 11a + c``): math-verify would compare the right-hand
    sides, which the rules do not allow; and when the prediction has a word the
    reference lacks (``4 more``, ``rac34 (or maybe 4)``): math-verify drops
    trailing words and unparsable tails.
    """
    p, r = rewrite_items(pred), rewrite_items(reference)
    return _shape(p) == _shape(r) and not _words(p) - _words(r)


def symbolic_form(answer: str) -> str:
    """The rule-rewritten answer given to math-verify (items joined by ``, ``)."""
    return ", ".join(rewrite_items(answer)).replace(_ROW_BREAK, "\\\\")


def math_verify_available() -> bool:
    """True when the optional ``math-verify`` package can be imported."""
    return importlib.util.find_spec("math_verify") is not None


# --------------------------------------------------------------------------- grader
class MathGrader:
    r"""Scores responses against reference answers: 1.0 when equivalent, else 0.0.

    Args:
        use_math_verify: add the symbolic check when math-verify is installed.
        time_limit: wall-clock seconds per symbolic check (> 0); start-up of
            the helper process (imports, about 1-3 s) is not counted.
        num_workers: helper processes for symbolic checks run in parallel (>= 1).
        memory_limit_mb: address-space cap added on top of the helper's size
            after its imports (>= 64; 0 disables the cap).
        max_response_chars: trailing characters of a response that are searched.

    Thread-safe and fork/pickle-safe (helpers are per process, started lazily).
    ``stats`` counts checks, time-outs and errors (see :class:`GraderStats`).
    """

    def __init__(
        self,
        use_math_verify: bool = True,
        time_limit: float = 5.0,
        num_workers: int = 1,
        memory_limit_mb: int = 2048,
        max_response_chars: int = MAX_RESPONSE_CHARS,
    ) -> None:
        checks.boolean("use_math_verify", use_math_verify)
        self.time_limit = checks.real("time_limit", time_limit, 0.0, 600.0, low_open=True)
        self.num_workers = checks.integer("num_workers", num_workers, 1, 64)
        self.memory_limit_mb = checks.integer("memory_limit_mb", memory_limit_mb, 0)
        if 0 < self.memory_limit_mb < 64:
            raise checks.ArgumentError("memory_limit_mb", "0 (no cap) or an int >= 64", memory_limit_mb)
        self.max_response_chars = checks.integer("max_response_chars", max_response_chars, 1)
        self.stats = GraderStats()
        self.symbolic = bool(use_math_verify) and math_verify_available() and os.name == "posix"
        if use_math_verify and not self.symbolic:
            log.warning(
                "math-verify is not installed (or this is not a POSIX system): "
                "MATH answers are checked by normalisation only"
            )
        script = str(Path(__file__).with_name("_symbolic_worker.py"))
        cpu_backstop = max(2.0 * self.time_limit, self.time_limit + 1.0)
        self._workers = [
            SubprocessWorker(script, args=[str(self.memory_limit_mb), f"{cpu_backstop:g}"], max_requests=20_000)
            for _ in range(self.num_workers)
        ]

    # -- public -------------------------------------------------------------------
    def grade(self, response: str, reference: str) -> float:
        """Score one response against one reference answer (already extracted from its solution)."""
        return self.grade_batch([response], [reference])[0]

    def grade_batch(self, responses: Sequence[str], references: Sequence[str]) -> list[float]:
        """Score responses against reference answers, pairwise. Never raises on model output."""
        if len(responses) != len(references):
            raise ValueError(f"got {len(responses)} responses for {len(references)} references")
        scores = [0.0] * len(responses)
        pending: list[tuple[int, str, str]] = []
        for i, (response, reference) in enumerate(zip(responses, references)):
            self.stats.add("checks")
            try:
                pred = final_answer(response, self.max_response_chars)
                if pred is None:
                    continue
                reference = str(reference)
                if rule_equivalent(pred, reference):
                    scores[i] = 1.0
                elif (
                    self.symbolic
                    and len(pred) <= SYMBOLIC_MAX_CHARS
                    and len(reference) <= SYMBOLIC_MAX_CHARS
                    and same_shape(pred, reference)
                ):
                    pending.append((i, symbolic_form(pred), symbolic_form(reference)))
            except Exception:  # noqa: BLE001 - a grader never raises on model output
                log.debug("MATH rule-based check failed", exc_info=True)
                self.stats.add("errors")
        if pending:
            for i, equal in self._symbolic_many(pending):
                if equal:
                    scores[i] = 1.0
        return scores

    def start(self) -> None:
        """Start the helper processes now (optional; otherwise on first use)."""
        if self.symbolic:
            for worker in self._workers:
                try:
                    worker.start()
                except WorkerError as exc:
                    self._disable(exc)
                    return

    def close(self) -> None:
        """Stop the helper processes."""
        for worker in self._workers:
            worker.close()

    # -- symbolic -------------------------------------------------------------------
    def _disable(self, exc: Exception) -> None:
        if self.symbolic:
            log.warning("symbolic MATH check disabled: %s", exc)
        self.symbolic = False

    def _symbolic_one(self, worker: SubprocessWorker, gold: str, pred: str) -> bool:
        if not self.symbolic:
            return False
        try:
            answer = worker.call({"gold": gold, "pred": pred}, timeout=self.time_limit)
        except WorkerTimeout:
            self.stats.add("timeouts")
            return False
        except WorkerError as exc:
            self.stats.add("errors")
            if isinstance(exc, WorkerStartError) and not worker.ready_info:
                self._disable(exc)  # never started: math-verify unusable in a subprocess here
            return False
        if not answer.get("ok"):
            self.stats.add("errors")
            return False
        return bool(answer.get("equal"))

    def _symbolic_many(self, items: list[tuple[int, str, str]]) -> list[tuple[int, bool]]:
        if len(items) == 1 or self.num_workers == 1:
            worker = self._workers[0]
            return [(i, self._symbolic_one(worker, gold, pred)) for i, pred, gold in items]
        free: SimpleQueue[SubprocessWorker] = SimpleQueue()
        for worker in self._workers:
            free.put(worker)

        def run(item: tuple[int, str, str]) -> tuple[int, bool]:
            i, pred, gold = item
            worker = free.get()
            try:
                return i, self._symbolic_one(worker, gold, pred)
            finally:
                free.put(worker)

        with ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="math-grader") as pool:
            return list(pool.map(run, items))
