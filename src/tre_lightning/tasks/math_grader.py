r"""The MATH grader: last ``\boxed{}`` answer, MATH-style normalisation, symbolic check.

Pipeline for one response (every step bounded by construction except the
last, which runs in a helper process under a hard wall-clock limit):

1. :func:`last_boxed_answer`: the content of the last ``\boxed{…}`` (nested
   braces, escaped ``\{ \}``), ``\boxed 5`` or ``\fbox{…}``; only the last
   ``MAX_RESPONSE_CHARS`` characters of a response are scanned and an answer
   longer than ``MAX_ANSWER_CHARS`` is rejected. No answer: reward 0.
2. :func:`normalize_answer`: the normalisation of the MATH benchmark
   (Hendrycks et al.'s ``strip_string``) plus the unit/text handling of the
   Minerva evaluation: ``\left``/``\right``, ``\dfrac``/``\tfrac``, spaces,
   ``\!``, trailing ``.``, units (``\text{ cm}``, ``5 inches``), degrees,
   ``\%``, ``\$``, ``x = …`` with a short left side, ``\frac12``,
   ``\sqrt3``, ``a/b``, ``1,000``, outer braces.
3. Equal strings, or equal exact numbers (:func:`numeric_value`: integers,
   decimals, ``\frac{a}{b}``; so ``0.5`` = ``\frac12`` = ``1/2``): reward 1.
4. Otherwise, when math-verify is installed (``pip install
   tre-lightning[math]``) and the check is enabled: symbolic equivalence via
   math-verify (LaTeX extraction only; its plain-expression path would call
   sympy's ``parse_expr``, i.e. ``eval``) in a persistent helper process
   with a per-check wall-clock limit, an address-space cap, and
   restart-on-hang (:class:`~tre_lightning.tasks.timeouts.SubprocessWorker`).
   A time-out or error scores 0 and is counted in :attr:`MathGrader.stats`.

Without math-verify the grader uses steps 1-3 only (documented fallback).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from queue import SimpleQueue

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

_BOX_COMMANDS = ("\\boxed", "\\fbox")


# --------------------------------------------------------------------------- extraction
def _last_command(text: str, cmd: str) -> int:
    """Index of the last ``cmd`` not followed by a letter (``\\boxedx`` is another macro)."""
    end = len(text)
    while True:
        i = text.rfind(cmd, 0, end)
        if i < 0:
            return -1
        after = i + len(cmd)
        if after >= len(text) or not text[after].isalpha():
            return i
        end = i


def last_boxed_answer(text: str, max_chars: int = MAX_RESPONSE_CHARS) -> str | None:
    r"""The content of the last ``\boxed{…}`` / ``\boxed …`` / ``\fbox{…}`` in ``text``.

    Returns None when there is none, when its braces do not balance, or when
    the answer is longer than ``MAX_ANSWER_CHARS``. Linear in the scanned tail.
    """
    if not isinstance(text, str) or not text:
        return None
    tail = text[-max_chars:] if len(text) > max_chars else text
    best, best_cmd = -1, ""
    for cmd in _BOX_COMMANDS:
        i = _last_command(tail, cmd)
        if i > best:
            best, best_cmd = i, cmd
    if best < 0:
        return None
    n = len(tail)
    start = best + len(best_cmd)
    k = start
    while k < n and k - start <= MAX_ANSWER_CHARS and tail[k] in " \t":
        k += 1
    if k < n and tail[k] == "{":
        depth = 0
        m = k
        limit = min(n, k + MAX_ANSWER_CHARS + 2)
        while m < limit:
            c = tail[m]
            if c == "\\" and m + 1 < n and tail[m + 1] in "{}":
                m += 2  # escaped brace: part of the answer, not structure
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return tail[k + 1 : m]
            m += 1
        return None
    if best_cmd == "\\boxed" and k > start:  # "\boxed 5": up to whitespace or "$"
        m = k
        limit = min(n, k + MAX_ANSWER_CHARS + 1)
        while m < limit and tail[m] not in " \t\n$":
            m += 1
        answer = tail[k:m]
        return answer if answer and m - k <= MAX_ANSWER_CHARS else None
    return None


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
_TEXT_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|operatorname)\s*\{([^{}]*)\}"
)
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_SQRT_BARE = re.compile(r"\\sqrt([^{\[\\])")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_A_SLASH_B = re.compile(r"(-?\d+)/(\d+)")
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
_FRAC_RE = re.compile(r"([+-]?)\\frac\{(" + _NUMBER + r")\}\{(" + _NUMBER + r")\}")


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


def _strip_outer_braces(s: str) -> str:
    for _ in range(8):
        if len(s) < 2 or s[0] != "{" or s[-1] != "}":
            return s
        depth = 0
        for j, c in enumerate(s):
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0 and j != len(s) - 1:
                    return s  # "{a}{b}": the first brace closes early
        s = s[1:-1]
    return s


def normalize_answer(answer: str) -> str:
    r"""Normalise a final answer in the style of the MATH benchmark.

    Deterministic, linear-time (regexes are anchored or simple), never
    raises on a ``str``. Answers longer than ``MAX_ANSWER_CHARS`` are only
    stripped of whitespace.

    Examples (hand-checked): ``"\dfrac{1}{2}"`` -> ``"\frac{1}{2}"``,
    ``"5\text{ cm}"`` -> ``"5"``, ``"x = 3"`` -> ``"3"``, ``"1,000"`` ->
    ``"1000"``, ``"\left( 1, 2 \right)"`` -> ``"(1,2)"``, ``"0.5."`` -> ``"0.5"``.
    """
    s = str(answer).strip()
    if len(s) > MAX_ANSWER_CHARS:
        return re.sub(r"\s+", "", s[: MAX_ANSWER_CHARS * 4])
    # "\\" (a LaTeX row break) is protected so that removing thin spaces cannot merge rows
    s = s.replace("\x00", "").replace("\\\\", "\x00")
    s = s.replace("\n", " ").replace("\\!", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LEFT_RIGHT.sub("", s)
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    # units written as "\text{ unit}" (leading space inside the braces)
    for cmd in ("\\text{ ", "\\mbox{ ", "\\textnormal{ "):
        if cmd in s:
            head = s.split(cmd, 1)[0]
            if head.strip():
                s = head
    for _ in range(8):
        new = _TEXT_WRAPPER.sub(r"\1", s)
        if new == s:
            break
        s = new
    s = s.strip()
    m = _TRAILING_UNIT.match(s)
    if m:
        s = m.group("value")
    for space in ("\\,", "\\;", "\\:", "\\ ", "~", "\\displaystyle", "\\quad", "\\qquad", "{,}"):
        s = s.replace(space, "")
    s = re.sub(r"\s+", "", s)
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if len(lhs) <= 2 and rhs:
            s = rhs
    s = _SQRT_BARE.sub(r"\\sqrt{\1}", s)
    s = _fix_fracs(s)
    s = s.rstrip(".")
    if s.startswith("."):
        s = "0" + s
    s = s.replace("{.", "{0.").replace("-.", "-0.")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    m = _A_SLASH_B.fullmatch(s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    s = _strip_outer_braces(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return s.replace("\x00", "\\\\")


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


def rule_equivalent(pred: str, reference: str) -> bool:
    """Equal after :func:`normalize_answer`, or equal exact numbers."""
    a, b = normalize_answer(pred), normalize_answer(reference)
    if not a:
        return False
    if a == b:
        return True
    va, vb = numeric_value(a), numeric_value(b)
    return va is not None and vb is not None and va == vb


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
        if not time_limit > 0 or time_limit > 600:
            raise ValueError(f"time_limit must be in (0, 600] seconds, got {time_limit}")
        if not 1 <= num_workers <= 64:
            raise ValueError(f"num_workers must be in [1, 64], got {num_workers}")
        if memory_limit_mb != 0 and memory_limit_mb < 64:
            raise ValueError(f"memory_limit_mb must be 0 (no cap) or >= 64, got {memory_limit_mb}")
        if max_response_chars < 1:
            raise ValueError(f"max_response_chars must be >= 1, got {max_response_chars}")
        self.time_limit = float(time_limit)
        self.num_workers = int(num_workers)
        self.memory_limit_mb = int(memory_limit_mb)
        self.max_response_chars = int(max_response_chars)
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
        """Score one response against one reference answer (already extracted)."""
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
                pred = last_boxed_answer(response, self.max_response_chars)
                if pred is None:
                    continue
                if rule_equivalent(pred, reference):
                    scores[i] = 1.0
                elif self.symbolic and len(pred) <= SYMBOLIC_MAX_CHARS and len(str(reference)) <= SYMBOLIC_MAX_CHARS:
                    pending.append((i, pred, str(reference)))
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
