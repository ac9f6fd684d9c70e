"""Forking-Tokens: the surrogate only on the highest-entropy tokens (Wang et al. 2025)."""

from __future__ import annotations

from typing import ClassVar

import torch

from tre_lightning.regularizers import functional as F
from tre_lightning.regularizers._utils import (
    check_coef,
    check_fraction,
    check_positive_int,
    make_repr,
    select_top_fraction,
)
from tre_lightning.regularizers.base import PolicyContext, RegularizerOutput


class ForkingTokens:
    """Keep the PPO surrogate only on the top ``top_fraction`` of valid tokens by entropy.

    The selection is the top ceil(N * top_fraction) valid tokens of the
    micro-batch by current-policy entropy (detached; ties broken by
    ``torch.topk``), as in the reference, which selects per micro-batch and
    per device. The output is a surrogate weight: the module multiplies the
    surrogate's token mask by it, so the surrogate is averaged over the
    selected tokens only (token-mean denominator = number selected).

    ``coef`` interpolates: weight = 1 - coef + coef * selected, so 1 is the
    method (paper: γ = 20 %), 0 is vanilla PPO, 0.5 keeps unselected tokens
    at half weight.

    Args:
        coef: in [0, 1].
        top_fraction: fraction of valid tokens kept, in (0, 1].
        chunk_size: rows per entropy chunk (None: automatic).

    Metrics: ``policy/forking_frac`` (selected / valid),
    ``policy/forking_entropy_min`` (entropy threshold: smallest selected H).
    """

    name: ClassVar[str] = "forking"
    coef: float

    def __init__(self, coef: float = 1.0, top_fraction: float = 0.2, chunk_size: int | None = None) -> None:
        self.coef = check_coef(coef, upper=1.0)
        self.top_fraction = check_fraction(top_fraction, name="top_fraction")
        self.chunk_size = check_positive_int(chunk_size, name="chunk_size")

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        if self.coef == 0.0:
            return RegularizerOutput()
        _, h = F.token_stats(ctx.logits, chunk_size=self.chunk_size)
        selected, k = select_top_fraction(h, ctx.mask, self.top_fraction, "ceil")
        sel = selected.to(h.dtype)
        weight = sel if self.coef == 1.0 else (1.0 - self.coef) + self.coef * sel
        n_valid = (ctx.mask > 0).sum().clamp(min=1)
        h_min = h[selected].min() if k > 0 else h.new_zeros(())
        metrics = {
            "policy/forking_frac": torch.as_tensor(k, dtype=torch.float32, device=h.device) / n_valid,
            "policy/forking_entropy_min": h_min.float(),
        }
        return RegularizerOutput(pg_weight=weight, metrics=metrics)

    def __repr__(self) -> str:
        return make_repr(self, "coef", "top_fraction", "chunk_size")
