"""Clip-Cov: stop the surrogate's gradient on a few high-covariance tokens (Cui et al. 2025)."""

from __future__ import annotations

import torch

from tre_lightning import checks
from tre_lightning.regularizers._utils import count_for_fraction, make_repr, token_covariance
from tre_lightning.regularizers.base import PolicyContext, Regularizer, RegularizerOutput


class ClipCov(Regularizer):
    """Detach the surrogate on a random few tokens with cov in (cov_lower, cov_upper).

    As in the reference code: cov_i = (A_i - mean A)(log pi_i - mean log pi)
    over the valid tokens (detached); candidates are valid tokens that the
    PPO clip does not already clip (``ctx.clipped`` is False: the
    surrogate's own clip mask) and whose cov lies strictly between the
    bounds; max(1, int(N * clip_fraction)) of them, drawn uniformly at
    random, get their surrogate gradient stopped (``pg_detach``). They still
    count in the surrogate's denominator.

    ``detach_prob`` in [0, 1] is the probability that a drawn token is
    actually detached: 1 is the method, 0 vanilla PPO (nothing is computed),
    and in between the expected gradient on drawn tokens is
    (1 - detach_prob) times their surrogate gradient. There is no ``coef``:
    the regularizer adds no loss term.

    Args:
        clip_fraction: in (0, 1]; 0.0002 in the reference.
        cov_lower, cov_upper: open covariance window, finite,
            cov_lower < cov_upper (1 and 5 in the reference).
        detach_prob: in [0, 1].
        seed: None uses torch's global RNG; an int makes the draws
            reproducible (seed + call count).

    Metrics: ``policy/clipcov_detached`` (tokens detached),
    ``policy/clipcov_candidates`` (tokens in the window).
    """

    name = "clip_cov"

    def __init__(
        self,
        clip_fraction: float = 0.0002,
        cov_lower: float = 1.0,
        cov_upper: float = 5.0,
        detach_prob: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self.clip_fraction = checks.real("clip_fraction", clip_fraction, 0.0, 1.0, low_open=True)
        self.cov_lower = checks.real("cov_lower", cov_lower)
        self.cov_upper = checks.real("cov_upper", cov_upper)
        if not self.cov_lower < self.cov_upper:
            raise checks.ArgumentError("cov_lower", f"< cov_upper ({self.cov_upper:g})", cov_lower)
        self.detach_prob = checks.real("detach_prob", detach_prob, 0.0, 1.0)
        self.seed = checks.optional(checks.integer, "seed", seed)
        self._calls = 0

    def _generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        self._calls += 1
        return torch.Generator().manual_seed(self.seed + self._calls - 1)

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        if self.detach_prob == 0.0:
            return RegularizerOutput()
        valid = ctx.mask > 0
        dev = ctx.log_probs.device
        with torch.no_grad():
            cov = token_covariance(ctx.advantages, ctx.log_probs, ctx.mask)
            cand = valid & ~ctx.clipped & (cov > self.cov_lower) & (cov < self.cov_upper)
            cand_idx = cand.reshape(-1).nonzero().squeeze(1)
            k = count_for_fraction(int(valid.sum()), self.clip_fraction, "floor")
            gen = self._generator()
            perm = torch.randperm(cand_idx.numel(), generator=gen).to(dev)
            chosen = cand_idx[perm[: min(k, cand_idx.numel())]]
            if 0.0 < self.detach_prob < 1.0 and chosen.numel():
                keep = torch.rand(chosen.numel(), generator=gen).to(dev) < self.detach_prob
                chosen = chosen[keep]
            detach = torch.zeros_like(valid)
            detach.view(-1)[chosen] = True
        metrics = {
            "policy/clipcov_detached": torch.as_tensor(float(chosen.numel()), device=dev),
            "policy/clipcov_candidates": torch.as_tensor(float(cand_idx.numel()), device=dev),
        }
        return RegularizerOutput(pg_detach=detach, metrics=metrics)

    def __repr__(self) -> str:
        return make_repr(self, "clip_fraction", "cov_lower", "cov_upper", "detach_prob", "seed")
