r"""The MATH task (Hendrycks et al., 2021): competition problems, boxed answers.

Prompt (paper, appendix A.1), rendered by the policy tokenizer's chat template::

    {problem} Let's think step by step and output the final answer within \boxed{}.

Reward: 1.0 when the last ``\boxed{}`` of the response is equivalent to the
reference answer (the last ``\boxed{}`` of the reference solution, or an
``answer`` column when the data has one), else 0.0. See
:mod:`tre_lightning.tasks.math_grader` for the normalisation, the optional
symbolic check and its hard time limit.

Data: the MATH layout, one object per problem with ``problem`` and
``solution`` (``level`` and ``type`` kept when present), read from local
``.jsonl`` / ``.json`` / ``.parquet`` files or folders (the original release:
``train/<subject>/<id>.json``). The paper uses the full 7,500 / 5,000 splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tre_lightning import checks
from tre_lightning.tasks.base import Example, Messages
from tre_lightning.tasks._splits import PathSplits
from tre_lightning.tasks.data_io import DataError, any_str, load_rows, nonempty_str
from tre_lightning.tasks.math_grader import MathGrader, final_answer, last_boxed_answer

PROMPT_TEMPLATE = "{problem} Let's think step by step and output the final answer within \\boxed{{}}."


def _boxed_reference(solution: str) -> str | None:
    """The reference answer of a solution: its final answer as responses are read (boxes joined:
    ``\\boxed{2}, \\boxed{3}`` is ``2, 3``), else its last box (references are trusted)."""
    return final_answer(solution) or last_boxed_answer(solution)


def _with_answer(row: dict[str, Any]) -> dict[str, Any]:
    if isinstance(row.get("answer"), str) and row["answer"].strip():
        return row
    solution = row.get("solution")
    if not isinstance(solution, str):
        raise DataError("missing column: need 'solution' (with a \\boxed{} answer) or 'answer'", column="solution")
    answer = _boxed_reference(solution)
    if not answer or not answer.strip():
        raise DataError("the solution has no \\boxed{} answer", column="solution")
    row["answer"] = answer
    return row


class MathTask(PathSplits):
    """MATH behind the :class:`~tre_lightning.tasks.base.Task` protocol.

    Args:
        train_path: file or folder of the training split (``None``: none given;
            ``train_examples()`` then raises).
        val_path: file or folder of the evaluation split.
        train_size: rows drawn (seeded, without replacement) from the training
            data; ``None`` = all. Default: the paper's 7,500.
        val_size: same for evaluation; default 5,000.
        seed: seed of the subsampling.
        use_math_verify: add math-verify's symbolic equivalence when the
            ``math`` extra is installed (otherwise normalisation only).
        time_limit: wall-clock seconds per symbolic check, in (0, 600].
        num_workers: helper processes for symbolic checks, in [1, 64].
        memory_limit_mb: address-space cap of a helper (0 = none, else >= 64).
        max_response_tokens: generation budget the paper used (8,192); read by
            the trainer, not by the task.

    ``failure_counts()`` returns the grader's counters (``checks``,
    ``timeouts``, ``errors``, ``failures``) for this process.
    """

    score_isolation = "process"  # the graders bound each check themselves; a worker bounds the rest

    name = "math"
    binary_reward = True
    _owner = "MathTask"
    _path_hint = "a MATH-layout file or folder"

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        train_size: int | None = 7500,
        val_size: int | None = 5000,
        seed: int = 0,
        use_math_verify: bool = True,
        time_limit: float = 5.0,
        num_workers: int = 1,
        memory_limit_mb: int = 2048,
        max_response_tokens: int = 8192,
    ) -> None:
        checks.optional(checks.integer, "train_size", train_size, 1)
        checks.optional(checks.integer, "val_size", val_size, 1)
        checks.integer("seed", seed)
        self.max_response_tokens = checks.integer("max_response_tokens", max_response_tokens, 1)
        self._init_splits(train_path, val_path, train_size, val_size, seed)
        self.grader = MathGrader(
            use_math_verify=use_math_verify,
            time_limit=time_limit,
            num_workers=num_workers,
            memory_limit_mb=memory_limit_mb,
        )

    # -- data -----------------------------------------------------------------------
    def _read_split(self, split: str, path: str) -> list[dict[str, Any]]:
        return load_rows(
            path,
            columns={"problem": nonempty_str},
            optional={"solution": any_str, "answer": any_str, "level": str, "type": str},
            parameter=f"{split}_path",
            check=_with_answer,
        )

    # -- prompts and rewards --------------------------------------------------------------
    def messages(self, example: Example) -> Messages:
        return [{"role": "user", "content": PROMPT_TEMPLATE.format(problem=example["problem"])}]

    @staticmethod
    def reference_answer(example: Example) -> str:
        """The reference answer of an example (``answer``, else the solution's last box)."""
        answer = example.get("answer")
        if isinstance(answer, str) and answer.strip():
            return answer
        boxed = _boxed_reference(str(example.get("solution", "")))
        if not boxed:
            raise ValueError("MATH example has neither an 'answer' nor a boxed answer in its 'solution'")
        return boxed

    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> list[float]:
        if len(examples) != len(responses):
            raise ValueError(f"score: {len(examples)} examples but {len(responses)} responses")
        references = [self.reference_answer(ex) for ex in examples]
        return self.grader.grade_batch(list(responses), references)

    # -- reliability -----------------------------------------------------------------
    def failure_counts(self) -> dict[str, int]:
        """Grader counters of this process: checks, timeouts, errors, failures."""
        return self.grader.stats.as_dict()

    def reset_failure_counts(self) -> None:
        self.grader.stats.reset()

    def close(self) -> None:
        """Stop the symbolic-check helper processes (restarted on demand)."""
        self.grader.close()
