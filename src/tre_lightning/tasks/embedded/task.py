"""The embedded task: digit-sorting puzzles with a rule-checked binary reward.

Implements the :class:`~tre_lightning.tasks.base.Task` protocol; generated
from a seed, so it needs no file and no network. See
:mod:`tre_lightning.tasks.embedded.puzzles` for the family, the checker and the
noisy solver used by the warm start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tre_lightning.tasks.embedded.puzzles import DIGITS, Puzzle, check, split
from tre_lightning.tasks.base import Example, Messages

__all__ = ["EmbeddedTask"]


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"EmbeddedTask.{name} must be an int >= {low}, got {value!r}")
    return value


def _digits_only(response: str) -> bool:
    text = response.strip()
    return bool(text) and all(c in DIGITS for c in text)


class EmbeddedTask:
    """Sort the digits (``sort 58213`` -> ``12358``; ``desc 58213`` -> ``85321``).

    Reward 1.0 when the response is exactly the puzzle's digits in the
    requested order (checked by rule), else ``format_score`` when the response
    is digits only, else 0.0 (the paper: binary, ``format_score = 0``).

    Args:
        n_train: training puzzles (PPO prompts), >= 1.
        n_val: validation puzzles, disjoint from the training ones, >= 1.
        seed: generator seed of both splits.
        min_len: fewest digits in a puzzle, >= 1.
        max_len: most digits in a puzzle, >= min_len.
        descending_fraction: share of puzzles asking for descending order, in [0, 1].
        format_score: reward of a wrong answer made of digits only, in [0, 1).
    """

    score_isolation = "thread"  # a bounded rule check of at most a few dozen characters per response

    name = "embedded"
    binary_reward = True

    def __init__(
        self,
        n_train: int = 4096,
        n_val: int = 256,
        seed: int = 0,
        min_len: int = 5,
        max_len: int = 8,
        descending_fraction: float = 0.5,
        format_score: float = 0.0,
    ) -> None:
        self.n_train = _int("n_train", n_train, 1)
        self.n_val = _int("n_val", n_val, 1)
        self.seed = _int("seed", seed, 0)
        self.min_len = _int("min_len", min_len, 1)
        self.max_len = _int("max_len", max_len, 1)
        if self.max_len < self.min_len:
            raise ValueError(f"EmbeddedTask.max_len must be >= min_len ({min_len}), got {max_len!r}")
        if isinstance(descending_fraction, bool) or not isinstance(descending_fraction, int | float) \
                or not 0.0 <= descending_fraction <= 1.0:
            raise ValueError(f"EmbeddedTask.descending_fraction must be in [0, 1], got {descending_fraction!r}")
        self.descending_fraction = float(descending_fraction)
        if isinstance(format_score, bool) or not isinstance(format_score, int | float) \
                or not 0.0 <= format_score < 1.0:
            raise ValueError(f"EmbeddedTask.format_score must be in [0, 1), got {format_score!r}")
        self.format_score = float(format_score)
        self._train: list[dict[str, Any]] | None = None
        self._val: list[dict[str, Any]] | None = None

    def config(self) -> dict[str, Any]:
        """The constructor arguments (plain values), e.g. for cache keys."""
        return {
            "n_train": self.n_train,
            "n_val": self.n_val,
            "seed": self.seed,
            "min_len": self.min_len,
            "max_len": self.max_len,
            "descending_fraction": self.descending_fraction,
            "format_score": self.format_score,
        }

    def _load(self) -> None:
        if self._train is None:
            train, val = split(self.n_train, self.n_val, self.seed, self.min_len, self.max_len,
                               self.descending_fraction)
            self._train = [p.to_example() for p in train]
            self._val = [p.to_example() for p in val]

    def train_examples(self) -> Sequence[Example]:
        self._load()
        assert self._train is not None
        return self._train

    def val_examples(self) -> Sequence[Example]:
        self._load()
        assert self._val is not None
        return self._val

    def val_puzzles(self) -> list[Puzzle]:
        """The validation split as puzzles (the warm start excludes them)."""
        return [Puzzle.from_example(e) for e in self.val_examples()]

    def messages(self, example: Example) -> Messages:
        return [{"role": "user", "content": Puzzle.from_example(example).prompt}]

    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> list[float]:
        if len(examples) != len(responses):
            raise ValueError(f"score: {len(examples)} examples but {len(responses)} responses")
        out: list[float] = []
        for example, response in zip(examples, responses, strict=True):
            try:
                ok = check(Puzzle.from_example(example), response)
            except Exception:  # noqa: BLE001 - a malformed row or response scores 0, never raises
                ok = False
            if ok:
                out.append(1.0)
            elif self.format_score and isinstance(response, str) and _digits_only(response):
                out.append(self.format_score)
            else:
                out.append(0.0)
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"EmbeddedTask({args})"
