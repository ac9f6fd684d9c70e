"""TRE-K: entropy inside the top-K trust region (paper Eq. 7-9, Algorithm 1)."""

from __future__ import annotations

import torch

from tre_lightning import checks
from tre_lightning.ppo.masked import masked_mean
from tre_lightning.regularizers import functional as F
from tre_lightning.regularizers._utils import make_repr
from tre_lightning.regularizers.base import PolicyContext, Regularizer, RegularizerOutput


class TREK(Regularizer):
    """Trust Region Entropy with a size-based region: the K largest logits.

    L_t = -log|V| / log K * H(softmax(z[top K])) (Eq. 9); the gradient reaches
    only the top-K logits. K = 2 and α = 0.001 in the paper. K = 1 gives a
    zero term (a one-token region has no entropy); the K = 1 boundary of the
    paper is :class:`~tre_lightning.regularizers.MinEnt`. Where V <= K the
    region is the whole vocabulary and the term is the plain entropy; where
    fewer than K logits are finite (masked vocabulary) the region is the
    finite ones and the scale uses their count.

    Args:
        coef: α >= 0; 0 gives vanilla PPO.
        top_k: K >= 1.
        chunk_size: rows per kernel chunk (None: automatic).

    Metrics: ``policy/tre_k_entropy`` (token mean of the scaled local entropy).
    """

    name = "tre_k"
    coef: float

    def __init__(self, coef: float = 0.001, top_k: int = 2, chunk_size: int | None = None) -> None:
        self.coef = checks.real("coef", coef, 0.0)
        self.top_k = checks.integer("top_k", top_k, 1)
        self.chunk_size = checks.optional(checks.integer, "chunk_size", chunk_size, 1)

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        if self.coef == 0.0:
            return RegularizerOutput()
        tre = F.trust_region_entropy(
            ctx.logits, top_k=self.top_k, chunk_size=self.chunk_size, with_peak=False
        )
        loss = torch.where(ctx.mask > 0, -tre.value, 0.0)
        metrics = {"policy/tre_k_entropy": masked_mean(tre.value.detach().float(), ctx.mask)}
        return RegularizerOutput(loss=loss, metrics=metrics)

    def __repr__(self) -> str:
        return make_repr(self, "coef", "top_k", "chunk_size")
