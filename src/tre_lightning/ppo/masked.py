"""Masked reductions over response tokens, plus the argument checks shared by
the PPO maths.

A mask marks the valid response tokens with a non-zero entry (bool, or float
1.0); padding is 0. Values at padding positions never influence a result: they
are replaced by 0 with ``torch.where`` before anything is multiplied or summed,
so even ``inf`` garbage in the padding cannot turn a result into NaN. A float
mask may carry fractional weights (e.g. a regularizer's per-token weight); the
reductions then become weighted sums and weighted means.

Precision: for 16-bit inputs (float16, bfloat16) the reductions accumulate in
float32 and the result is cast back to the input dtype; float32 and float64
inputs are computed in their own dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["masked_mean", "masked_sum", "masked_var", "masked_whiten"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------
# Argument checks (private; shared by the other modules of tre_lightning.ppo)
# --------------------------------------------------------------------------


def _check_tensor(name: str, x: object) -> Tensor:
    """Raise TypeError unless ``x`` is a tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_float_tensor(name: str, x: object) -> Tensor:
    """Raise unless ``x`` is a floating-point tensor."""
    t = _check_tensor(name, x)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def _check_mask(name: str, mask: object) -> Tensor:
    """Raise unless ``mask`` is a bool, integer or floating tensor."""
    m = _check_tensor(name, mask)
    if m.is_complex():
        raise ValueError(f"{name} must be a bool, integer or floating tensor, got dtype {m.dtype}")
    return m


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise ValueError naming both arguments and both shapes if they differ."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got "
            f"{name_a}.shape={tuple(a.shape)} and {name_b}.shape={tuple(b.shape)}"
        )


def _check_2d(name: str, x: Tensor) -> None:
    """Raise ValueError unless ``x`` is (B, T)."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D with shape (B, T), got shape {tuple(x.shape)}")


def _check_number(name: str, value: object) -> float:
    """Raise unless ``value`` is a real Python/NumPy number (not bool, not NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must be a number, got nan")
    return v


def _check_range(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Raise ValueError naming ``name`` and the allowed interval if ``value`` is outside it."""
    v = _check_number(name, value)
    ok = math.isfinite(v)  # an infinite hyper-parameter is never meant here
    if low is not None:
        ok = ok and (v >= low if low_inclusive else v > low)
    if high is not None:
        ok = ok and (v <= high if high_inclusive else v < high)
    if not ok:
        lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value!r}")
    return v


def _check_choice(name: str, value: object, allowed: Iterable[str]) -> str:
    """Raise ValueError listing the allowed values if ``value`` is not one of them."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value  # type: ignore[return-value]


def _check_dim(name: str, dim: object, ndim: int) -> int | None:
    """Raise ValueError unless ``dim`` is None or a valid dimension index."""
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int or None, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name} must be in [{-ndim}, {ndim - 1}] for a {ndim}-D input, got {dim}")
    return dim


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


def _check_x_mask(x: object, mask: object) -> tuple[Tensor, Tensor]:
    xt = _check_float_tensor("x", x)
    mt = _check_mask("mask", mask)
    _check_same_shape("x", xt, "mask", mt)
    return xt, mt


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
    x, mask = _check_x_mask(x, mask)
    dim = _check_dim("dim", dim, x.dim())
    weighted, _ = _masked_weighted(x, mask, _acc_dtype(x.dtype))
    out = weighted.sum() if dim is None else weighted.sum(dim=dim)
    return out.to(x.dtype)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the valid entries: ``sum(x * m) / sum(m)``.

    An empty selection (``sum(m) == 0``) gives 0, not NaN, so that an
    all-padding (micro-)batch or row contributes nothing to a metric.

    Args:
        x: any shape, floating point.
        mask: same shape as ``x``; bool or float (weights).
        dim: reduce over this dimension only; None reduces over everything.

    Returns:
        A scalar (``dim=None``) or ``x``'s shape without ``dim``; dtype of ``x``.
    """
    x, mask = _check_x_mask(x, mask)
    dim = _check_dim("dim", dim, x.dim())
    weighted, weights = _masked_weighted(x, mask, _acc_dtype(x.dtype))
    if dim is None:
        num, den = weighted.sum(), weights.sum()
    else:
        num, den = weighted.sum(dim=dim), weights.sum(dim=dim)
    return _safe_divide(num, den).to(x.dtype)


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
    x, mask = _check_x_mask(x, mask)
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
    x, mask = _check_x_mask(x, mask)
    eps = _check_range("eps", eps, 0.0)
    dtype = _acc_dtype(x.dtype)
    mean, var = _mean_var(x, mask, unbiased=True)
    xf = x.to(dtype)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    out = torch.where(_valid(mask), out, torch.zeros((), dtype=dtype, device=x.device))
    return out.to(x.dtype)
