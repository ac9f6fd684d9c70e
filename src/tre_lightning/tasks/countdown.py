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

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

from tre_lightning import checks
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


EXACT_CAPACITY_MAX_SETS = 1_000
"""Number sets up to which :func:`countdown_capacity` enumerates every instance exactly."""
MAX_DRAWS_PER_INSTANCE = 1_000
"""The generator's budget: ``1000 * n`` draws (about 0.1 ms each on one core)."""
STALL_DRAWS = 20_000
"""The generator also stops after this many draws in a row without a new instance."""
_CHECK_EVERY = 10_000


def _reachable(numbers: tuple[int, ...], memo: dict[tuple[int, ...], frozenset[int]]) -> frozenset[int]:
    """Every value the generator can build from all of ``numbers`` (sorted), memoised."""
    if numbers in memo:
        return memo[numbers]
    if len(numbers) == 1:
        memo[numbers] = frozenset(numbers)
        return memo[numbers]
    values: set[int] = set()
    n = len(numbers)
    for mask in range(1, 1 << (n - 1)):  # unordered splits: the last number is always on the right
        left = tuple(numbers[i] for i in range(n) if mask >> i & 1)
        right = tuple(numbers[i] for i in range(n) if not mask >> i & 1)
        for a in _reachable(left, memo):
            for b in _reachable(right, memo):
                for x, y in ((a, b), (b, a)):
                    for op in "+-*/":
                        v = _combine(x, y, op)
                        if v is not None:
                            values.add(v)
    memo[numbers] = frozenset(values)
    return memo[numbers]


def countdown_capacity(
    min_numbers: int, max_numbers: int, min_number: int, max_number: int, min_target: int, max_target: int
) -> tuple[int, bool]:
    """(distinct instances the generator can produce, whether the count is exact).

    Exact (every number set enumerated, every reachable target counted) when
    there are at most ``EXACT_CAPACITY_MAX_SETS`` number sets of at most 4
    numbers; otherwise an upper bound: number sets x targets, the largest
    target of a set of ``k`` numbers being ``max(max_number, 2) ** k``.
    """
    span = max_number - min_number + 1
    sets = {k: math.comb(span + k - 1, k) for k in range(min_numbers, max_numbers + 1)}
    if max_numbers <= 4 and sum(sets.values()) <= EXACT_CAPACITY_MAX_SETS:
        memo: dict[tuple[int, ...], frozenset[int]] = {}
        total = 0
        for k in sets:
            for numbers in itertools.combinations_with_replacement(range(min_number, max_number + 1), k):
                total += sum(1 for v in _reachable(numbers, memo) if min_target <= v <= max_target)
        return total, True
    bound = 0
    for k, count in sets.items():
        top = min(max_target, max(max_number, 2) ** k)
        bound += count * max(0, top - min_target + 1)
    return bound, False


def capacity_text(
    min_numbers: int, max_numbers: int, min_number: int, max_number: int, min_target: int, max_target: int
) -> tuple[int, str]:
    """(capacity, a sentence stating it with the settings that set it), for refusals."""
    capacity, exact = countdown_capacity(min_numbers, max_numbers, min_number, max_number, min_target, max_target)
    count = f"{min_numbers}" if min_numbers == max_numbers else f"{min_numbers}-{max_numbers}"
    text = (f"{count} numbers in [{min_number}, {max_number}] with targets in [{min_target}, {max_target}] "
            f"make {'exactly' if exact else 'at most'} {capacity} distinct instances; raise max_number or max_target")
    return capacity, text


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

    Bounded: ``n`` above :func:`countdown_capacity` is refused before any
    draw; the search stops with a ``ValueError`` (the rate it observed, the
    settings) as soon as its observed rate shows that it would need more than
    ``1000 * n`` draws (checked every 10,000 draws), or when ``STALL_DRAWS``
    draws in a row find nothing new.

    Returns:
        ``[{"target": int, "nums": list[int], "solution": str}, ...]``.
    """
    checks.integer("n", n, 0)
    checks.integer("seed", seed)
    checks.integer("min_numbers", min_numbers, 1)
    checks.integer("max_numbers", max_numbers, min_numbers)
    checks.integer("min_number", min_number, 0)
    checks.integer("max_number", max_number, min_number)
    checks.integer("min_target", min_target, 0)
    checks.integer("max_target", max_target, min_target)
    capacity, why = capacity_text(min_numbers, max_numbers, min_number, max_number, min_target, max_target)
    if n > capacity:
        raise checks.ArgumentError("n", f"at most {capacity} ({why})", n)
    rng = random.Random(seed)
    seen: set[tuple[tuple[int, ...], int]] = set()
    out: list[dict[str, Any]] = []
    attempts, last_new = 0, 0
    max_attempts = MAX_DRAWS_PER_INSTANCE * max(n, 1)
    while len(out) < n:
        attempts += 1
        if attempts % _CHECK_EVERY == 0 or attempts - last_new > STALL_DRAWS:
            _check_progress(n, len(out), attempts, last_new, max_attempts, min_numbers, max_numbers,
                            min_number, max_number, min_target, max_target)
        count = rng.randint(min_numbers, max_numbers)
        nums = [rng.randint(min_number, max_number) for _ in range(count)]
        pool: list[tuple[int, str]] = [(v, str(v)) for v in nums]
        while len(pool) > 1:  # one fewer entry per step
            i, j = rng.sample(range(len(pool)), 2)
            (a, ea), (b, eb) = pool[i], pool[j]
            ops = ["+", "-", "*", "/"]
            rng.shuffle(ops)
            value = a + b  # "+" always works; the shuffled order picks the first valid operator
            for op in ops:
                v = _combine(a, b, op)
                if v is not None:
                    value = v
                    break
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, f"({ea} {op} {eb})")]
        target, expression = pool[0]
        if not min_target <= target <= max_target:
            continue
        key = (tuple(sorted(nums)), target)
        if key in seen:
            continue
        seen.add(key)
        last_new = attempts
        solution = expression[1:-1] if expression.startswith("(") else expression
        out.append({"target": target, "nums": nums, "solution": solution})
    return out


def _check_progress(n: int, found: int, attempts: int, last_new: int, max_attempts: int, *settings: int) -> None:
    """Stop a search that cannot finish within its draw budget (see :func:`generate_countdown`)."""
    min_numbers, max_numbers, min_number, max_number, min_target, max_target = settings
    where = (f"{min_numbers}-{max_numbers} numbers in [{min_number}, {max_number}], "
             f"targets in [{min_target}, {max_target}]")
    if attempts - last_new > STALL_DRAWS:
        reason = f"no new instance in the last {STALL_DRAWS} draws (found {found} of {n})"
    elif found == 0 or attempts * n / found > max_attempts:
        rate = f"{found} new instances in {attempts} draws"
        reason = f"at the observed rate ({rate}) {n} instances need more than the {max_attempts} draws allowed"
    else:
        return
    raise ValueError(
        f"generate_countdown: cannot generate {n} distinct instances ({where}): {reason}; "
        "raise max_target, lower max_number, or ask for fewer (train_size + val_size)"
    )


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

    score_isolation = "process"  # refuses loudly if the task stops being picklable

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
        checks.optional(checks.integer, "train_size", train_size, 1)
        checks.optional(checks.integer, "val_size", val_size, 1)
        checks.integer("seed", seed)
        checks.integer("min_numbers", min_numbers, 2, 6)
        checks.integer("max_numbers", max_numbers, min_numbers, 6)
        checks.integer("max_number", max_number, 1, 10_000)
        checks.integer("max_target", max_target, 1)
        checks.integer("max_response_tokens", max_response_tokens, 1)
        if train_path is None and val_path is not None:
            raise ValueError("val_path is set but train_path is not: give both, train_path only, or neither")
        if train_path is None and (train_size is None or val_size is None):
            raise ValueError("train_size and val_size must be integers when the data is generated (no train_path)")
        if train_path is None:
            assert train_size is not None and val_size is not None
            self._check_capacity(train_size, val_size, min_numbers, max_numbers, max_number, max_target)
        self._init_splits(train_path, val_path, train_size, val_size, seed)
        self.min_numbers, self.max_numbers = int(min_numbers), int(max_numbers)
        self.max_number, self.max_target = int(max_number), int(max_target)
        self.max_response_tokens = int(max_response_tokens)
        self.grader = CountdownGrader(format_score=format_score)
        self._splits: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None

    @staticmethod
    def _check_capacity(train_size: int, val_size: int, min_numbers: int, max_numbers: int, max_number: int,
                        max_target: int) -> None:
        """Refuse split sizes that the generator's settings cannot fill with distinct instances."""
        capacity, why = capacity_text(min_numbers, max_numbers, 1, max_number, 1, max_target)
        if val_size > capacity - 1:
            raise checks.ArgumentError("val_size", f"at most {capacity - 1} ({why})", val_size)
        if train_size + val_size > capacity:
            allowed = f"at most {capacity - val_size} with val_size={val_size} ({why}, or lower val_size)"
            raise checks.ArgumentError("train_size", allowed, train_size)

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
