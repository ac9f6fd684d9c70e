"""Shared helpers of the strategy objects: token selection, covariance, the entropy-bonus shape.

Argument checks come from :mod:`tre_lightning.checks`, masked statistics from
:mod:`tre_lightning.ppo.masked`.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor

from tre_lightning import checks
from tre_lightning.ppo.masked import masked_mean
from tre_lightning.regularizers._rows import compute_dtype
from tre_lightning.regularizers.base import PolicyContext, Regularizer, RegularizerOutput


def make_repr(obj: object, *names: str) -> str:
    """``ClassName(a=1, b=2)`` from the named attributes (the constructor arguments)."""
    args = ", ".join(f"{n}={getattr(obj, n)!r}" for n in names)
    return f"{type(obj).__name__}({args})"


def count_for_fraction(n: int, fraction: float, rounding: Literal["ceil", "floor"]) -> int:
    """How many of ``n`` tokens a top ``fraction`` selects, at least 1 when n > 0.

    ``"ceil"``: ceil(n * fraction) (Forking-Tokens); ``"floor"``:
    max(1, int(n * fraction)) (KL-Cov / Clip-Cov reference code).
    """
    if n <= 0:
        return 0
    if rounding == "ceil":
        k = math.ceil(n * fraction * (1.0 - 1e-12))  # 15 * 0.2 = 3.0000000000000004
    else:
        k = int(n * fraction)
    return min(n, max(1, k))


def select_top_fraction(
    scores: Tensor, mask: Tensor, fraction: float, rounding: Literal["ceil", "floor"]
) -> tuple[Tensor, int]:
    """Boolean mask of the top ``fraction`` of valid tokens by ``scores`` (detached).

    Returns:
        ``(selected, k)``: selected has the shape of ``scores``; k tokens are
        selected (ties at the threshold are broken by ``torch.topk``).
    """
    valid = mask > 0
    n = int(valid.sum())
    selected = torch.zeros_like(valid)
    k = count_for_fraction(n, fraction, rounding)
    if k == 0:
        return selected, 0
    s = scores.detach().to(compute_dtype(scores.dtype)).masked_fill(~valid, -math.inf).reshape(-1)
    idx = torch.topk(s, k).indices
    selected.view(-1)[idx] = True
    return selected, k


def token_covariance(advantages: Tensor, log_probs: Tensor, mask: Tensor) -> Tensor:
    """(A - mean A)(log pi - mean log pi) per token, means over valid tokens, detached.

    Cui et al. 2025 (KL-Cov / Clip-Cov); padding positions get garbage-free
    values but are never selected by the callers.
    """
    valid = mask > 0
    dt = torch.promote_types(compute_dtype(advantages.dtype), compute_dtype(log_probs.dtype))
    a = torch.where(valid, advantages.detach().to(dt), 0.0)
    lp = torch.where(valid, log_probs.detach().to(dt), 0.0)
    return (a - masked_mean(a, valid)) * (lp - masked_mean(lp, valid))


class EntropyLikeBonus(Regularizer):
    """Shared shape of a per-token bonus on an entropy-like measure h of pi(. | s_t).

    The per-token loss is ``-h`` on valid tokens (the module adds
    ``coef * aggregate(loss)``); ``coef == 0`` computes nothing. Subclasses set
    ``name`` and ``metric`` (the key of the token mean of h) and implement
    :meth:`measure`.

    Args:
        coef: α >= 0; 0 gives vanilla PPO.
        chunk_size: rows per kernel chunk (None: automatic).
    """

    metric: ClassVar[str]
    coef: float

    def __init__(self, coef: float = 0.001, chunk_size: int | None = None) -> None:
        self.coef = checks.real("coef", coef, 0.0)
        self.chunk_size = checks.optional(checks.integer, "chunk_size", chunk_size, 1)

    def measure(self, logits: Tensor) -> Tensor:
        """h per position, differentiable in ``logits``."""
        raise NotImplementedError

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        if self.coef == 0.0:
            return RegularizerOutput()
        h = self.measure(ctx.logits)
        loss = torch.where(ctx.mask > 0, -h, 0.0)
        return RegularizerOutput(loss=loss, metrics={self.metric: masked_mean(h.detach().float(), ctx.mask)})

    def __repr__(self) -> str:
        return make_repr(self, "coef", "chunk_size")
