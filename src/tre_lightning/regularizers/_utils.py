"""Shared helpers of the strategy objects: validation, masked statistics, selection."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor

from tre_lightning.regularizers.base import PolicyContext, RegularizerOutput


def _cdt(x: Tensor) -> torch.dtype:
    """float32 for half precision, float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def check_coef(value: float, *, name: str = "coef", upper: float | None = None) -> float:
    """A finite real coefficient >= 0 (and <= ``upper`` when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")
    if value < 0 or (upper is not None and value > upper):
        rng = "[0, inf)" if upper is None else f"[0, {upper:g}]"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return float(value)


def check_fraction(value: float, *, name: str) -> float:
    """A real number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def check_positive_int(value: int | None, *, name: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int >= 1{extra}, got {value!r}")
    return value


def make_repr(obj: object, *names: str) -> str:
    args = ", ".join(f"{n}={getattr(obj, n)!r}" for n in names)
    return f"{type(obj).__name__}({args})"


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask > 0`` as a detached float32 scalar (0 if empty)."""
    valid = mask > 0
    x = torch.where(valid, x.detach().float(), 0.0)
    return x.sum() / valid.sum().clamp(min=1)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    valid = mask > 0
    if not bool(valid.any()):
        return x.new_zeros((), dtype=torch.float32)
    return x.detach()[valid].float().max()


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
    s = scores.detach().to(_cdt(scores)).masked_fill(~valid, -math.inf).reshape(-1)
    idx = torch.topk(s, k).indices
    selected.view(-1)[idx] = True
    return selected, k


def token_covariance(advantages: Tensor, log_probs: Tensor, mask: Tensor) -> Tensor:
    """(A - mean A)(log pi - mean log pi) per token, means over valid tokens, detached.

    Cui et al. 2025 (KL-Cov / Clip-Cov); padding positions get garbage-free
    values but are never selected by the callers.
    """
    valid = mask > 0
    n = valid.sum().clamp(min=1)
    dt = torch.promote_types(_cdt(advantages), _cdt(log_probs))
    a = torch.where(valid, advantages.detach().to(dt), 0.0)
    lp = torch.where(valid, log_probs.detach().to(dt), 0.0)
    return (a - a.sum() / n) * (lp - lp.sum() / n)


class EntropyLikeBonus:
    """Shared shape of a per-token bonus on an entropy-like measure h of pi(. | s_t).

    The per-token loss is ``-h`` on valid tokens (the module adds
    ``coef * aggregate(loss)``); ``coef == 0`` computes nothing. Subclasses set
    ``name`` and ``metric`` (the key of the token mean of h) and implement
    :meth:`measure`.

    Args:
        coef: α >= 0; 0 gives vanilla PPO.
        chunk_size: rows per kernel chunk (None: automatic).
    """

    name: ClassVar[str]
    metric: ClassVar[str]
    coef: float

    def __init__(self, coef: float = 0.001, chunk_size: int | None = None) -> None:
        self.coef = check_coef(coef)
        self.chunk_size = check_positive_int(chunk_size, name="chunk_size")

    def measure(self, logits: Tensor) -> Tensor:
        """h per position, differentiable in ``logits``."""
        raise NotImplementedError

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        if self.coef == 0.0:
            return RegularizerOutput()
        h = self.measure(ctx.logits)
        loss = torch.where(ctx.mask > 0, -h, 0.0)
        return RegularizerOutput(loss=loss, metrics={self.metric: masked_mean(h, ctx.mask)})

    def __repr__(self) -> str:
        return make_repr(self, "coef", "chunk_size")
