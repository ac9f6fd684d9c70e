"""P̄max monitor (paper Eq. 11): the policy's average peak probability.

``P̄max = E_{s_t}[max_a π_θ(a | s_t)]`` is the token-mean over the valid
response tokens of the top-1 probability, measured on the training forward
pass (the policy-loss pass of each PPO iteration, as in the authors' code).
A value near 1 means the policy has become nearly deterministic. The module
computes it; this callback logs it as ``policy/p_max`` every step (shown in
the progress bar) and keeps the history.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from tre_lightning.callbacks._common import step_metrics

__all__ = ["PMaxMonitor"]


class PMaxMonitor(Callback):
    """Log ``policy/p_max`` after every training step.

    Args:
        prog_bar: show it in the progress bar.
        key: the metric name (default ``policy/p_max``).

    Attributes:
        history: ``(global_step, p_max)`` of every step seen (rank-local).
    """

    def __init__(self, prog_bar: bool = True, key: str = "policy/p_max") -> None:
        if not isinstance(prog_bar, bool):
            raise ValueError(f"prog_bar must be true or false, got {prog_bar!r}")
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"key must be a non-empty metric name, got {key!r}")
        self.prog_bar = prog_bar
        self.key = key
        self.history: list[tuple[int, float]] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        value = step_metrics(outputs).get("policy/p_max")
        if value is None:
            return
        self.history.append((trainer.global_step, value))
        pl_module.log(self.key, value, on_step=True, on_epoch=False, prog_bar=self.prog_bar, batch_size=1)
