"""Masked reductions over response tokens: the one home of masked statistics.

A mask marks the valid response tokens with a non-zero entry (bool, or float
1.0); padding is 0. Values at padding positions never influence a result: they
are replaced by 0 with ``torch.where`` before anything is multiplied or summed,
so even ``inf`` garbage in the padding cannot turn a result into NaN. A float
mask may carry fractional weights (e.g. a regularizer's per-token weight); the
reductions then become weighted sums and weighted means.

Precision: for 16-bit inputs (float16, bfloat16) the reductions accumulate in
float32 and the result is cast back to the input dtype; float32 and float64
inputs are computed in their own dtype.

Metrics: ``masked_mean(x.detach().float(), mask)`` is the detached float32
scalar the regularizers log (0 for an empty selection).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tre_lightning import checks
from tre_lightning.ppo._tensors import check_aligned

__all__ = ["masked_max", "masked_mean", "masked_sum", "masked_var", "masked_whiten"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_dim(dim: object, ndim: int) -> int | None:
    """None, or a dimension index of an ``ndim``-D input."""
    return checks.optional(checks.integer, "dim", dim, -ndim, ndim - 1)


# --------------------------------------------------------------------------
# Internal helpers
# --------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for 16-bit floats, else the dtype itself."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _valid(mask: Tensor) -> Tensor:
    """Bool tensor, True on valid (non-zero) mask entries."""
    return mask if mask.dtype == torch.bool else mask != 0


def _masked_weighted(x: Tensor, mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(x with padding zeroed and multiplied by the mask weight, weights), both in ``dtype``."""
    weights = mask.to(dtype)
    xs = torch.where(_valid(mask), x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))
    return xs * weights, weights


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 where den == 0 (and no NaN gradient there)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def _weighted_sums(x: Tensor, mask: Tensor, dim: object) -> tuple[Tensor, Tensor]:
    """(sum of mask-weighted x, sum of weights) over ``dim``, in the accumulation dtype."""
    check_aligned(("x", x), mask=("mask", mask))
    d = _check_dim(dim, x.dim())
    weighted, weights = _masked_weighted(x, mask, _acc_dtype(x.dtype))
    if d is None:
        return weighted.sum(), weights.sum()
    return weighted.sum(dim=d), weights.sum(dim=d)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the valid (mask != 0) entries, weighted by the mask.

    Args:
        x: any shape, floating point.
        mask: same shape as ``x``; bool or float (weights).
        dim: reduce over this dimension only; None reduces over everything.

    Returns:
        A scalar (``dim=None``) or ``x``'s shape without ``dim``; dtype of ``x``.
    """
    total, _ = _weighted_sums(x, mask, dim)
    return total.to(x.dtype)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the valid entries: ``sum(x * m) / sum(m)``.

    An empty selection (``sum(m) == 0``) gives 0, not NaN, so that an
    all-padding (micro-)batch or row contributes nothing to a metric. The
    result keeps ``x``'s graph and dtype; for a logged metric pass
    ``x.detach().float()`` (a detached float32 scalar, as the regularizers do).

    Args:
        x: any shape, floating point.
        mask: same shape as ``x``; bool or float (weights).
        dim: reduce over this dimension only; None reduces over everything.

    Returns:
        A scalar (``dim=None``) or ``x``'s shape without ``dim``; dtype of ``x``.
    """
    num, den = _weighted_sums(x, mask, dim)
    return _safe_divide(num, den).to(x.dtype)


def masked_max(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Largest ``x`` over the valid (mask != 0) entries; 0 for an empty selection.

    Mask weights do not matter here, only which entries are valid. Like
    :func:`masked_mean`, an all-padding selection gives 0 rather than -inf.

    Args:
        x: any shape, floating point.
        mask: same shape as ``x``; bool or float.
        dim: reduce over this dimension only; None reduces over everything.

    Returns:
        A scalar (``dim=None``) or ``x``'s shape without ``dim``; dtype of ``x``.
    """
    check_aligned(("x", x), mask=("mask", mask))
    d = _check_dim(dim, x.dim())
    valid = _valid(mask)
    filled = torch.where(valid, x, torch.full((), -torch.inf, dtype=x.dtype, device=x.device))
    best, any_valid = (filled.amax(), valid.any()) if d is None else (filled.amax(dim=d), valid.any(dim=d))
    return torch.where(any_valid, best, torch.zeros((), dtype=x.dtype, device=x.device))


def _mean_var(x: Tensor, mask: Tensor, unbiased: bool) -> tuple[Tensor, Tensor]:
    """(mean, variance) over all valid entries, in the accumulation dtype."""
    dtype = _acc_dtype(x.dtype)
    weighted, weights = _masked_weighted(x, mask, dtype)
    count = weights.sum()
    n = float(count)  # one host sync: an unusable selection must raise, not give inf/NaN
    if n <= 0:
        raise ValueError("mask must select at least one element to compute a variance, got an empty mask")
    if unbiased and n <= 1:
        raise ValueError(
            f"mask must select more than one element for an unbiased variance (sum of mask = {n:g}); "
            "use unbiased=False or a larger batch"
        )
    mean = weighted.sum() / count
    centered_sq, _ = _masked_weighted((x.to(dtype) - mean) ** 2, mask, dtype)
    var = centered_sq.sum() / count
    if unbiased:
        var = var * (count / (count - 1))
    return mean, var


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all valid entries (one scalar for the whole tensor).

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` with
    ``n = sum(mask)``. Raises ValueError when the mask selects no element, or
    only one with ``unbiased=True`` (the variance is undefined there). The
    check reads ``sum(mask)`` on the host (one device sync).

    Args:
        x: any shape, floating point.
        mask: same shape as ``x``.
        unbiased: Bessel's correction (default, as verl and TRL).

    Returns:
        A scalar in the dtype of ``x`` (accumulated in float32 for 16-bit inputs).
    """
    check_aligned(("x", x), mask=("mask", mask))
    _, var = _mean_var(x, mask, bool(unbiased))
    return var.to(x.dtype)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to zero mean, unit variance over its valid entries.

    ``(x - mean) / sqrt(var + eps)`` with the masked mean and the unbiased
    masked variance over *all* valid entries (one statistic for the whole
    tensor, e.g. the whole rollout batch). ``shift_mean=False`` adds the mean
    back (scale only). Padding positions are set to 0 in the output.

    Args:
        x: any shape, floating point (e.g. advantages, (B, T)).
        mask: same shape as ``x``.
        shift_mean: subtract the mean (True) or only rescale (False).
        eps: added to the variance, >= 0 (default 1e-8, as verl and TRL).

    Returns:
        Same shape and dtype as ``x`` (statistics in float32 for 16-bit inputs).
    """
    check_aligned(("x", x), mask=("mask", mask))
    eps = checks.real("eps", eps, 0.0)
    dtype = _acc_dtype(x.dtype)
    mean, var = _mean_var(x, mask, unbiased=True)
    xf = x.to(dtype)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    out = torch.where(_valid(mask), out, torch.zeros((), dtype=dtype, device=x.device))
    return out.to(x.dtype)
