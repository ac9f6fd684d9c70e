"""A CSV logger that keeps the rows already in ``metrics.csv`` when a run resumes into the same folder.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when its writer
starts (a resumed run in the same folder lost every earlier row).
:class:`ResumableCSVLogger` appends instead. Rows of steps the resumed run
logs again (logged by the killed run after its last checkpoint, so not part
of the resumed history) are replaced: at the first write, existing rows whose
``step`` is at or after the first new row's step are dropped. So after a run
of ``k`` steps and a resume for the rest, the file has every step once.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["ResumableCSVLogger"]


def _step(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step", ""))
    except ValueError:
        return float("-inf")  # a row without a step is kept


class _AppendingWriter(ExperimentWriter):
    """``ExperimentWriter`` that continues an existing ``metrics.csv`` (same columns, header widened as needed)."""

    def __init__(self, log_dir: str) -> None:
        self._resumed = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])
            self._resumed = True

    def save(self) -> None:
        if self._resumed and self.metrics:
            self._resumed = False
            first = min(_step(m) for m in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                kept = [row for row in csv.DictReader(file) if _step(row) < first]
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
        super().save()


class ResumableCSVLogger(CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` (same arguments) that appends to an existing ``metrics.csv``."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
