"""The rollout seam: engines that turn prompts into sampled responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from tre_lightning.checks import boolean, integer, real


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled (paper: temperature 1.0, top-p 1.0 for training;
    temperature 1.0, top-p 0.7, n = 8 for evaluation).

    Attributes:
        n: samples per prompt (>= 1).
        temperature: > 0.
        top_p: in (0, 1].
        top_k: 0 disables top-k filtering.
        max_new_tokens: response length cap (>= 1).
        greedy: argmax decoding (ignores temperature/top-p/top-k).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    greedy: bool = False

    def __post_init__(self) -> None:
        integer("n", self.n, 1)
        real("temperature", self.temperature, 0.0, low_open=True)
        real("top_p", self.top_p, 0.0, 1.0, low_open=True)
        integer("top_k", self.top_k, 0)
        integer("max_new_tokens", self.max_new_tokens, 1)
        boolean("greedy", self.greedy)


def sampling_of(cfg: Any) -> SamplingParams:
    """The :class:`SamplingParams` of a config's n / temperature / top_p / top_k / max_new_tokens
    (which validates them: the one home of the sampling checks for every config)."""
    return SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                          max_new_tokens=cfg.max_new_tokens)


@dataclass
class Rollout:
    """Sampled responses for N = num_prompts * n sequences, grouped by prompt
    (rows i*n .. i*n+n-1 belong to prompt i).

    Attributes:
        prompt_ids: (N, P) left-padded prompt token ids.
        prompt_mask: (N, P) 1 on real prompt tokens.
        response_ids: (N, R) right-padded response ids (pad after eos).
        response_mask: (N, R) 1 on valid response tokens, eos included.
        response_lengths: (N,) number of valid response tokens.
        log_probs: (N, R) behaviour log-probs of the sampled tokens, when the
            engine provides them (None for HF generate).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    response_lengths: Tensor
    log_probs: Tensor | None = None

    @property
    def input_ids(self) -> Tensor:
        """(N, P + R) prompt and response concatenated."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """(N, P + R) attention mask over prompt and response."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates responses for a batch of tokenized prompts."""

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams) -> Rollout:
        """prompt_ids/prompt_mask: (B, P) left-padded; returns B * sampling.n rows."""
        ...

    def sync_weights(self, actor: torch.nn.Module) -> None:
        """Make the engine generate with the actor's current weights."""
        ...
