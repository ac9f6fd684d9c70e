"""Min-Ent: the min-entropy bonus, the K = 1 boundary of TRE-K (paper section 7.3)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from tre_lightning.regularizers import functional as F
from tre_lightning.regularizers._utils import EntropyLikeBonus


class MinEnt(EntropyLikeBonus):
    """Min-entropy bonus: L_t = -H_inf, H_inf = -log max_a pi(a | s_t).

    The objective is L_surr - α H_inf (section 7.3), α = 0.001 in the paper.
    Its gradient, p - onehot(argmax), lowers the top token and raises all
    others in proportion to their probability.

    Args:
        coef: α >= 0; 0 gives vanilla PPO.
        chunk_size: rows per kernel chunk (None: automatic).

    Metrics: ``policy/min_entropy`` (token mean of H_inf).
    """

    name = "min_ent"
    metric: ClassVar[str] = "policy/min_entropy"

    def measure(self, logits: Tensor) -> Tensor:
        return F.min_entropy(logits, chunk_size=self.chunk_size)
