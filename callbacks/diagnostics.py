"""Training diagnostics: everything the PPO iteration measured, logged every step.

Names (see docs/training.md): ``policy/`` entropy, clipfrac, clipfrac_lower,
approx_kl and every regularizer's metrics (e.g. the TRE trust-region size);
``value/`` loss, clipfrac, explained_variance, mean, returns_mean;
``reward/`` mean, std, min, max and the step's reward failure counts:
failures, score_errors, score_timeouts, invalid (responses scored 0 because
``task.score`` raised, overran ``rollout.score_timeout`` or returned bad
values; see :mod:`tre_lightning.tasks.guard`), grader_timeouts, grader_errors
(the task's own checks cut by their time limit or raising), decode_failures
(responses whose ids could not be decoded, scored as ""); ``train/`` policy_loss, value_loss,
grad_norm_actor, grad_norm_critic, grad_norm_actor_max, response_length,
response_length_max, response_clip_ratio, prompt_length, truncated_prompts,
advantages_mean, ref_kl, nonfinite_skips; ``perf/`` rollout_tokens_per_s,
train_tokens_per_s, rollout_s, train_s. ``policy/p_max`` is left to
:class:`~tre_lightning.callbacks.pmax.PMaxMonitor` when that callback is present.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from tre_lightning.callbacks._common import step_metrics

__all__ = ["TrainingDiagnostics"]


class TrainingDiagnostics(Callback):
    """Log the step's diagnostics under their names.

    Args:
        prog_bar: names shown in the progress bar (default: the mean reward).
        exclude: names not logged (besides ``policy/p_max`` when a
            :class:`PMaxMonitor` logs it).
    """

    def __init__(self, prog_bar: Sequence[str] = ("reward/mean",), exclude: Sequence[str] = ()) -> None:
        self.prog_bar = set(prog_bar)
        self.exclude = set(exclude)
        self._skip: set[str] = set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from tre_lightning.callbacks.pmax import PMaxMonitor

        self._skip = set(self.exclude)
        if any(isinstance(cb, PMaxMonitor) for cb in trainer.callbacks):
            self._skip.add("policy/p_max")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for name, value in step_metrics(outputs).items():
            if name in self._skip:
                continue
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name in self.prog_bar, batch_size=1)
