"""Pause a ``tre-train`` run at a chosen point so that a test can SIGKILL it there (no tests here).

Added to a run with Hydra overrides (the tests folder on ``PYTHONPATH``)::

    +callbacks.killpoint._target_=_reliability_killpoint.KillPoint
    +callbacks.killpoint.where=<between|after_update|save> +callbacks.killpoint.step=<k>
    +callbacks.killpoint.marker=<file>

At the point it writes ``marker`` (with a line saying where it is) and sleeps
until it is killed:

* ``between``: before iteration k + 1 starts (checkpoint k is on disk);
* ``after_update``: iteration k has updated the weights, its checkpoint is
  not written yet (Lightning runs ModelCheckpoint after every other callback);
* ``save``: in the middle of writing ``last.ckpt`` of iteration k: half of
  its bytes are in the temporary file, fsync'ed.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback


def _pause(marker: str, text: str) -> None:
    Path(marker).write_text(text + "\n")
    while True:  # until SIGKILL
        time.sleep(1.0)


class KillPoint(Callback):
    def __init__(self, where: str, step: int, marker: str) -> None:
        if where not in ("between", "after_update", "save"):
            raise ValueError(f"where must be between, after_update or save, got {where!r}")
        self.where, self.step, self.marker = where, int(step), str(marker)
        if where == "save":
            import torch

            import tre_lightning.training.checkpoint_io as ckpt

            def dump(obj: Any, file: Any, target: Path) -> None:
                if target.name == "last.ckpt" and int(obj.get("global_step", -1)) == self.step:
                    buffer = io.BytesIO()
                    torch.save(obj, buffer)
                    data = buffer.getvalue()
                    file.write(data[: len(data) // 2])
                    file.flush()
                    os.fsync(file.fileno())
                    _pause(self.marker, f"save {target} {len(data) // 2}/{len(data)} bytes")
                torch.save(obj, file)

            ckpt._dump = dump

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.where == "between" and trainer.global_step == self.step:
            _pause(self.marker, f"between step {trainer.global_step}")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.where == "after_update" and trainer.global_step == self.step:
            _pause(self.marker, f"after_update step {trainer.global_step}")
