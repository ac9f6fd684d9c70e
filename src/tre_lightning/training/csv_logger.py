"""A CSV logger that a resumed run keeps writing to, instead of deleting its metrics.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder is not empty
("Previous log files in this directory will be deleted"), so a run resumed
into the same folder (``ckpt_path=auto``) would lose the metrics of every
iteration before the interruption. :class:`ResumableCSVLogger` keeps the
file: its existing columns are kept, and at the first save the rows at or
after the first new step (written by the interrupted run after its last
checkpoint, and now repeated) are dropped, so the file has each step once.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["ResumableCSVLogger"]


class _AppendingWriter(ExperimentWriter):
    """``ExperimentWriter`` that appends to an existing ``metrics.csv`` (trimmed once, see the module)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._trim = os.path.isfile(self.metrics_file_path)
        if self._trim:
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        """Keep what is there (Lightning deletes ``metrics.csv`` here)."""

    def save(self) -> None:
        if self._trim and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            with open(self.metrics_file_path, newline="") as file:
                rows = [r for r in csv.DictReader(file) if r.get("step", "") == "" or int(float(r["step"])) < first]
            with open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)
            self._trim = False
        super().save()


class ResumableCSVLogger(CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` (same arguments) that appends to the metrics of a resumed run."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
