"""TRE-P: entropy inside the nucleus trust region (paper Eq. 7-9, Algorithm 1)."""

from __future__ import annotations

import torch

from tre_lightning import checks
from tre_lightning.ppo.masked import masked_max, masked_mean
from tre_lightning.regularizers import functional as F
from tre_lightning.regularizers._utils import make_repr
from tre_lightning.regularizers.base import PolicyContext, Regularizer, RegularizerOutput


class TREP(Regularizer):
    """Trust Region Entropy with a nucleus region: the smallest set reaching P.

    L_t = -log|V| / log|TR| * H(softmax(z[TR])), and exactly 0 where
    |TR| = 1 (Eq. 9). P = 0.99 and α = 0.001 in the paper. The nucleus is
    exact (Algorithm 1 has no cap); ``max_region=256`` reproduces the cap of
    the authors' code. ``top_p = 1`` makes the region the whole support.

    Args:
        coef: α >= 0; 0 gives vanilla PPO.
        top_p: P in (0, 1].
        max_region: optional cap on |TR| (int >= 1); None = exact nucleus.
        chunk_size: rows per kernel chunk (None: automatic).

    Metrics: ``policy/tre_p_entropy`` (token mean of the scaled local
    entropy), ``policy/tr_size`` (token mean of |TR|), ``policy/tr_size_max``.
    """

    name = "tre_p"
    coef: float

    def __init__(
        self,
        coef: float = 0.001,
        top_p: float = 0.99,
        max_region: int | None = None,
        chunk_size: int | None = None,
    ) -> None:
        self.coef = checks.real("coef", coef, 0.0)
        self.top_p = checks.real("top_p", top_p, 0.0, 1.0, low_open=True)
        self.max_region = checks.optional(checks.integer, "max_region", max_region, 1)
        self.chunk_size = checks.optional(checks.integer, "chunk_size", chunk_size, 1)

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        if self.coef == 0.0:
            return RegularizerOutput()
        tre = F.trust_region_entropy(
            ctx.logits, top_p=self.top_p, max_region=self.max_region, chunk_size=self.chunk_size
        )
        loss = torch.where(ctx.mask > 0, -tre.value, 0.0)
        size = tre.region_size.float()
        metrics = {
            "policy/tre_p_entropy": masked_mean(tre.value.detach().float(), ctx.mask),
            "policy/tr_size": masked_mean(size, ctx.mask),
            "policy/tr_size_max": masked_max(size, ctx.mask),
        }
        return RegularizerOutput(loss=loss, metrics=metrics)

    def __repr__(self) -> str:
        return make_repr(self, "coef", "top_p", "max_region", "chunk_size")
