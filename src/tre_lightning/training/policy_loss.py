"""The policy-loss pass of one micro-batch: PPO surrogate plus the regularizers.

The regularizers see a :class:`~tre_lightning.regularizers.base.PolicyContext`
(current logits, log-probs, behaviour log-probs, advantages, mask) and return
their outputs; :func:`compose_policy_loss` is the one place where the
outputs become a loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tre_lightning.models.actor_critic import ActorCritic
from tre_lightning.ppo import aggregate_loss, clipped_policy_loss, masked_mean
from tre_lightning.regularizers.base import PolicyContext, Regularizer, RegularizerOutput
from tre_lightning.regularizers.functional import log_probs_from_logits, token_stats
from tre_lightning.rollout.experience import Experience
from tre_lightning.training.config import PPOConfig
from tre_lightning.training.stats import RunningMeans

__all__ = ["compose_policy_loss", "invalid_mass", "policy_loss"]


def compose_policy_loss(
    surrogate: Tensor,
    mask: Tensor,
    outputs: Sequence[tuple[Regularizer, RegularizerOutput]],
    mode: str,
    normalizer: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Surrogate + regularizers for one micro-batch (its share of the mini-batch loss), and the
    size of each term.

    Where any ``pg_detach`` is True the surrogate's gradient is stopped; the
    surrogate's mask is ``mask × Π pg_weight``. For ``token-mean`` the
    surrogate's denominator is the mini-batch token count scaled by the
    fraction of this micro-batch's weight that ``pg_weight`` keeps (exact for
    one micro-batch, and for selections that keep the same fraction of every
    micro-batch; data-parallel ranks act as further micro-batches, since
    ``normalizer`` is the global denominator / W); the seq-mean modes keep
    the mini-batch sequence count. Each regularizer that returns a ``loss``
    adds ``coef × aggregate(loss, mask)``.

    Args:
        surrogate: (B, T) per-token PPO surrogate.
        mask: (B, T) 1 on valid response tokens.
        outputs: each regularizer with its output on this micro-batch.
        mode: the loss aggregation mode.
        normalizer: the mini-batch denominator share (see ``ppo.global_loss_normalizer``).

    Returns:
        The loss, and detached scalars ``{"surrogate": ..., "<name>_weighted": coef × term}``
        aggregated over this micro-batch alone (``mode`` with the micro-batch's own
        denominator): their token-weighted mean over the micro-batches of a mini-batch is the
        mini-batch's term for ``token-mean``, so a regularizer's size reads directly against the
        surrogate's.
    """
    pg_mask = mask
    detach: Tensor | None = None
    for _, out in outputs:
        if out.pg_weight is not None:
            pg_mask = pg_mask * out.pg_weight.to(pg_mask.dtype)
        if out.pg_detach is not None:
            detach = out.pg_detach if detach is None else (detach | out.pg_detach)
    if detach is not None:
        surrogate = torch.where(detach, surrogate.detach(), surrogate)
    pg_normalizer = normalizer
    if pg_mask is not mask and mode == "token-mean":
        kept = pg_mask.sum() / mask.sum().clamp_min(1e-12)
        pg_normalizer = (normalizer * kept).clamp_min(1e-12)
    loss = aggregate_loss(surrogate, pg_mask, mode, normalizer=pg_normalizer)
    with torch.no_grad():
        terms = {"surrogate": aggregate_loss(surrogate.detach(), pg_mask, mode).float()}
    for reg, out in outputs:
        if out.loss is not None:
            coef = getattr(reg, "coef", None)
            if coef is None:
                raise TypeError(f"{reg!r} returned a loss but has no `coef` (the weight of its loss term)")
            loss = loss + coef * aggregate_loss(out.loss, mask, mode, normalizer=normalizer)
            with torch.no_grad():
                terms[f"{reg.name}_weighted"] = coef * aggregate_loss(out.loss.detach(), mask, mode).float()
    return loss, terms


def policy_loss(
    model: ActorCritic,
    micro: Experience,
    regularizers: Sequence[Regularizer],
    cfg: PPOConfig,
    temperature: float,
    normalizer: Tensor,
    stats: RunningMeans,
    weight: float,
    invalid: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The micro-batch's share of the mini-batch policy loss, and the hidden states a shared
    value head reads (None with a separate critic). Diagnostics go to ``stats`` with ``weight``
    (the micro-batch's valid tokens); with ``invalid`` (a (V,) bool mask of the task's
    invalid tokens) also the invalid mass per step and per sequence (:func:`invalid_mass`).

    The logits are divided by the rollout ``temperature``, as the behaviour
    log-probs were: the ratio compares the same distribution that sampled.
    """
    mask = micro.response_mask.float()
    logits, hidden = model.policy_logits(micro.input_ids, micro.attention_mask, micro.response_ids.shape[1],
                                         temperature)
    log_probs = log_probs_from_logits(logits, micro.response_ids)
    pg = clipped_policy_loss(
        log_probs,
        micro.old_log_probs,
        micro.advantages,
        mask,
        clip_ratio_low=cfg.clip_ratio_low,
        clip_ratio_high=cfg.clip_ratio_high,
        dual_clip=cfg.dual_clip,
    )
    ctx = PolicyContext(
        logits=logits,
        log_probs=log_probs,
        old_log_probs=micro.old_log_probs,
        advantages=micro.advantages,
        mask=mask,
        clipped=pg.clipped,
    )
    outputs = [(reg, reg(ctx)) for reg in regularizers]
    loss, terms = compose_policy_loss(pg.per_token, mask, outputs, cfg.loss_aggregation, normalizer)

    with torch.no_grad():
        p_max, entropy = token_stats(logits.detach())
        stats.add("policy/p_max", masked_mean(p_max.float(), mask), weight)
        stats.add("policy/entropy", masked_mean(entropy.float(), mask), weight)
        stats.add("policy/clipfrac", pg.clipfrac, weight)
        stats.add("policy/clipfrac_lower", pg.clipfrac_lower, weight)
        stats.add("policy/approx_kl", pg.approx_kl, weight)
        for name, value in terms.items():
            stats.add(f"policy/{name}", value, weight)
        for _, out in outputs:
            for name, value in out.metrics.items():
                stats.add(name if "/" in name else f"policy/{name}", value, weight)
        if invalid is not None:
            step_mass, seq_mass = invalid_mass(logits.detach(), invalid, mask)
            stats.add("policy/invalid_mass", step_mass, weight)
            stats.add("policy/invalid_seq_mass", seq_mass, float(micro.response_mask.shape[0]))
    return loss, hidden


def invalid_mass(logits: Tensor, invalid: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Probability mass on invalid tokens: per step and per sequence.

    Args:
        logits: (B, T, V) (already divided by the temperature).
        invalid: (V,) bool, True on the task's invalid tokens.
        mask: (B, T) 1 on valid response tokens.

    Returns:
        (token mean of ε_t = Σ_{a invalid} π(a|s_t), sequence mean of
        1 − Π_t (1 − ε_t)): the mean per-step leak, and the probability that a
        sequence sampled along these states emits at least one invalid token.
    """
    if invalid.shape != logits.shape[-1:]:
        raise ValueError(f"invalid_mass: the invalid-token mask has {tuple(invalid.shape)} entries, the logits "
                         f"{logits.shape[-1]} (the task's tokenizer and the model's vocabulary must match)")
    log_p = torch.log_softmax(logits.float(), dim=-1)
    eps = torch.logsumexp(log_p.masked_fill(~invalid.to(log_p.device), float("-inf")), dim=-1).exp()
    eps = eps.clamp(0.0, 1.0)
    step = masked_mean(eps, mask)
    log_keep = (torch.log1p(-eps.clamp(max=1.0 - 1e-7)) * mask).sum(dim=-1)
    seq = (-torch.expm1(log_keep)).mean()
    return step, seq
