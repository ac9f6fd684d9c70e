"""The regularizer seam: what a strategy object receives and returns.

A regularizer acts on one micro-batch of the policy-loss pass. It may add a
per-token loss term (Ent, TRE-K, TRE-P, Min-Ent, KL-Cov), re-weight the PPO
surrogate per token (Forking-Tokens), stop the surrogate's gradient on some
tokens (Clip-Cov), and report metrics. The module composes a list of them and
knows nothing about any particular one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass
class PolicyContext:
    """One micro-batch of the policy-loss pass (B sequences, T response positions).

    Attributes:
        logits: (B, T, V) current policy logits at the response positions,
            temperature already applied; carries the graph to the actor.
        log_probs: (B, T) log π_θ(a_t | s_t) of the sampled tokens (with grad).
        old_log_probs: (B, T) behaviour-policy log-probs (no grad).
        advantages: (B, T) advantages as used by the surrogate (no grad).
        mask: (B, T) 1.0 on valid response tokens, 0.0 on padding.
        clip_ratio_low: ε_low of the PPO clip, for regularizers that look at
            which tokens the surrogate already clips.
        clip_ratio_high: ε_high of the PPO clip.
    """

    logits: Tensor
    log_probs: Tensor
    old_log_probs: Tensor
    advantages: Tensor
    mask: Tensor
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2


@dataclass
class RegularizerOutput:
    """What a regularizer contributes to the policy loss.

    Attributes:
        loss: (B, T) per-token term; the module adds
            ``coef * aggregate(loss, mask)`` with the PPO aggregation mode.
            The regularizer does NOT multiply by its own coefficient.
        pg_weight: (B, T) multiplies the surrogate's token mask, and so also
            its denominator (Forking-Tokens: 1 on selected tokens, else 0).
            The regularizer folds its coefficient in, so that coef = 0 gives
            all ones.
        pg_detach: (B, T) bool; True where the surrogate's gradient is stopped
            while the token still counts in the denominator (Clip-Cov).
        metrics: scalar diagnostics, logged under ``policy/<name>``.
    """

    loss: Tensor | None = None
    pg_weight: Tensor | None = None
    pg_detach: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class Regularizer(Protocol):
    """A pluggable exploration regularizer. ``coef = 0`` must give vanilla PPO."""

    coef: float

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput: ...
