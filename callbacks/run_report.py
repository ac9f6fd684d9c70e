"""RunReport: at the end of ``fit``, the before → after table, a tidy metrics CSV
and a PNG of reward / Pass@1 / P̄max against PPO iterations.

"Before" is a validation at step 0: run ``trainer.validate(module)`` before
``trainer.fit`` (``tre-train`` does when ``validate_first=true``, the default)
on the same Trainer, so that this callback sees it. "After" is the last
validation of the run; schedule one on the final iteration (``max_steps`` a
multiple of ``val_check_interval``).

Files (rank 0 only): ``<folder>/metrics.csv`` (one row per PPO iteration:
step, reward, p_max, entropy, val_score), ``<folder>/curves.png`` and
``<folder>/summary.json``, with ``folder`` = ``<trainer.default_root_dir>/report``
unless given. ``tre-plot`` reads them back to overlay runs of a sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from tre_lightning.checks import ArgumentError, boolean

from tre_lightning.callbacks._common import step_metrics

__all__ = ["RunReport"]


class RunReport(Callback):
    """Record the run's curves; write and print the report when ``fit`` ends.

    Args:
        folder: where to write; None = ``<trainer.default_root_dir>/report``.
        val_keys: validation metrics to look for, first found wins
            (Pass@1 for binary tasks, else the mean validation reward).
        print_table: print the before → after table at the end of fit.

    Attributes:
        history: the recorded :class:`~tre_lightning.evaluation.report.RunHistory`.
        summary: the written summary (after ``fit``), including file paths.
    """

    def __init__(
        self,
        folder: str | None = None,
        val_keys: tuple[str, ...] | list[str] = ("val/pass@1", "val/reward"),
        print_table: bool = True,
    ) -> None:
        from tre_lightning.evaluation.report import RunHistory

        if isinstance(val_keys, str) or not val_keys or not all(isinstance(k, str) and k for k in val_keys):
            raise ArgumentError("val_keys", "a non-empty list of metric names", val_keys)
        boolean("print_table", print_table)
        self.folder = folder
        self.val_keys = tuple(val_keys)
        self.print_table = print_table
        self.history = RunHistory()
        self.summary: dict[str, Any] | None = None

    def _describe(self, pl_module: LightningModule) -> None:
        meta = self.history.meta
        task = getattr(pl_module, "task", None)
        if task is not None:
            meta["task"] = getattr(task, "name", type(task).__name__)
        regs = getattr(pl_module, "regularizers", None)
        if regs is not None:
            meta["regularizers"] = "+".join(type(r).__name__ for r in regs) or "none (vanilla PPO)"
        if getattr(pl_module, "seed", None) is not None:
            meta["seed"] = int(pl_module.seed)
        ev = getattr(pl_module, "evaluation", None)
        if ev is not None:
            meta["eval"] = f"val n={ev.n}, T={ev.temperature:g}, top-p={ev.top_p:g}"

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = step_metrics(outputs)
        if not metrics:
            return
        self.history.add_train(
            trainer.global_step,
            reward=metrics.get("reward/mean"),
            p_max=metrics.get("policy/p_max"),
            entropy=metrics.get("policy/entropy"),
        )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key in self.val_keys:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.history.val_metric = key
                self.history.add_val(trainer.global_step, float(value))
                return

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from tre_lightning.evaluation.report import REPORT_DIR, write_run_report

        if not trainer.is_global_zero:
            return
        self._describe(pl_module)
        folder = Path(self.folder) if self.folder else Path(trainer.default_root_dir) / REPORT_DIR
        self.summary = write_run_report(self.history, folder, print_table=self.print_table)
        if self.print_table and self.summary.get("before") is None:
            print("  (no validation before training was recorded: run trainer.validate(module) before fit, "
                  "or tre-train validate_first=true)", flush=True)

    def state_dict(self) -> dict[str, Any]:
        h = self.history
        return {"train": h.train, "val": h.val, "val_metric": h.val_metric}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.train = {int(k): dict(v) for k, v in state_dict.get("train", {}).items()}
        self.history.val = {int(k): float(v) for k, v in state_dict.get("val", {}).items()}
        self.history.val_metric = state_dict.get("val_metric", self.history.val_metric)
