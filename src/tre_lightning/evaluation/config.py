"""The evaluation protocol's settings (paper, section 6: 8 samples, temperature 1.0, top-p 0.7)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tre_lightning.checks import int_list, integer, optional
from tre_lightning.rollout.base import SamplingParams, sampling_of

__all__ = ["EvalConfig"]


@dataclass
class EvalConfig:
    """The paper's evaluation protocol (section 6): n = 8, temperature 1.0, top-p 0.7.

    Attributes:
        n: samples per test prompt, >= 1.
        temperature: > 0.
        top_p: in (0, 1].
        top_k: 0 = off.
        max_new_tokens: >= 1.
        batch_size: test prompts per validation step, >= 1.
        pass_k: the k of the reported pass@k for binary tasks, each in [1, n]
            (Pass@1 is the paper's metric).
        seed: validation reseeds the RNG with this value (and restores the
            training RNG afterwards), so evaluation is reproducible and does
            not perturb training.
        max_examples: evaluate on the first ``max_examples`` test prompts, or
            None for all.
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = 0
    max_new_tokens: int = 512
    batch_size: int = 8
    pass_k: list[int] = field(default_factory=lambda: [1])
    seed: int = 1234
    max_examples: int | None = None

    def __post_init__(self) -> None:
        sampling_of(self)
        integer("batch_size", self.batch_size, 1)
        self.pass_k = int_list("pass_k", self.pass_k, 1, self.n)
        integer("seed", self.seed, 0)
        optional(integer, "max_examples", self.max_examples, 1)

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters for evaluation."""
        return sampling_of(self)
