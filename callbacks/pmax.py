"""P̄max monitor (paper Eq. 11): the policy's average peak probability.

``P̄max = E_{s_t}[max_a π_θ(a | s_t)]`` is the token-mean over the valid
response tokens of the top-1 probability, measured on the training forward
pass (the policy-loss pass of each PPO iteration, as in the authors' code).
A value near 1 means the policy has become nearly deterministic. The module
computes and logs it (``policy/p_max``, shown in the progress bar); this
callback keeps its history, e.g. for a notebook's plot.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from tre_lightning.callbacks._common import step_metrics

__all__ = ["PMaxMonitor"]


class PMaxMonitor(Callback):
    """Record ``policy/p_max`` after every training step.

    Attributes:
        history: ``(global_step, p_max)`` of every step seen (rank-local).
    """

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        value = step_metrics(outputs).get("policy/p_max")
        if value is not None:
            self.history.append((trainer.global_step, value))
