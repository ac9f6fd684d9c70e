r"""Differential test of the graders against the rules stated in docs/tasks.md.

    python benchmarks/grader_diff.py                      # rules only and, if installed, symbolic
    python benchmarks/grader_diff.py --per-family 200 --json OUT.json
    PYTHONPATH=/path/to/old/src python benchmarks/grader_diff.py   # the same cases, another version

Generates responses (seeded) in rule families and, for each, the verdict the stated rules
give, decided by construction here (the expected verdict never comes from the grader):

MATH (``MathGrader``; "rules" = ``use_math_verify=False``, "symbolic" = with math-verify):

* ``normalisation``: ``\dfrac``, ``p/q``, exact decimals, ``x = n``, units, ``^\circ``,
  ``\%``, ``\$``, trailing dot, thousands separators, reordered unbracketed lists -> 1;
* ``symbolic``: ``a\sqrt b`` = ``\sqrt{a^2 b}``, ``(x+a)^2`` expanded, ``k \geq x`` =
  ``x \leq k``, ``\frac{\sqrt b}{b}`` = ``\frac{1}{\sqrt b}`` -> 1 with math-verify, 0 without
  (the documented fallback);
* ``hedges``: ``r \text{ or } w``, ``r \text{ and } w``, ``r, w``, ``x = r \text{ or } x = w``,
  ``r \text{ minus } w``, ``r \text{ or more}`` against the single value ``r`` -> 0;
* ``left-hand sides``: ``w = r``, ``r = w``, ``w + 1 = r``, and ``E`` against ``c = E`` -> 0;
  ``x = r``, ``a_1 = r``, ``f(x) = r`` -> 1;
* ``commas``: ``45,120`` = 45120 -> 1; ``45, 120`` vs 45120 -> 0; ``45,120`` vs the list
  ``45, 120`` -> 0; ``120, 45`` vs ``45, 120`` -> 1; ``(45,120)`` vs ``(45, 120)`` -> 1;
* ``several boxes``: boxes joined by or / and / commas hedge -> 0 (list references -> 1);
  an earlier draft superseded by a later box after prose counts as the later box;
* ``think blocks``: a box inside ``<think>…</think>`` is not the answer;
* ``text after the box``: the text never changes the answer, but a value joined to the
  box by a connective (``\boxed{r} or w``) is a hedge -> 0;
* ``wrong values``: another value, the opposite sign, a rounded decimal -> 0.

Countdown (``CountdownGrader()``, binary): correct witnesses (spacing, form feeds, a stray
second closing tag, a doubled opening tag) -> 1; a wrong value, the right value leaving a
number unused, a reused number, a foreign number, a decimal or trailing-dot literal, no tags,
``=`` or ``×`` in the answer -> 0.

Reports, per family and grader, how many responses agree with the stated verdict, how many
disagree by scoring 1 where the rules say 0 (accepted wrongly: a reward hack) or 0 where they
say 1 (rejected wrongly), and a few disagreements. Only the public ``grade`` methods are used, so the script runs unchanged on
older versions of the package (to measure "before").
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
from collections import defaultdict
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from tre_lightning.tasks.countdown_grader import CountdownGrader
from tre_lightning.tasks.math_grader import MathGrader, math_verify_available

Case = tuple[str, str, float]  # response, reference, verdict of the stated rules
SYMBOLIC_ONLY = "symbolic"  # this family's verdict is 1 only where math-verify is used


def _box(s: str) -> str:
    return f"\\boxed{{{s}}}"


def _value(rng: random.Random) -> str:
    """A single reference value: an integer, a fraction or a surd."""
    kind = rng.random()
    if kind < 0.5:
        return str(rng.randint(-99, 999))
    if kind < 0.8:
        q = rng.randint(2, 12)
        p = rng.choice([k for k in range(1, 4 * q) if math.gcd(k, q) == 1])
        return f"\\frac{{{p}}}{{{q}}}"
    return f"{rng.randint(2, 9)}\\sqrt{{{rng.choice([2, 3, 5, 6, 7])}}}"


def _pair(rng: random.Random) -> tuple[str, str]:
    r = _value(rng)
    w = _value(rng)
    while w == r:
        w = _value(rng)
    return r, w


def math_normalisation(rng: random.Random) -> list[Case]:
    n = rng.randint(1, 999)
    big = rng.randint(1000, 9_999_999)
    q = rng.choice([2, 4, 5, 8, 10, 20, 25])
    p = rng.choice([k for k in range(1, q) if math.gcd(k, q) == 1])
    decimal = str(Fraction(p, q).numerator / Fraction(p, q).denominator)
    a, b = rng.sample(range(-20, 40), 2)
    return [
        (_box(f"\\dfrac{{{p}}}{{{q}}}"), f"\\frac{{{p}}}{{{q}}}", 1.0),
        (_box(f"{p}/{q}"), f"\\frac{{{p}}}{{{q}}}", 1.0),
        (_box(decimal), f"\\frac{{{p}}}{{{q}}}", 1.0),
        (_box(f"x = {n}"), str(n), 1.0),
        (_box(f"{n} \\text{{ {rng.choice(['cm', 'inches', 'square feet', 'dollars', 'ways'])}}}"), str(n), 1.0),
        (_box(f"{n}^\\circ"), str(n), 1.0),
        (_box(f"{n}\\%"), str(n), 1.0),
        (_box(f"\\${n}"), str(n), 1.0),
        (f"The answer is {_box(f'{n}.')}", str(n), 1.0),
        (_box(f"{big:,}"), str(big), 1.0),
        (_box(f"{b}, {a}"), f"{a}, {b}", 1.0),
        (_box(f"\\left( {a}, {b} \\right)"), f"({a},{b})", 1.0),
        (_box(f"({b}, {a})"), f"({a}, {b})", 0.0),  # tuples are ordered
    ]


def math_symbolic(rng: random.Random) -> list[Case]:
    a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
    c = rng.randint(1, 9)
    k = rng.randint(-9, 9)
    return [
        (_box(f"{a}\\sqrt{{{b}}}"), f"\\sqrt{{{a * a * b}}}", 1.0),
        (_box(f"(x+{c})^2"), f"x^2+{2 * c}x+{c * c}", 1.0),
        (_box(f"{k} \\geq x"), f"x \\leq {k}", 1.0),
        (_box(f"\\frac{{\\sqrt{{{b}}}}}{{{b}}}"), f"\\frac{{1}}{{\\sqrt{{{b}}}}}", 1.0),
    ]


def math_hedges(rng: random.Random) -> list[Case]:
    r, w = _pair(rng)
    nonzero = w if w != "0" else "1"
    return [
        (_box(f"{r} \\text{{ or }} {w}"), r, 0.0),
        (_box(f"{w} \\text{{ or }} {r}"), r, 0.0),
        (_box(f"{r} \\text{{ and }} {w}"), r, 0.0),
        (_box(f"{r}, {w}"), r, 0.0),
        (_box(f"x = {r} \\text{{ or }} x = {w}"), r, 0.0),
        (_box(f"{r} \\text{{ minus }} {nonzero}"), r, 0.0),
        (_box(f"{r} \\text{{ or more}}"), r, 0.0),
        (_box(f"x = {r} \\text{{ or }} x = {w}"), f"{r}, {w}", 1.0),  # a solution set: equivalent
    ]


def math_left_hand_sides(rng: random.Random) -> list[Case]:
    r, w = _pair(rng)
    p, c, n = rng.randint(2, 19), rng.choice("bcd"), rng.randint(1, 99)
    return [
        (_box(f"{w} = {r}"), r, 0.0),
        (_box(f"{r} = {w}"), r, 0.0),
        (_box(f"{w} + 1 = {r}"), r, 0.0),
        (_box(f"{p}a+{c}"), f"{n} = {p}a+{c}", 0.0),
        (_box(f"x = {r}"), r, 1.0),
        (_box(f"a_1 = {r}"), r, 1.0),
        (_box(f"f(x) = {r}"), r, 1.0),
    ]


def math_commas(rng: random.Random) -> list[Case]:
    head, tail = rng.randint(1, 999), rng.randint(0, 999)
    number, grouped, spaced = head * 1000 + tail, f"{head},{tail:03d}", f"{head}, {tail:03d}"
    a, b = rng.sample(range(1, 999), 2)
    return [
        (_box(grouped), str(number), 1.0),
        (_box(spaced), str(number), 0.0),
        (_box(grouped), spaced, 0.0),
        (_box(f"{b}, {a}"), f"{a}, {b}", 1.0),
        (_box(f"({a},{b})"), f"({a}, {b})", 1.0),
        (_box(f"{head}\\,{tail:03d}"), str(number), 1.0),
    ]


def math_several_boxes(rng: random.Random) -> list[Case]:
    r, w = _pair(rng)
    return [
        (f"{_box(r)} or {_box(w)}", r, 0.0),
        (f"{_box(w)} or {_box(r)}", r, 0.0),
        (f"${_box(w)}$, ${_box(r)}$", r, 0.0),
        (f"{_box(r)}{_box(w)}", r, 0.0),
        (f"So {_box(r)}. Checking again, the answer is {_box(w)}.", r, 0.0),
        (f"So {_box(w)}. Checking again, the answer is {_box(r)}.", r, 1.0),
        (f"{_box(r)} and {_box(w)}", f"{r}, {w}", 1.0),
    ]


def math_think(rng: random.Random) -> list[Case]:
    r, w = _pair(rng)
    return [
        (f"<think>It is {_box(r)}.</think> The answer is {r}.", r, 0.0),
        (f"<think>It is {_box(r)}.</think> The answer is {_box(w)}.", r, 0.0),
        (f"<think>It is {_box(w)}.</think> The answer is {_box(r)}.", r, 1.0),
        (f"The answer is {_box(r)}. <think>Or {_box(w)}", r, 1.0),
        (f"<think>never closed {_box(r)}", r, 0.0),
    ]


def math_padding(rng: random.Random) -> list[Case]:
    r, w = _pair(rng)
    return [
        (f"{_box(w)}. The answer is {r}.", r, 0.0),
        (f"{_box(w)}\n\nFinal Answer: The final answer is ${r}$.", r, 0.0),
        (f"{_box(r)} or {w}", r, 0.0),
        (f"{_box(r)}, {w}", r, 0.0),
        (f"{_box(r)}. I hope this helps! {w} was a wrong turn.", r, 1.0),
        (f"{_box(r)}, so x = {r}.", r, 1.0),
    ]


def math_wrong(rng: random.Random) -> list[Case]:
    r, w = _pair(rng)
    n = rng.randint(1, 999)
    q = rng.choice([3, 6, 7, 9, 11])
    return [
        (_box(w), r, 0.0),
        (_box(f"-{n}"), str(n), 0.0),
        (_box(f"{1 / q:.2f}"), f"\\frac{{1}}{{{q}}}", 0.0),
        ("The answer is 42.", "42", 0.0),
    ]


MATH_FAMILIES: dict[str, Callable[[random.Random], list[Case]]] = {
    "normalisation": math_normalisation,
    SYMBOLIC_ONLY: math_symbolic,
    "hedges": math_hedges,
    "left-hand sides": math_left_hand_sides,
    "commas": math_commas,
    "several boxes": math_several_boxes,
    "think blocks": math_think,
    "text after the box": math_padding,
    "wrong values": math_wrong,
}

CountdownCase = tuple[str, list[int], int, float]


def _countdown_instance(rng: random.Random) -> tuple[list[int], str, int]:
    """Numbers, an expression using each once, and its value (computed here, not parsed)."""
    while True:
        nums = [rng.randint(1, 30) for _ in range(rng.randint(3, 4))]
        a, b, c = nums[0], nums[1], nums[2]
        value = a * b + c
        text = f"{a} * {b} + {c}"
        if len(nums) == 4:
            value, text = value - nums[3], f"({text}) - {nums[3]}"
        if value > 0:
            return nums, text, value


def countdown_cases(rng: random.Random) -> dict[str, list[CountdownCase]]:
    nums, text, value = _countdown_instance(rng)
    a, b, c = nums[0], nums[1], nums[2]
    extra = rng.randint(1, 30)
    foreign = a + rng.randint(1, 5)
    foreign_value = foreign * b + c - (nums[3] if len(nums) == 4 else 0)
    return {
        "correct": [
            (f"<think>try</think><answer>{text}</answer>", nums, value, 1.0),
            (f"<answer>{text.replace(' ', chr(12))}</answer>", nums, value, 1.0),  # form feeds
            (f"<answer>{text}</answer></answer>", nums, value, 1.0),  # stray second closing tag
            (f"<answer><answer>{text}</answer>", nums, value, 1.0),  # doubled opening tag: the later one
            (f"<answer>1 + 2</answer> on second thought <answer>{text}</answer>", nums, value, 1.0),
        ],
        "wrong": [
            (f"<answer>{text}</answer>", nums, value + 1, 0.0),
            (f"<answer>{a} * {b}</answer>", [*nums, extra], a * b, 0.0) if len(nums) == 3 else
            (f"<answer>{a} * {b} + {c}</answer>", nums, a * b + c, 0.0),  # right value, a number unused
            (f"<answer>{a} * {a} + {b} + {c}</answer>", [a, b, c], a * a + b + c, 0.0),  # a reused
            (f"<answer>{text.replace(str(a), str(foreign), 1)}</answer>", nums, foreign_value, 0.0),
            (f"<answer>{text}.</answer>", nums, value, 0.0),  # a sentence dot
            (f"<answer>{a}. * {b} + {c}</answer>", [a, b, c], a * b + c, 0.0),  # trailing-dot literal
            (f"<answer>{a}.0 * {b} + {c}</answer>", [a, b, c], a * b + c, 0.0),
            (f"{text}", nums, value, 0.0),  # no tags
            (f"<answer>{text} = {value}</answer>", nums, value, 0.0),
            (f"<answer>{a} × {b} + {c}</answer>", [a, b, c], a * b + c, 0.0),
        ],
    }


def _record(results: dict, key: tuple[str, str], case: tuple, expected: float, got: float) -> None:
    entry = results[key]
    entry["n"] += 1
    if got == expected:
        entry["agree"] += 1
        return
    entry["accepted_wrongly" if got > expected else "rejected_wrongly"] += 1
    if len(entry["disagreements"]) < 5:
        entry["disagreements"].append({"case": [str(x) for x in case[:-1]], "expected": expected, "got": got})


def run(per_family: int, seed: int, symbolic: bool, time_limit: float) -> dict[str, Any]:
    rng = random.Random(seed)
    results: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {"n": 0, "agree": 0, "accepted_wrongly": 0, "rejected_wrongly": 0, "disagreements": []}
    )
    graders = {"rules": MathGrader(use_math_verify=False)}
    if symbolic:
        graders["symbolic"] = MathGrader(use_math_verify=True, time_limit=time_limit)
    for family, make in MATH_FAMILIES.items():
        cases = [case for _ in range(per_family) for case in make(rng)]
        for name, grader in graders.items():
            for case in cases:
                response, reference, expected = case
                if family == SYMBOLIC_ONLY and name == "rules":
                    expected = 0.0  # documented fallback: no symbolic equivalence without math-verify
                _record(results, (f"math/{family}", name), case, expected, grader.grade(response, reference))
    countdown = CountdownGrader()
    for _ in range(per_family):
        for family, cases in countdown_cases(rng).items():
            for case in cases:
                response, nums, target, expected = case
                _record(results, (f"countdown/{family}", "binary"), case, expected,
                        countdown.grade(response, nums, target))
    timeouts = {name: grader.stats.as_dict()["timeouts"] for name, grader in graders.items()}
    for grader in graders.values():
        grader.close()
    return {
        "results": [{"family": f, "grader": g, **v} for (f, g), v in results.items()],
        "timeouts": timeouts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-family", type=int, default=100, help="generated instances per family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=30.0,
                        help="symbolic time limit; generous, so that load does not decide a verdict")
    parser.add_argument("--no-symbolic", action="store_true", help="rules only")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    symbolic = not args.no_symbolic and math_verify_available()
    out = run(args.per_family, args.seed, symbolic, args.time_limit)
    out["meta"] = {
        "python": sys.version.split()[0],
        "machine": platform.platform(),
        "per_family": args.per_family,
        "seed": args.seed,
        "symbolic": symbolic,
        "grader_module": sys.modules[MathGrader.__module__].__file__,
    }
    print(f"{'family':28} {'grader':9} {'agree':>12} {'accepted wrongly':>17} {'rejected wrongly':>17}")
    for row in out["results"]:
        print(f"{row['family']:28} {row['grader']:9} {row['agree']:>5} / {row['n']:<5} "
              f"{row['accepted_wrongly']:>17} {row['rejected_wrongly']:>17}")
        for d in row["disagreements"][:2]:
            print(f"{'':40}e.g. {d['case']} expected {d['expected']} got {d['got']}")
    print("symbolic time-outs:", out["timeouts"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
