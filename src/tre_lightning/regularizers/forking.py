"""Forking-Tokens: the surrogate only on the highest-entropy tokens (Wang et al. 2025)."""

from __future__ import annotations

import torch

from tre_lightning import checks
from tre_lightning.regularizers import functional as F
from tre_lightning.regularizers._utils import make_repr, select_top_fraction
from tre_lightning.regularizers.base import PolicyContext, Regularizer, RegularizerOutput


class ForkingTokens(Regularizer):
    """Keep the PPO surrogate only on the top ``top_fraction`` of valid tokens by entropy.

    The selection is the top ceil(N * top_fraction) valid tokens of the
    micro-batch by current-policy entropy (detached; ties broken by
    ``torch.topk``), as in the reference, which selects per micro-batch and
    per device. The output is a surrogate weight: the module multiplies the
    surrogate's token mask by it, so the surrogate is averaged over the
    selected tokens only (token-mean denominator = number selected).

    ``unselected_weight`` is the surrogate weight of the tokens not selected:
    weight = selected + unselected_weight * (1 - selected). 0 is the method
    (paper: γ = 20 %), 1 is vanilla PPO (nothing is computed), 0.5 keeps the
    unselected tokens at half weight. There is no ``coef``: the regularizer
    adds no loss term.

    Args:
        top_fraction: fraction of valid tokens kept, in (0, 1].
        unselected_weight: surrogate weight of the other tokens, in [0, 1].
        chunk_size: rows per entropy chunk (None: automatic).

    Metrics: ``policy/forking_frac`` (selected / valid),
    ``policy/forking_entropy_min`` (entropy threshold: smallest selected H).
    """

    name = "forking"

    def __init__(
        self, top_fraction: float = 0.2, unselected_weight: float = 0.0, chunk_size: int | None = None
    ) -> None:
        self.top_fraction = checks.real("top_fraction", top_fraction, 0.0, 1.0, low_open=True)
        self.unselected_weight = checks.real("unselected_weight", unselected_weight, 0.0, 1.0)
        self.chunk_size = checks.optional(checks.integer, "chunk_size", chunk_size, 1)

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        w = self.unselected_weight
        if w == 1.0:
            return RegularizerOutput()
        _, h = F.token_stats(ctx.logits, chunk_size=self.chunk_size)
        selected, k = select_top_fraction(h, ctx.mask, self.top_fraction, "ceil")
        sel = selected.to(h.dtype)
        weight = sel if w == 0.0 else w + (1.0 - w) * sel
        n_valid = (ctx.mask > 0).sum().clamp(min=1)
        h_min = h[selected].min() if k > 0 else h.new_zeros(())
        metrics = {
            "policy/forking_frac": torch.as_tensor(k, dtype=torch.float32, device=h.device) / n_valid,
            "policy/forking_entropy_min": h_min.float(),
        }
        return RegularizerOutput(pg_weight=weight, metrics=metrics)

    def __repr__(self) -> str:
        return make_repr(self, "top_fraction", "unselected_weight", "chunk_size")
