"""Ent: the global entropy bonus (paper Eq. 4-6)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from tre_lightning.regularizers import functional as F
from tre_lightning.regularizers._utils import EntropyLikeBonus


class Ent(EntropyLikeBonus):
    """Entropy bonus over the whole vocabulary: L_t = -H(pi(. | s_t)) (Eq. 5).

    The module adds ``coef * aggregate(-H)``; α = 0.001 in the paper's Table 1.
    The entropy kernel is chunked with an analytic backward
    (:func:`~tre_lightning.regularizers.functional.entropy`).

    Args:
        coef: α >= 0; 0 gives vanilla PPO (nothing is computed).
        chunk_size: rows per kernel chunk (None: automatic).

    Metrics: ``policy/ent_entropy`` (token mean of H over valid tokens).
    """

    name = "ent"
    metric: ClassVar[str] = "policy/ent_entropy"

    def measure(self, logits: Tensor) -> Tensor:
        return F.entropy(logits, chunk_size=self.chunk_size)
