"""The Countdown task (TinyZero; Pan et al., 2025): reach a target with given numbers.

Prompt (paper, appendix A.1), rendered by the policy tokenizer's chat template::

    Using the numbers [44, 19, 35], create an equation that equals 98. You can use
    basic arithmetic operations (+, -, *, /) and each number can only be used once.
    Show your work in <think></think> tags. And return the final answer in
    <answer></answer> tags, for example <answer>(1 + 2) / 3</answer>.

Reward: see :mod:`tre_lightning.tasks.countdown_grader` (1 / ``format_score`` / 0).

Data: rows with ``target`` (integer) and ``nums`` (list of integers), the
layout of the public Countdown-Tasks-3to4 set, from local files; or, when no
path is given, instances from :func:`generate_countdown`: seeded, solvable by
construction, 3-4 numbers in [1, 100] and targets in [1, 100] like the
public set, so that the task works with no download.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from tre_lightning.tasks._splits import SplitSettings
from tre_lightning.tasks.base import Example, Messages
from tre_lightning.tasks.countdown_grader import CountdownGrader
from tre_lightning.tasks.data_io import disjoint_split, int_list, integer, load_rows, subsample

PROMPT_TEMPLATE = (
    "Using the numbers {numbers}, create an equation that equals {target}. "
    "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. "
    "Show your work in <think></think> tags. And return the final answer in <answer></answer> tags, "
    "for example <answer>(1 + 2) / 3</answer>."
)


def _combine(a: int, b: int, op: str) -> int | None:
    """Classic Countdown rules: every intermediate result is a non-negative integer."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a >= b else None
    if op == "*":
        return a * b
    if b != 0 and a % b == 0:
        return a // b
    return None


def generate_countdown(
    n: int,
    seed: int = 0,
    min_numbers: int = 3,
    max_numbers: int = 4,
    min_number: int = 1,
    max_number: int = 100,
    min_target: int = 1,
    max_target: int = 100,
) -> list[dict[str, Any]]:
    """``n`` distinct, solvable Countdown instances, reproducible from ``seed``.

    Each instance draws 3-4 numbers uniformly, then combines all of them in a
    random order with random operators (intermediate results non-negative
    integers, exact divisions) until one value is left; it is kept when that
    value lies in [min_target, max_target] and the (sorted numbers, target)
    pair is new. The witness expression is kept under ``solution``.

    Returns:
        ``[{"target": int, "nums": list[int], "solution": str}, ...]``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[tuple[tuple[int, ...], int]] = set()
    out: list[dict[str, Any]] = []
    attempts, max_attempts = 0, 1000 * max(n, 1)
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(
                f"could not generate {n} distinct instances in {max_attempts} attempts; widen the ranges"
            )
        count = rng.randint(min_numbers, max_numbers)
        nums = [rng.randint(min_number, max_number) for _ in range(count)]
        pool: list[tuple[int, str]] = [(v, str(v)) for v in nums]
        ok = True
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            (a, ea), (b, eb) = pool[i], pool[j]
            ops = ["+", "-", "*", "/"]
            rng.shuffle(ops)
            for op in ops:
                value = _combine(a, b, op)
                if value is not None:
                    break
            else:  # pragma: no cover - "+" always works
                ok = False
                break
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, f"({ea} {op} {eb})")]
        if not ok:
            continue
        target, expression = pool[0]
        if not min_target <= target <= max_target:
            continue
        key = (tuple(sorted(nums)), target)
        if key in seen:
            continue
        seen.add(key)
        solution = expression[1:-1] if expression.startswith("(") else expression
        out.append({"target": target, "nums": nums, "solution": solution})
    return out


class CountdownTask(SplitSettings):
    """Countdown behind the :class:`~tre_lightning.tasks.base.Task` protocol.

    Args:
        train_path: file or folder of ``target``/``nums`` rows. ``None`` (and
            no ``val_path``): both splits are generated from ``seed``.
        val_path: evaluation file or folder. ``None`` with a ``train_path``:
            disjoint seeded train / val subsets of the training data (the
            paper's 7,500 / 5,000 drawn from one public file).
        train_size: training rows (>= 1; ``None`` = all, not allowed when generating).
        val_size: evaluation rows (>= 1; ``None`` = all, not allowed when generating).
        seed: seed of the generator and of the subsampling.
        format_score: reward of a well-formed but wrong answer, in [0, 1);
            0.0 reproduces the paper's binary reward, 0.1 the TinyZero scorer.
        min_numbers, max_numbers: numbers per generated instance, 2 <= min <= max <= 6.
        max_number: generated numbers lie in [1, max_number], 1 <= max_number <= 10,000.
        max_target: generated targets lie in [1, max_target], >= 1.
        max_response_tokens: generation budget of the paper (512); read by the trainer.
    """

    name = "countdown"
    binary_reward = True

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        train_size: int | None = 7500,
        val_size: int | None = 5000,
        seed: int = 0,
        format_score: float = 0.0,
        min_numbers: int = 3,
        max_numbers: int = 4,
        max_number: int = 100,
        max_target: int = 100,
        max_response_tokens: int = 512,
    ) -> None:
        self._init_splits(train_path, val_path, train_size, val_size, seed)
        if not 2 <= min_numbers <= max_numbers <= 6:
            raise ValueError(
                f"min_numbers / max_numbers must satisfy 2 <= min_numbers <= max_numbers <= 6, "
                f"got {min_numbers} / {max_numbers}"
            )
        if not 1 <= max_number <= 10_000:
            raise ValueError(f"max_number must be in [1, 10000], got {max_number}")
        if max_target < 1:
            raise ValueError(f"max_target must be >= 1, got {max_target}")
        if max_response_tokens < 1:
            raise ValueError(f"max_response_tokens must be >= 1, got {max_response_tokens}")
        if train_path is None and val_path is not None:
            raise ValueError("val_path is set but train_path is not: give both, train_path only, or neither")
        if train_path is None and (train_size is None or val_size is None):
            raise ValueError("train_size and val_size must be integers when the data is generated (no train_path)")
        self.min_numbers, self.max_numbers = int(min_numbers), int(max_numbers)
        self.max_number, self.max_target = int(max_number), int(max_target)
        self.max_response_tokens = int(max_response_tokens)
        self.grader = CountdownGrader(format_score=format_score)
        self._splits: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None

    # -- data ---------------------------------------------------------------------------
    @staticmethod
    def _read(path: str, parameter: str) -> list[dict[str, Any]]:
        return load_rows(path, columns={"target": integer, "nums": int_list}, parameter=parameter)

    def _build(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if self._splits is None:
            if self.train_path is None:
                assert self.train_size is not None and self.val_size is not None
                rows = generate_countdown(
                    self.train_size + self.val_size,
                    seed=self.seed,
                    min_numbers=self.min_numbers,
                    max_numbers=self.max_numbers,
                    max_number=self.max_number,
                    max_target=self.max_target,
                )
                self._splits = (rows[: self.train_size], rows[self.train_size :])
            elif self.val_path is None:
                rows = self._read(self.train_path, "train_path")
                self._splits = disjoint_split(
                    rows, self.train_size, self.val_size, self.seed, f"CountdownTask train_path {self.train_path}"
                )
            else:
                train = self._read(self.train_path, "train_path")
                val = self._read(self.val_path, "val_path")
                self._splits = (
                    subsample(train, self.train_size, self.seed, f"CountdownTask train_path {self.train_path}"),
                    subsample(val, self.val_size, self.seed, f"CountdownTask val_path {self.val_path}"),
                )
        return self._splits

    def train_examples(self) -> Sequence[Example]:
        return self._build()[0]

    def val_examples(self) -> Sequence[Example]:
        return self._build()[1]

    # -- prompts and rewards ----------------------------------------------------------------
    def messages(self, example: Example) -> Messages:
        numbers = "[" + ", ".join(str(int(x)) for x in example["nums"]) + "]"
        content = PROMPT_TEMPLATE.format(numbers=numbers, target=example["target"])
        return [{"role": "user", "content": content}]

    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> list[float]:
        if len(examples) != len(responses):
            raise ValueError(f"score: {len(examples)} examples but {len(responses)} responses")
        return [self.grader.grade(r, ex["nums"], ex["target"]) for ex, r in zip(examples, responses)]

    # -- reliability ----------------------------------------------------------------------
    def failure_counts(self) -> dict[str, int]:
        """Grader counters of this process: checks, timeouts, errors, failures."""
        return self.grader.stats.as_dict()

    def reset_failure_counts(self) -> None:
        self.grader.stats.reset()
