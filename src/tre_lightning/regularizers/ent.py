"""Ent: the global entropy bonus (paper Eq. 4-6)."""

from __future__ import annotations

from typing import ClassVar

import torch

from tre_lightning.regularizers import functional as F
from tre_lightning.regularizers._utils import check_coef, check_positive_int, make_repr, masked_mean
from tre_lightning.regularizers.base import PolicyContext, RegularizerOutput


class Ent:
    """Entropy bonus over the whole vocabulary: L_t = -H(pi(. | s_t)) (Eq. 5).

    The module adds ``coef * aggregate(-H)``; α = 0.001 in the paper's Table 1.
    The entropy kernel is chunked with an analytic backward
    (:func:`~tre_lightning.regularizers.functional.entropy`).

    Args:
        coef: α >= 0; 0 gives vanilla PPO (nothing is computed).
        chunk_size: rows per kernel chunk (None: automatic).

    Metrics: ``policy/ent_entropy`` (token mean of H over valid tokens).
    """

    name: ClassVar[str] = "ent"
    coef: float

    def __init__(self, coef: float = 0.001, chunk_size: int | None = None) -> None:
        self.coef = check_coef(coef)
        self.chunk_size = check_positive_int(chunk_size, name="chunk_size")

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        if self.coef == 0.0:
            return RegularizerOutput()
        h = F.entropy(ctx.logits, chunk_size=self.chunk_size)
        loss = torch.where(ctx.mask > 0, -h, 0.0)
        return RegularizerOutput(loss=loss, metrics={"policy/ent_entropy": masked_mean(h, ctx.mask)})

    def __repr__(self) -> str:
        return make_repr(self, "coef", "chunk_size")
