"""Turning sequence scores into per-token rewards."""

from __future__ import annotations

import torch
from torch import Tensor

from tre_lightning import checks
from tre_lightning.ppo._tensors import check_2d, check_aligned, check_mask, check_tensor
from tre_lightning.ppo.masked import _valid

__all__ = ["last_token_index", "token_level_rewards"]


def last_token_index(mask: Tensor) -> Tensor:
    """Index of each row's last valid token, -1 for a row without one.

    Works for any mask (right padding or interior gaps), without a host sync.

    Args:
        mask: (B, T) 1 on valid response tokens.

    Returns:
        (B,) int64.
    """
    check_mask("mask", mask)
    check_2d("mask", mask)
    batch, length = mask.shape
    if length == 0:
        return torch.full((batch,), -1, dtype=torch.long, device=mask.device)
    positions = torch.arange(1, length + 1, device=mask.device)  # 1-based, so that 0 means "none"
    return (positions * _valid(mask)).amax(dim=1) - 1


def token_level_rewards(
    scores: Tensor,
    mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """Per-token rewards: the sequence score on the last valid token, minus a KL penalty.

    ``r_t = score * [t == last valid token] - kl_coef * kl_t * mask_t``. The
    score sits on the row's last valid response token (the EOS, or the last
    token of a truncated response), as verl does; padding gets 0. A row with
    no valid token gets no reward at all. The paper's runs use no KL in the
    reward (``kl_coef = 0``).

    Args:
        scores: (B,) sequence-level scores (task reward).
        mask: (B, T) 1 on valid response tokens.
        kl: (B, T) per-token KL estimate (see :func:`~tre_lightning.ppo.kl.sampled_kl`), or None.
        kl_coef: coefficient of the KL penalty, >= 0; must be 0 when ``kl`` is None.

    Returns:
        (B, T) rewards in the dtype of ``scores`` (promoted with ``kl``'s).
    """
    check_tensor("scores", scores)
    check_mask("mask", mask)
    check_2d("mask", mask)
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise ValueError(
            f"scores must have shape (B,) with B = mask.shape[0], got "
            f"scores.shape={tuple(scores.shape)} and mask.shape={tuple(mask.shape)}"
        )
    kl_coef = checks.real("kl_coef", kl_coef, 0.0)
    if kl is None and kl_coef != 0.0:
        raise ValueError(f"kl must be given when kl_coef != 0, got kl=None and kl_coef={kl_coef}")

    dtype = scores.dtype if scores.is_floating_point() else torch.get_default_dtype()
    if kl is not None:
        check_aligned(("kl", kl), mask=("mask", mask))
        dtype = torch.promote_types(dtype, kl.dtype)

    valid = _valid(mask)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    if kl is not None and kl_coef != 0.0:
        rewards = torch.where(valid, -kl_coef * kl.to(dtype), zero)
    else:
        rewards = torch.zeros(mask.shape, dtype=dtype, device=mask.device)

    last = last_token_index(mask)
    has_token = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)
    bonus = torch.where(has_token, scores.to(dtype), zero)
    rewards = rewards.index_put((rows, last.clamp(min=0)), bonus, accumulate=True)
    return rewards
