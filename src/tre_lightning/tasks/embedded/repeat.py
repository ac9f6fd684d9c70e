"""The tail-risk task family: repeat a pattern for ``horizon`` tokens (paper section 4 in miniature).

A prompt is a pattern of ``period`` digits; the answer is the pattern
repeated to exactly ``horizon`` digits, e.g. ``4827``, horizon 10 ->
``4827482748``. The reward is binary and checked by rule: the response must
be exactly those digits, so one invalid token anywhere (a filler token, a
letter, an early end of sequence) ruins the answer, as one incoherent step
ruins a chain of reasoning. A policy that leaks a mass ε per step into
invalid tokens solves it with probability at most (1 − ε)^horizon: the
cumulative tail risk of the paper.

The valid tokens are the 10 digits inside the quickstart's character
vocabulary padded with thousands of never-used filler tokens (:mod:`.tokenizer`).

Forks: the first ``n_forks`` steps after the first digit are forks. The warm
start's solver (:func:`repeat_solution`) takes the wrong branch there (the
pattern's digit + 5) with probability ``fork_wrong_prob`` and then repeats
what it wrote, coherently: both branches are valid tokens, only one leads to
a correct answer, and which one is right is learnt only from the reward. The
solver also writes a uniformly random filler token in place of a digit with
probability ``filler_noise`` per step: the warm start's small, realistic tail.

The warm start is trained on answers of ``train_horizon`` digits (no end of
sequence; rollouts stop at ``max_new_tokens = horizon``), so every horizon of
one family shares one cached warm start: only the horizon differs between
the cells of the sweep.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from tre_lightning.checks import ArgumentError
from tre_lightning.tasks.base import Example, Messages
from tre_lightning.tasks.embedded.tokenizer import is_filler

__all__ = ["RepeatTask", "repeat_answer", "repeat_solution"]

_DIGITS = "0123456789"


def repeat_answer(pattern: str, horizon: int) -> str:
    """The correct answer: ``pattern`` repeated, cut to ``horizon`` digits."""
    return (pattern * (horizon // len(pattern) + 1))[:horizon]


def repeat_solution(pattern: str, horizon: int, n_forks: int, fork_wrong_prob: float, filler_noise: float,
                    n_fillers: int, rng: random.Random) -> list[str | int]:
    """What the warm start's solver writes: digits (str), or filler indices (int) in ``[0, n_fillers)``.

    At the forks (steps 1 … ``n_forks``) it writes the pattern's digit + 5
    (mod 10) with probability ``fork_wrong_prob``; later steps repeat what
    it meant to write ``len(pattern)`` steps before; each step is replaced by
    a filler with probability ``filler_noise``.
    """
    k = len(pattern)
    meant: list[str] = []
    out: list[str | int] = []
    for t in range(horizon):
        if t < k:
            digit = pattern[t]
            if 1 <= t <= n_forks and rng.random() < fork_wrong_prob:
                digit = str((int(digit) + 5) % 10)
        else:
            digit = meant[t - k]
        meant.append(digit)
        out.append(rng.randrange(n_fillers) if filler_noise > 0 and rng.random() < filler_noise else digit)
    return out


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
        raise ArgumentError(name, allowed, value)
    return value


def _check_prob(name: str, value: object, high_open: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok or (high_open and value >= 1.0):
        raise ArgumentError(name, "a number in [0, 1)" if high_open else "a number in [0, 1]", value)
    return float(value)  # type: ignore[arg-type]


class RepeatTask:
    """Repeat a digit pattern for ``horizon`` tokens; reward 1 for the exact answer, else 0.

    Args:
        horizon: answer length L in tokens, in [1, train_horizon].
        period: pattern length, in [2, 6].
        n_train: training patterns (PPO prompts and the warm start's), >= 1.
        n_val: validation patterns, disjoint from the training ones, >= 1.
        seed: generator seed of both splits.
        n_forks: fork steps of the warm start's solver, in [0, period - 1].
        fork_wrong_prob: the solver's probability of the wrong branch at a fork, in [0, 1].
        filler_noise: the solver's probability of a filler token per step, in [0, 1).
        train_horizon: answer length of the warm start's data (shared by all horizons), >= period.
    """

    score_isolation = "thread"  # a comparison of at most a few dozen characters per response

    name = "repeat"
    binary_reward = True

    def __init__(self, horizon: int = 16, period: int = 4, n_train: int = 2048, n_val: int = 64, seed: int = 0,
                 n_forks: int = 2, fork_wrong_prob: float = 0.5, filler_noise: float = 0.003,
                 train_horizon: int = 32) -> None:
        self.period = _check_int("period", period, 2, 6)
        self.train_horizon = _check_int("train_horizon", train_horizon, self.period)
        self.horizon = _check_int("horizon", horizon, 1, self.train_horizon)
        self.n_train = _check_int("n_train", n_train, 1)
        self.n_val = _check_int("n_val", n_val, 1)
        if self.n_train + self.n_val > 10 ** self.period:
            raise ArgumentError("n_train", f"at most 10**period - n_val = {10 ** self.period - self.n_val}", n_train)
        self.seed = _check_int("seed", seed, 0)
        self.n_forks = _check_int("n_forks", n_forks, 0, self.period - 1)
        self.fork_wrong_prob = _check_prob("fork_wrong_prob", fork_wrong_prob)
        self.filler_noise = _check_prob("filler_noise", filler_noise, high_open=True)
        rng = random.Random(f"tre-lightning/repeat/splits/{self.seed}/{self.period}")
        codes = rng.sample(range(10 ** self.period), self.n_train + self.n_val)
        patterns = [str(c).zfill(self.period) for c in codes]
        self._val = [self._example(p) for p in patterns[: self.n_val]]
        self._train = [self._example(p) for p in patterns[self.n_val :]]

    def _example(self, pattern: str) -> dict[str, Any]:
        return {"pattern": pattern, "prompt": pattern, "answer": repeat_answer(pattern, self.horizon)}

    def config(self) -> dict[str, Any]:
        """The constructor arguments (plain values)."""
        return {"horizon": self.horizon, "period": self.period, "n_train": self.n_train, "n_val": self.n_val,
                "seed": self.seed, "n_forks": self.n_forks, "fork_wrong_prob": self.fork_wrong_prob,
                "filler_noise": self.filler_noise, "train_horizon": self.train_horizon}

    def train_examples(self) -> Sequence[Example]:
        return self._train

    def val_examples(self) -> Sequence[Example]:
        return self._val

    def messages(self, example: Example) -> Messages:
        return [{"role": "user", "content": str(example["prompt"])}]

    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> list[float]:
        if len(examples) != len(responses):
            raise ValueError(f"score: {len(examples)} examples but {len(responses)} responses")
        out: list[float] = []
        for example, response in zip(examples, responses, strict=True):
            try:
                ok = isinstance(response, str) and response.strip() == repeat_answer(str(example["pattern"]),
                                                                                     self.horizon)
            except Exception:  # noqa: BLE001 - a malformed row scores 0, never raises
                ok = False
            out.append(1.0 if ok else 0.0)
        return out

    def invalid_token_ids(self, tokenizer: Any) -> list[int]:
        """Every token that cannot occur in a correct answer: all but the 10 digits (sorted ids)."""
        digits = {tokenizer.convert_tokens_to_ids(c) for c in _DIGITS}
        return sorted(set(range(len(tokenizer))) - digits)

    # ------------------------------------------------------------------ the warm start's data

    def warm_start_key(self) -> dict[str, Any]:
        """What the warm start's data depends on (not ``horizon``: all horizons share it)."""
        return {"family": "repeat", **{k: v for k, v in self.config().items() if k != "horizon"}}

    def warm_start_rows(self, cfg: Any, tokenizer: Any) -> Iterator[tuple[str, list[int]]]:
        """(prompt content, target ids) for ``cfg.steps * cfg.batch_size`` rows on the training patterns.

        Raises:
            ArgumentError: ``merge_prob`` or ``token_noise`` of the warm start is not 0
                (they belong to the sorting family; this family's noise is the task's).
        """
        for name in ("merge_prob", "token_noise"):
            if getattr(cfg, name) != 0.0:
                raise ArgumentError(name, "0.0 for the repeat task (its solver noise is fork_wrong_prob and "
                                          "filler_noise of the task)", getattr(cfg, name))
        fillers = sorted(i for t, i in tokenizer.get_vocab().items() if is_filler(t))
        digit_ids = {c: tokenizer.convert_tokens_to_ids(c) for c in _DIGITS}
        rng = random.Random(f"tre-lightning/repeat/warmstart/{cfg.seed}")
        for _ in range(cfg.steps * cfg.batch_size):
            pattern = str(self._train[rng.randrange(len(self._train))]["pattern"])
            written = repeat_solution(pattern, self.train_horizon, self.n_forks, self.fork_wrong_prob,
                                      self.filler_noise, len(fillers), rng)
            yield pattern, [digit_ids[w] if isinstance(w, str) else fillers[w] for w in written]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"RepeatTask({args})"
