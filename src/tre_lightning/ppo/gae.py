"""Generalized Advantage Estimation (Schulman et al. 2016) over ragged responses."""

from __future__ import annotations

import torch
from torch import Tensor

from tre_lightning import checks
from tre_lightning.ppo._tensors import check_aligned
from tre_lightning.ppo.masked import _acc_dtype, _valid

__all__ = ["compute_gae"]


def compute_gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """GAE advantages and value targets per response token.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * A_{t+1}``, run backwards over the valid
    tokens of each row; ``returns = A + V``. The value after a row's last
    valid token is 0 (the episode ends there), so nothing leaks from the
    padding, whatever it contains. Positions with mask 0 are skipped: their
    reward and value are ignored and the recursion carries across them (with
    right padding this only means "V after the last token is 0").

    The defaults gamma = lam = 1 are the paper's (appendix A.1, Table 2). No
    whitening happens here: the caller whitens the advantages over the whole
    batch with :func:`masked_whiten`. Outputs carry no gradient (they are
    targets); the recursion runs in float32 for 16-bit inputs.

    Args:
        token_rewards: (B, T) reward per response token (score on the last
            valid token, minus any per-token KL penalty).
        values: (B, T) critic values V(s_t) of the behaviour policy's rollout.
        mask: (B, T) 1 on valid response tokens, 0 on padding.
        gamma: discount, in [0, 1].
        lam: GAE lambda, in [0, 1].

    Returns:
        (advantages, returns), both (B, T), 0 on padding, dtype of the inputs.
    """
    check_aligned(("token_rewards", token_rewards), ("values", values), mask=("mask", mask), two_d=True)
    gamma = checks.real("gamma", gamma, 0.0, 1.0)
    lam = checks.real("lam", lam, 0.0, 1.0)

    out_dtype = torch.promote_types(token_rewards.dtype, values.dtype)
    dtype = _acc_dtype(out_dtype)
    with torch.no_grad():
        rewards = token_rewards.detach().to(dtype)
        vals = values.detach().to(dtype)
        valid = _valid(mask)
        batch, length = rewards.shape
        zero = torch.zeros((), dtype=dtype, device=rewards.device)
        next_value = torch.zeros(batch, dtype=dtype, device=rewards.device)
        next_adv = torch.zeros(batch, dtype=dtype, device=rewards.device)
        advantages = torch.zeros(batch, length, dtype=dtype, device=rewards.device)
        for t in range(length - 1, -1, -1):
            valid_t = valid[:, t]
            delta = rewards[:, t] + gamma * next_value - vals[:, t]
            adv_t = delta + (gamma * lam) * next_adv
            adv_t = torch.where(valid_t, adv_t, zero)
            advantages[:, t] = adv_t
            next_adv = torch.where(valid_t, adv_t, next_adv)
            next_value = torch.where(valid_t, vals[:, t], next_value)
        returns = torch.where(valid, advantages + vals, zero)
    return advantages.to(out_dtype), returns.to(out_dtype)
