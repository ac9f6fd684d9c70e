"""The task seam: prompts in, scalar rewards out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

Example = Mapping[str, Any]
"""One dataset row (e.g. MATH: problem/solution; Countdown: nums/target)."""

Messages = list[dict[str, str]]
"""A chat: [{"role": "user", "content": ...}], rendered by the tokenizer's chat template."""


@runtime_checkable
class Task(Protocol):
    """A training / evaluation task.

    Attributes:
        name: short identifier used in metric names and folders.
        binary_reward: True when rewards are correctness in {0, 1} (validation
            reports Pass@1 / pass@k); False for scalar rewards (HH: mean reward).

    Optional (not part of the protocol check):
        ``invalid_token_ids(tokenizer) -> Sequence[int] | None``: the ids of the
            tokens that can never occur in a correct answer (e.g. the tail-risk
            task: every token but the digits). When a task declares them, the PPO
            loop logs the probability mass on them per step
            (``policy/invalid_mass``) and per sequence (``policy/invalid_seq_mass``,
            ``train/invalid_seq_rate``); see ``docs/tail_risk.md``.
    """

    name: str
    binary_reward: bool

    def train_examples(self) -> Sequence[Example]:
        """The training split (loaded lazily, cached by the task)."""
        ...

    def val_examples(self) -> Sequence[Example]:
        """The evaluation split."""
        ...

    def messages(self, example: Example) -> Messages:
        """The chat for one example (paper appendix templates)."""
        ...

    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> list[float]:
        """Rewards for decoded responses, one per (example, response) pair.

        Must never raise on model output and must return within the task's
        time limit: a failing or timed-out check scores 0.
        """
        ...
