"""Sample logger: prompt / response / reward rows every N training steps.

Rows go to ``samples.csv`` in the run's log folder (columns: step, prompt,
response, reward) and to the active logger when it can show text
(TensorBoard: ``add_text``; Weights & Biases: ``log_text``). Written on the
global-zero process only.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from tre_lightning.callbacks._common import step_samples
from tre_lightning.checks import integer, text

__all__ = ["SampleLogger"]


class SampleLogger(Callback):
    """Write some of the step's samples every ``every_n_steps`` steps.

    Args:
        every_n_steps: interval in PPO iterations, >= 1 (the first step is always logged).
        max_rows: rows per logged step, >= 1 (the first rows of the batch:
            the ``n`` responses of the first prompts).
        filename: CSV file name inside the log folder.
        max_chars: responses and prompts are cut to this many characters in
            the logger's text view (the CSV keeps them whole), >= 1.
    """

    def __init__(self, every_n_steps: int = 10, max_rows: int = 8, filename: str = "samples.csv",
                 max_chars: int = 2000) -> None:
        every_n_steps = integer("every_n_steps", every_n_steps, 1)
        max_rows = integer("max_rows", max_rows, 1)
        text("filename", filename)
        max_chars = integer("max_chars", max_chars, 1)
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows
        self.filename = filename
        self.max_chars = max_chars
        self.path: str | None = None

    def _folder(self, trainer: Trainer) -> str:
        logger = trainer.logger
        folder = getattr(logger, "log_dir", None) if logger is not None else None
        return folder or trainer.default_root_dir

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if (step - 1) % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        samples = step_samples(outputs)
        if not samples.get("response"):
            return
        count = min(self.max_rows, len(samples["response"]))
        rows = [
            (step, samples["prompt"][i], samples["response"][i], float(samples["reward"][i])) for i in range(count)
        ]
        self.path = os.path.join(self._folder(trainer), self.filename)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "prompt", "response", "reward"])
            writer.writerows(rows)
        self._to_logger(trainer, rows)

    def _to_logger(self, trainer: Trainer, rows: list[tuple[int, str, str, float]]) -> None:
        short = [(s, p[-self.max_chars :], r[: self.max_chars], w) for s, p, r, w in rows]
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(logger, "log_text"):  # Weights & Biases
                logger.log_text(key="samples", columns=["step", "prompt", "response", "reward"],
                                data=[list(r) for r in short], step=trainer.global_step)
            elif experiment is not None and hasattr(experiment, "add_text"):  # TensorBoard
                lines = ["| prompt | response | reward |", "|---|---|---|"]
                for _, p, r, w in short:
                    cell = lambda t: t.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
                    lines.append(f"| {cell(p)} | {cell(r)} | {w:.4g} |")
                experiment.add_text("samples", "\n".join(lines), global_step=trainer.global_step)
