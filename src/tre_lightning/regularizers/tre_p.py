"""TRE-P: entropy inside the nucleus trust region (paper Eq. 7-9, Algorithm 1)."""

from __future__ import annotations

from typing import ClassVar

import torch

from tre_lightning.regularizers import functional as F
from tre_lightning.regularizers._utils import (
    check_coef,
    check_positive_int,
    make_repr,
    masked_max,
    masked_mean,
)
from tre_lightning.regularizers.base import PolicyContext, RegularizerOutput


class TREP:
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

    name: ClassVar[str] = "tre_p"
    coef: float

    def __init__(
        self,
        coef: float = 0.001,
        top_p: float = 0.99,
        max_region: int | None = None,
        chunk_size: int | None = None,
    ) -> None:
        self.coef = check_coef(coef)
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        self.top_p = float(top_p)
        self.max_region = check_positive_int(max_region, name="max_region")
        self.chunk_size = check_positive_int(chunk_size, name="chunk_size")

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        if self.coef == 0.0:
            return RegularizerOutput()
        tre = F.trust_region_entropy(
            ctx.logits, top_p=self.top_p, max_region=self.max_region, chunk_size=self.chunk_size
        )
        loss = torch.where(ctx.mask > 0, -tre.value, 0.0)
        metrics = {
            "policy/tre_p_entropy": masked_mean(tre.value, ctx.mask),
            "policy/tr_size": masked_mean(tre.region_size, ctx.mask),
            "policy/tr_size_max": masked_max(tre.region_size, ctx.mask),
        }
        return RegularizerOutput(loss=loss, metrics=metrics)

    def __repr__(self) -> str:
        return make_repr(self, "coef", "top_p", "max_region", "chunk_size")
