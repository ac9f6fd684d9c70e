"""Digit-sorting puzzles: the embedded quickstart's task family.

A puzzle is a string of digits and a direction; the answer is the same digits
sorted (``sort 58213`` -> ``12358``, ``desc 58213`` -> ``85321``). Answers
are checked by rule, not by comparison with a stored string: a response is
correct when it is a permutation of the puzzle's digits (same multiset) in
the requested order. Puzzles are generated from a seed, reproducibly, and the
train and validation splits are disjoint.

The warm start learns from a *noisy solver* (:func:`noisy_solution`) that
makes the kind of systematic mistake a weak model makes: with probability
``merge_prob`` it writes a run of repeated digits once (``11446`` -> ``146``),
and each digit is replaced by a random digit with probability ``token_noise``.
The policy trained on it solves a puzzle with probability roughly
``(1 - merge_prob) ** runs * (1 - token_noise) ** length``: a modest success
rate that falls with the length of the answer, the survival rate of section 4
of the paper in miniature. PPO has to learn, from the binary reward alone, to
keep repeated digits and to stop emitting noise.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DIGITS",
    "Puzzle",
    "check",
    "count_runs",
    "generate",
    "noisy_solution",
    "split",
]

DIGITS = "0123456789"
ASC_WORD = "sort"
DESC_WORD = "desc"


@dataclass(frozen=True)
class Puzzle:
    """One puzzle: sort ``digits`` ascending (or descending).

    Attributes:
        digits: the digits to sort, e.g. ``"58213"`` (non-empty, ``0-9`` only).
        descending: sort in non-increasing order instead.
    """

    digits: str
    descending: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.digits, str) or not self.digits or any(c not in DIGITS for c in self.digits):
            raise ValueError(f"Puzzle.digits must be a non-empty string of 0-9, got {self.digits!r}")
        if not isinstance(self.descending, bool):
            raise ValueError(f"Puzzle.descending must be a bool, got {self.descending!r}")

    @property
    def prompt(self) -> str:
        """The user message, e.g. ``"sort 58213"``."""
        return f"{DESC_WORD if self.descending else ASC_WORD} {self.digits}"

    @property
    def answer(self) -> str:
        """The reference answer (the digits sorted in the requested order)."""
        return "".join(sorted(self.digits, reverse=self.descending))

    def to_example(self) -> dict[str, Any]:
        """A dataset row (plain values): digits, descending, prompt, answer."""
        return {"digits": self.digits, "descending": self.descending, "prompt": self.prompt, "answer": self.answer}

    @classmethod
    def from_example(cls, example: Mapping[str, Any]) -> Puzzle:
        """The puzzle of a row made by :meth:`to_example`."""
        return cls(digits=str(example["digits"]), descending=bool(example.get("descending", False)))


def check(puzzle: Puzzle, response: str) -> bool:
    """True when ``response`` solves ``puzzle``: exactly the puzzle's digits
    (as a multiset), in non-decreasing order (non-increasing for descending).

    Surrounding whitespace is ignored; anything else (separators, letters,
    special tokens) makes the answer wrong. Never raises on a string.
    """
    if not isinstance(response, str):
        return False
    text = response.strip()
    if not text or any(c not in DIGITS for c in text):
        return False
    if Counter(text) != Counter(puzzle.digits):
        return False
    pairs = zip(text, text[1:])
    if puzzle.descending:
        return all(a >= b for a, b in pairs)
    return all(a <= b for a, b in pairs)


def count_runs(puzzle: Puzzle) -> int:
    """Number of runs of repeated digits in the answer (``11446`` has 2)."""
    return sum(1 for n in Counter(puzzle.digits).values() if n > 1)


def _rng(seed: int, stream: str) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`: reproducible across processes
    return random.Random(f"tre-lightning/quickstart/{stream}/{int(seed)}")


def _check_family(min_len: int, max_len: int, descending_fraction: float) -> None:
    for name, value in (("min_len", min_len), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if max_len < min_len:
        raise ValueError(f"max_len ({max_len}) must be >= min_len ({min_len})")
    if not 0.0 <= float(descending_fraction) <= 1.0:
        raise ValueError(f"descending_fraction must be in [0, 1], got {descending_fraction!r}")


def generate(
    n: int,
    seed: int,
    min_len: int = 5,
    max_len: int = 8,
    descending_fraction: float = 0.0,
    exclude: Iterable[Puzzle] = (),
    stream: str = "puzzles",
) -> list[Puzzle]:
    """``n`` distinct puzzles, reproducible from ``seed`` (and ``stream``).

    Args:
        n: number of puzzles, >= 0.
        seed: generator seed (same seed and arguments -> same list).
        min_len, max_len: the number of digits is uniform in [min_len, max_len].
        descending_fraction: probability that a puzzle asks for descending order.
        exclude: puzzles that must not be generated (e.g. the validation split).
        stream: a name that separates independent streams of the same seed.

    Raises:
        ValueError: on invalid arguments, or when the family has fewer than
            ``n`` puzzles outside ``exclude``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    _check_family(min_len, max_len, descending_fraction)
    directions = (descending_fraction > 0) + (descending_fraction < 1)
    family = directions * sum(10**k for k in range(min_len, max_len + 1))
    banned = set(exclude)
    if n > family - len(banned):
        raise ValueError(f"cannot draw {n} distinct puzzles: the family has {family} (minus {len(banned)} excluded)")
    rng = _rng(seed, stream)
    seen: set[Puzzle] = set()
    out: list[Puzzle] = []
    while len(out) < n:
        length = rng.randint(min_len, max_len)
        digits = "".join(rng.choice(DIGITS) for _ in range(length))
        descending = rng.random() < descending_fraction
        p = Puzzle(digits, descending)
        if p in seen or p in banned:
            continue
        seen.add(p)
        out.append(p)
    return out


def split(
    n_train: int,
    n_val: int,
    seed: int,
    min_len: int = 5,
    max_len: int = 8,
    descending_fraction: float = 0.0,
) -> tuple[list[Puzzle], list[Puzzle]]:
    """Disjoint (train, validation) puzzle lists from one seed (validation is drawn first)."""
    val = generate(n_val, seed, min_len, max_len, descending_fraction, stream="val")
    train = generate(n_train, seed, min_len, max_len, descending_fraction, exclude=val, stream="train")
    return train, val


def noisy_solution(puzzle: Puzzle, rng: random.Random, merge_prob: float = 0.5, token_noise: float = 0.05) -> str:
    """What the warm start's imperfect solver writes for ``puzzle``.

    Each run of a repeated digit is written once with probability
    ``merge_prob`` (a systematic mistake), then each written digit is replaced
    by a uniformly random digit with probability ``token_noise`` (slips).
    ``merge_prob = token_noise = 0`` gives the correct answer.
    """
    if not 0.0 <= merge_prob <= 1.0:
        raise ValueError(f"merge_prob must be in [0, 1], got {merge_prob!r}")
    if not 0.0 <= token_noise <= 1.0:
        raise ValueError(f"token_noise must be in [0, 1], got {token_noise!r}")
    answer = puzzle.answer
    written: list[str] = []
    i = 0
    while i < len(answer):
        j = i
        while j < len(answer) and answer[j] == answer[i]:
            j += 1
        run = answer[i:j]
        written.extend(run[0] if len(run) > 1 and rng.random() < merge_prob else run)
        i = j
    return "".join(rng.choice(DIGITS) if rng.random() < token_noise else c for c in written)
