"""Clip-Cov: stop the surrogate's gradient on a few high-covariance tokens (Cui et al. 2025)."""

from __future__ import annotations

from typing import ClassVar

import torch

from tre_lightning.regularizers._utils import (
    check_coef,
    check_fraction,
    count_for_fraction,
    make_repr,
    token_covariance,
)
from tre_lightning.regularizers.base import PolicyContext, RegularizerOutput


class ClipCov:
    """Detach the surrogate on a random few tokens with cov in (cov_lower, cov_upper).

    As in the reference code: cov_i = (A_i - mean A)(log pi_i - mean log pi)
    over the valid tokens (detached); candidates are valid tokens that the
    PPO clip does not already clip (-A r_clipped > -A r is false, with the
    context's ε_low / ε_high) and whose cov lies strictly between the
    bounds; max(1, int(N * clip_fraction)) of them, drawn uniformly at
    random, get their surrogate gradient stopped (``pg_detach``). They still
    count in the surrogate's denominator.

    ``coef`` in [0, 1] is the probability that a drawn token is actually
    detached: 1 is the method, 0 vanilla PPO, and in between the expected
    gradient on drawn tokens is (1 - coef) times their surrogate gradient.

    Args:
        coef: in [0, 1].
        clip_fraction: in (0, 1]; 0.0002 in the reference.
        cov_lower, cov_upper: open covariance window, lower < upper
            (1 and 5 in the reference).
        seed: None uses torch's global RNG; an int makes the draws
            reproducible (seed + call count).

    Metrics: ``policy/clipcov_detached`` (tokens detached),
    ``policy/clipcov_candidates`` (tokens in the window).
    """

    name: ClassVar[str] = "clip_cov"
    coef: float

    def __init__(
        self,
        coef: float = 1.0,
        clip_fraction: float = 0.0002,
        cov_lower: float = 1.0,
        cov_upper: float = 5.0,
        seed: int | None = None,
    ) -> None:
        self.coef = check_coef(coef, upper=1.0)
        self.clip_fraction = check_fraction(clip_fraction, name="clip_fraction")
        for nm, v in (("cov_lower", cov_lower), ("cov_upper", cov_upper)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{nm} must be a real number, got {v!r}")
        if not cov_lower < cov_upper:
            raise ValueError(f"cov_lower must be < cov_upper, got {cov_lower!r} >= {cov_upper!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.cov_lower = float(cov_lower)
        self.cov_upper = float(cov_upper)
        self.seed = seed
        self._calls = 0

    def _generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        self._calls += 1
        return torch.Generator().manual_seed(self.seed + self._calls - 1)

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        if self.coef == 0.0:
            return RegularizerOutput()
        valid = ctx.mask > 0
        dev = ctx.log_probs.device
        with torch.no_grad():
            dt = torch.promote_types(ctx.log_probs.dtype, torch.float32)
            log_ratio = (ctx.log_probs.detach() - ctx.old_log_probs).to(dt).clamp(-20.0, 20.0)
            ratio = log_ratio.exp()
            adv = ctx.advantages.to(dt)
            pg1 = -adv * ratio
            pg2 = -adv * ratio.clamp(1.0 - ctx.clip_ratio_low, 1.0 + ctx.clip_ratio_high)
            clipped = pg2 > pg1
            cov = token_covariance(ctx.advantages, ctx.log_probs, ctx.mask)
            cand = valid & ~clipped & (cov > self.cov_lower) & (cov < self.cov_upper)
            cand_idx = cand.reshape(-1).nonzero().squeeze(1)
            k = count_for_fraction(int(valid.sum()), self.clip_fraction, "floor")
            gen = self._generator()
            perm = torch.randperm(cand_idx.numel(), generator=gen).to(dev)
            chosen = cand_idx[perm[: min(k, cand_idx.numel())]]
            if 0.0 < self.coef < 1.0 and chosen.numel():
                keep = torch.rand(chosen.numel(), generator=gen).to(dev) < self.coef
                chosen = chosen[keep]
            detach = torch.zeros_like(valid)
            detach.view(-1)[chosen] = True
        metrics = {
            "policy/clipcov_detached": torch.as_tensor(float(chosen.numel()), device=dev),
            "policy/clipcov_candidates": torch.as_tensor(float(cand_idx.numel()), device=dev),
        }
        return RegularizerOutput(pg_detach=detach, metrics=metrics)

    def __repr__(self) -> str:
        return make_repr(self, "coef", "clip_fraction", "cov_lower", "cov_upper", "seed")
