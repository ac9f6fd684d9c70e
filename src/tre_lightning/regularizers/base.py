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
        clipped: (B, T) bool, True where the surrogate's ε-clip is active
            (:attr:`~tre_lightning.ppo.PolicyLossOutput.clipped`, the tokens
            ``clipfrac`` counts); Clip-Cov skips them.
    """

    logits: Tensor
    log_probs: Tensor
    old_log_probs: Tensor
    advantages: Tensor
    mask: Tensor
    clipped: Tensor


@dataclass
class RegularizerOutput:
    """What a regularizer contributes to the policy loss.

    Attributes:
        loss: (B, T) per-token term; the composer adds
            ``coef * aggregate(loss, mask)`` with the PPO aggregation mode,
            ``coef`` being the regularizer's attribute. The regularizer does
            NOT multiply by its own coefficient.
        pg_weight: (B, T) multiplies the surrogate's token mask, and so also
            its denominator (Forking-Tokens: 1 on selected tokens,
            ``unselected_weight`` elsewhere).
        pg_detach: (B, T) bool; True where the surrogate's gradient is stopped
            while the token still counts in the denominator (Clip-Cov).
        metrics: scalar diagnostics (detached), logged under their key when
            it contains a "/", else under ``policy/<key>``.
    """

    loss: Tensor | None = None
    pg_weight: Tensor | None = None
    pg_detach: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class Regularizer(Protocol):
    """A pluggable exploration regularizer: a ``name`` and ``__call__(ctx)``.

    ``name`` is a short identifier used in metric names (``"tre_p"``). A
    regularizer whose output carries a ``loss`` also has ``coef: float``, the
    weight of that term: the composer adds ``coef × aggregate(loss)``, and a
    regularizer that returns a loss without a ``coef`` is an error the
    composer raises. ``coef`` means only that weight; a regularizer that acts
    on the surrogate (``pg_weight``, ``pg_detach``) has its own named
    parameter instead. Each regularizer has a neutral setting (``coef = 0``,
    ``ForkingTokens(unselected_weight=1)``, ``ClipCov(detach_prob=0)``) that
    returns an empty output, i.e. exactly vanilla PPO.

    The shipped classes inherit from this class explicitly; any object with
    these members is a regularizer too (``isinstance`` checks the members).
    """

    name: str

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput: ...
