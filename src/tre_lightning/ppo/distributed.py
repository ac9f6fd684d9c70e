"""Batch statistics over the whole data-parallel batch (all ranks).

Under data parallelism (FSDP2 / DDP, ``W`` ranks, gradients *averaged* over
the ranks) two batch statistics of PPO must be global for a ``W``-rank run to
be the single-process update on the global batch:

- advantage whitening: mean and unbiased variance over the valid tokens of
  *all* ranks (:func:`global_masked_whiten`);
- the loss denominator of a mini-batch: the mini-batch's valid-token count
  (``token-mean``) or sequence count (seq-mean modes) summed over the ranks,
  divided by ``W`` because the gradients are averaged
  (:func:`global_loss_normalizer`).

The maths is pure: the collective is passed in as ``all_reduce``, a callable
that returns the element-wise *sum* of a tensor over the data-parallel group
(every rank calls it the same number of times, in the same order). Without
it (``all_reduce=None``, one process) both functions are exactly their
single-process counterparts :func:`~tre_lightning.ppo.masked.masked_whiten`
and :func:`~tre_lightning.ppo.aggregation.loss_normalizer`.
:func:`process_group_all_reduce` makes the callable from a
``torch.distributed`` process group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tre_lightning import checks
from tre_lightning.ppo._tensors import check_aligned
from tre_lightning.ppo.aggregation import LossAggregation, loss_normalizer
from tre_lightning.ppo.masked import _acc_dtype, _masked_weighted, _valid, masked_whiten

__all__ = ["AllReduce", "global_loss_normalizer", "global_masked_whiten", "process_group_all_reduce"]

AllReduce = Callable[[Tensor], Tensor]
"""Returns the element-wise sum of its argument over all ranks (must not rely on in-place results)."""


def process_group_all_reduce(group: Any = None) -> AllReduce:
    """An :data:`AllReduce` summing over a ``torch.distributed`` process group (None: the default group)."""
    import torch.distributed as dist

    def all_reduce(t: Tensor) -> Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    return all_reduce


def global_masked_whiten(
    x: Tensor,
    mask: Tensor,
    *,
    all_reduce: AllReduce | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """:func:`masked_whiten` with the statistics of the whole data-parallel batch.

    Mean and unbiased variance are those of the valid entries of all ranks'
    ``x`` together (identical to ``masked_whiten`` on the concatenated batch),
    computed in two passes for numerical care: all-reduce (Σ m·x, Σ m) →
    mean, then all-reduce Σ m·(x − mean)² → variance. Two collectives of one
    and two scalars; the global count is read on the host (one sync, equal on
    every rank, so every rank raises together if it is < 2).

    Args:
        x: this rank's values, any shape (e.g. advantages, (B, T)).
        mask: same shape; bool or float weights.
        all_reduce: sums a tensor over the ranks; None = one process (exactly ``masked_whiten``).
        shift_mean: subtract the mean (True) or only rescale (False).
        eps: added to the variance, >= 0.

    Returns:
        This rank's whitened ``x``, same shape and dtype; 0 on padding.
    """
    if all_reduce is None:
        return masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    check_aligned(("x", x), mask=("mask", mask))
    eps = checks.real("eps", eps, 0.0)
    dtype = _acc_dtype(x.dtype)
    weighted, weights = _masked_weighted(x, mask, dtype)
    first = all_reduce(torch.stack([weighted.sum(), weights.sum()]))
    total, count = first[0], first[1]
    n = float(count)
    if n <= 1:
        raise ValueError(
            f"mask must select more than one element over all ranks to whiten (sum of mask = {n:g})"
        )
    mean = total / count
    xf = x.to(dtype)
    centered_sq, _ = _masked_weighted((xf - mean) ** 2, mask, dtype)
    var = all_reduce(centered_sq.sum().reshape(1))[0] / count
    var = var * (count / (count - 1))
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    out = torch.where(_valid(mask), out, torch.zeros((), dtype=dtype, device=x.device))
    return out.to(x.dtype)


def global_loss_normalizer(
    mask: Tensor,
    mode: LossAggregation = "token-mean",
    *,
    all_reduce: AllReduce | None = None,
    world_size: int = 1,
) -> Tensor:
    """The ``normalizer`` for ``aggregate_loss`` on every micro-batch of this rank's mini-batch.

    ``sum over ranks of loss_normalizer(mask, mode) / world_size``: each
    rank's mini-batch loss is then ``W ×`` its share of the global mini-batch
    loss, so the *average* of the ranks' gradients (what FSDP / DDP compute)
    is the gradient of the global mini-batch loss. ``token-mean``: global
    valid-token count / W; seq-mean modes: global sequence count / W.

    Args:
        mask: (B, T) this rank's mini-batch response mask.
        mode: aggregation mode.
        all_reduce: sums a tensor over the ranks; None = one process (exactly ``loss_normalizer``).
        world_size: the number of ranks whose gradients are averaged (``W``).

    Returns:
        A scalar tensor, equal on every rank.
    """
    checks.integer("world_size", world_size, 1)
    local = loss_normalizer(mask, mode)
    if all_reduce is None:
        if world_size != 1:
            raise ValueError(f"world_size={world_size} needs an all_reduce")
        return local
    return all_reduce(local.reshape(1))[0] / world_size
