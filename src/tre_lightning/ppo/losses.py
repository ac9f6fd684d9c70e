"""PPO's clipped surrogate (with optional dual clip) and clipped value loss, per token.

Both functions return the *per-token* loss (0 on padding, with gradient) and
detached scalar metrics; reduce the loss with :func:`aggregate_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tre_lightning import checks
from tre_lightning.ppo._tensors import check_aligned
from tre_lightning.ppo.masked import _valid, masked_mean

__all__ = ["PolicyLossOutput", "ValueLossOutput", "clipped_policy_loss", "clipped_value_loss"]


@dataclass
class PolicyLossOutput:
    """Result of :func:`clipped_policy_loss`.

    Attributes:
        per_token: (B, T) surrogate loss per token, 0 on padding, with gradient.
        clipped: (B, T) bool, True on the valid tokens where the eps-clipped
            branch is strictly larger than the unclipped one (ratio clipped in
            the direction of the advantage: A > 0 and r > 1 + eps_high, or
            A < 0 and r < 1 - eps_low), before the dual clip; False on padding.
            Clip-Cov reads it (``PolicyContext.clipped``).
        clipfrac: scalar, the (mask-weighted) fraction of valid tokens that
            are ``clipped``.
        clipfrac_lower: scalar, fraction of valid tokens on which the dual clip
            is active (A < 0 and r > c); 0 without dual clip.
        approx_kl: scalar, masked mean of ``old_log_probs - log_probs`` (k1
            estimate of KL(pi_old || pi); uses the clamped log-ratio).
    """

    per_token: Tensor
    clipped: Tensor
    clipfrac: Tensor
    clipfrac_lower: Tensor
    approx_kl: Tensor


@dataclass
class ValueLossOutput:
    """Result of :func:`clipped_value_loss`.

    Attributes:
        per_token: (B, T) value loss per token, 0 on padding, with gradient.
        vf_clipfrac: scalar, fraction of valid tokens on which the clipped
            branch is strictly larger; 0 when unclipped.
    """

    per_token: Tensor
    vf_clipfrac: Tensor


def _zero_padding(x: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _fraction(condition: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Detached masked mean of a bool condition."""
    return masked_mean(condition.to(dtype), mask).detach()


def clipped_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_clamp: float = 20.0,
) -> PolicyLossOutput:
    """PPO clipped surrogate per token, with optional dual clip (Ye et al. 2020).

    ``r = exp(clamp(logp - old, -log_ratio_clamp, log_ratio_clamp))``;
    ``l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``; with dual clip
    ``c > 1`` and ``A < 0``: ``l = min(l, -A c)``, which bounds the loss of a
    negative-advantage token whose ratio has grown past ``c``. Tokens where a
    clip is active get zero gradient. The paper's runs use eps = 0.2 and
    c = 3 (verl's ``clip_ratio_c``); ``dual_clip=None`` is plain PPO.

    Args:
        log_probs: (B, T) log pi_theta(a_t | s_t), with gradient.
        old_log_probs: (B, T) behaviour-policy log-probs.
        advantages: (B, T) advantages (whitened by the caller).
        mask: (B, T) 1 on valid response tokens.
        clip_ratio_low: eps_low, in [0, 1).
        clip_ratio_high: eps_high, >= 0.
        dual_clip: c > 1, or None for no dual clip.
        log_ratio_clamp: bound on |logp - old| before exp, > 0 (default 20, as verl).

    Returns:
        :class:`PolicyLossOutput`; the loss in the promoted input dtype.
    """
    named = (("log_probs", log_probs), ("old_log_probs", old_log_probs), ("advantages", advantages))
    check_aligned(*named, mask=("mask", mask), two_d=True)
    eps_low = checks.real("clip_ratio_low", clip_ratio_low, 0.0, 1.0, high_open=True)
    eps_high = checks.real("clip_ratio_high", clip_ratio_high, 0.0)
    dual_clip = checks.optional(checks.real, "dual_clip", dual_clip, 1.0, low_open=True)
    bound = checks.real("log_ratio_clamp", log_ratio_clamp, 0.0, low_open=True)

    valid = _valid(mask)
    log_ratio = (log_probs - old_log_probs).clamp(-bound, bound)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    dtype = loss.dtype
    clip_active = (clipped > unclipped) & valid
    clipfrac = _fraction(clip_active, mask, dtype)

    if dual_clip is not None:
        negative = advantages < 0
        dual = -advantages * dual_clip
        clipfrac_lower = _fraction((loss > dual) & negative, mask, dtype)
        loss = torch.where(negative, torch.minimum(loss, dual), loss)
    else:
        clipfrac_lower = torch.zeros((), dtype=dtype, device=loss.device)

    approx_kl = masked_mean((-log_ratio).detach(), mask)
    return PolicyLossOutput(
        per_token=_zero_padding(loss, valid),
        clipped=clip_active,
        clipfrac=clipfrac,
        clipfrac_lower=clipfrac_lower,
        approx_kl=approx_kl,
    )


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float | None = 0.5,
    scale: float = 0.5,
) -> ValueLossOutput:
    """Clipped value loss per token: ``scale * max((v - R)^2, (clip(v, v_old ± c) - R)^2)``.

    The clipped branch keeps the critic within ``c`` of the values it had at
    rollout time; where it is active the gradient is 0. Defaults as verl:
    ``c = 0.5``, ``scale = 0.5``. ``clip_range=None`` gives the plain
    ``scale * (v - R)^2``.

    Args:
        values: (B, T) current critic predictions, with gradient.
        old_values: (B, T) critic values at rollout time.
        returns: (B, T) value targets (GAE returns).
        mask: (B, T) 1 on valid response tokens.
        clip_range: c > 0, or None for no clipping.
        scale: multiplier of the squared error, > 0.

    Returns:
        :class:`ValueLossOutput`; the loss in the promoted input dtype.
    """
    named = (("values", values), ("old_values", old_values), ("returns", returns))
    check_aligned(*named, mask=("mask", mask), two_d=True)
    clip_range = checks.optional(checks.real, "clip_range", clip_range, 0.0, low_open=True)
    scale = checks.real("scale", scale, 0.0, low_open=True)

    valid = _valid(mask)
    unclipped = (values - returns).square()
    if clip_range is None:
        loss = unclipped
        vf_clipfrac = torch.zeros((), dtype=loss.dtype, device=loss.device)
    else:
        values_clipped = torch.maximum(torch.minimum(values, old_values + clip_range), old_values - clip_range)
        clipped = (values_clipped - returns).square()
        loss = torch.maximum(unclipped, clipped)
        vf_clipfrac = _fraction(clipped > unclipped, mask, loss.dtype)
    return ValueLossOutput(per_token=_zero_padding(scale * loss, valid), vf_clipfrac=vf_clipfrac)
