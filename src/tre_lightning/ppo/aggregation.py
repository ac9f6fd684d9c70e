"""Reducing a per-token loss to the scalar that is back-propagated.

With ``l`` the per-token loss, ``m`` the mask (weights), ``S`` the sequences
with at least one valid token and ``L`` the length constant:

- ``token-mean``:              sum_{b,t} l m / sum_{b,t} m
- ``seq-mean-token-sum``:      (1/|S|) sum_b sum_t l m
- ``seq-mean-token-mean``:     (1/|S|) sum_b (sum_t l m / sum_t m)
- ``seq-mean-token-sum-norm``: (1/|S|) sum_b sum_t l m / L   (Dr. GRPO; L defaults to T)

Gradient accumulation: a mini-batch split into micro-batches gives exactly
the mini-batch loss when every micro-batch passes ``normalizer`` = the
mini-batch's denominator (:func:`loss_normalizer` of the mini-batch mask:
its valid-token count for ``token-mean``, its number of sequences for the
seq-mean modes) and the micro-batch losses are summed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from tre_lightning import checks
from tre_lightning.ppo._tensors import check_2d, check_aligned, check_mask
from tre_lightning.ppo.masked import _acc_dtype, _masked_weighted, _safe_divide

__all__ = ["LOSS_AGGREGATIONS", "LossAggregation", "aggregate_loss", "loss_normalizer"]

LossAggregation = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_AGGREGATIONS: tuple[str, ...] = get_args(LossAggregation)

Normalizer = float | int | Tensor


def _num_sequences(weights: Tensor) -> Tensor:
    """Number of rows with at least one valid token."""
    return (weights.sum(dim=1) != 0).sum().to(weights.dtype)


def _token_count(weights: Tensor) -> Tensor:
    return weights.sum()


_DEFAULT_DENOMINATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "token-mean": _token_count,
    "seq-mean-token-sum": _num_sequences,
    "seq-mean-token-mean": _num_sequences,
    "seq-mean-token-sum-norm": _num_sequences,
}


def _token_mean(weighted: Tensor, weights: Tensor, length: int) -> Tensor:
    return weighted.sum()


def _seq_mean_token_sum(weighted: Tensor, weights: Tensor, length: int) -> Tensor:
    return weighted.sum()


def _seq_mean_token_mean(weighted: Tensor, weights: Tensor, length: int) -> Tensor:
    return _safe_divide(weighted.sum(dim=1), weights.sum(dim=1)).sum()


def _seq_mean_token_sum_norm(weighted: Tensor, weights: Tensor, length: int) -> Tensor:
    return weighted.sum() / length


# numerator of each mode; the denominator is the normalizer (default: _DEFAULT_DENOMINATORS)
_NUMERATORS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def loss_normalizer(mask: Tensor, mode: LossAggregation = "token-mean") -> Tensor:
    """The denominator ``aggregate_loss`` uses for this mask and mode.

    Compute it once on a whole mini-batch and pass it as ``normalizer`` to
    every micro-batch: the micro-batch losses then sum to the mini-batch loss.

    Args:
        mask: (B, T) 1 on valid response tokens.
        mode: aggregation mode.

    Returns:
        Scalar: the weighted valid-token count (``token-mean``) or the number
        of sequences with at least one valid token (seq-mean modes).
    """
    check_mask("mask", mask)
    check_2d("mask", mask)
    checks.one_of("mode", mode, LOSS_AGGREGATIONS)
    dtype = mask.dtype if mask.is_floating_point() else torch.get_default_dtype()
    return _DEFAULT_DENOMINATORS[mode](mask.to(_acc_dtype(dtype)))


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: LossAggregation = "token-mean",
    *,
    normalizer: Normalizer | None = None,
    norm_length: int | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar (formulas in the module docstring).

    An empty selection gives 0 (never NaN). Padding values have no influence.

    Args:
        per_token: (B, T) loss per token.
        mask: (B, T) 1 on valid response tokens (float weights allowed).
        mode: "token-mean" (paper), "seq-mean-token-sum", "seq-mean-token-mean"
            or "seq-mean-token-sum-norm".
        normalizer: replaces the denominator (valid-token count for
            token-mean, number of sequences for the seq-mean modes); > 0. Use
            the mini-batch's :func:`loss_normalizer` under gradient accumulation.
        norm_length: the constant L of seq-mean-token-sum-norm, >= 1 (defaults
            to T); ignored by the other modes.

    Returns:
        Scalar tensor in the dtype of ``per_token`` (summed in float32 for 16-bit).
    """
    check_aligned(("per_token", per_token), mask=("mask", mask), two_d=True)
    checks.one_of("mode", mode, LOSS_AGGREGATIONS)
    length = per_token.shape[1] if norm_length is None else checks.integer("norm_length", norm_length, 1)

    dtype = _acc_dtype(per_token.dtype)
    weighted, weights = _masked_weighted(per_token, mask, dtype)
    numerator = _NUMERATORS[mode](weighted, weights, max(length, 1))

    if normalizer is None:
        denominator = _DEFAULT_DENOMINATORS[mode](weights)
        return _safe_divide(numerator, denominator).to(per_token.dtype)
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got a tensor of shape {tuple(normalizer.shape)}")
        denominator = normalizer.reshape(()).to(device=numerator.device, dtype=dtype)
    else:
        denominator = torch.tensor(
            checks.real("normalizer", normalizer, 0.0, low_open=True), dtype=dtype, device=numerator.device
        )
    return (numerator / denominator).to(per_token.dtype)
