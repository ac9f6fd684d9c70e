"""Min-Ent: the min-entropy bonus, the K = 1 boundary of TRE-K (paper section 7.3)."""

from __future__ import annotations

from typing import ClassVar

import torch

from tre_lightning.regularizers import functional as F
from tre_lightning.regularizers._utils import check_coef, check_positive_int, make_repr, masked_mean
from tre_lightning.regularizers.base import PolicyContext, RegularizerOutput


class MinEnt:
    """Min-entropy bonus: L_t = -H_inf, H_inf = -log max_a pi(a | s_t).

    The objective is L_surr - α H_inf (section 7.3), α = 0.001 in the paper.
    Its gradient, p - onehot(argmax), lowers the top token and raises all
    others in proportion to their probability.

    Args:
        coef: α >= 0; 0 gives vanilla PPO.
        chunk_size: rows per kernel chunk (None: automatic).

    Metrics: ``policy/min_entropy`` (token mean of H_inf).
    """

    name: ClassVar[str] = "min_ent"
    coef: float

    def __init__(self, coef: float = 0.001, chunk_size: int | None = None) -> None:
        self.coef = check_coef(coef)
        self.chunk_size = check_positive_int(chunk_size, name="chunk_size")

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        if self.coef == 0.0:
            return RegularizerOutput()
        h = F.min_entropy(ctx.logits, chunk_size=self.chunk_size)
        loss = torch.where(ctx.mask > 0, -h, 0.0)
        return RegularizerOutput(loss=loss, metrics={"policy/min_entropy": masked_mean(h, ctx.mask)})

    def __repr__(self) -> str:
        return make_repr(self, "coef", "chunk_size")
