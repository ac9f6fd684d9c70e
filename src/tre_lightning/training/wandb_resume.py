"""A resumed run continues the same W&B run: the run id is stored in the checkpoint.

:class:`WandbRunId` (a callback, in conf/callbacks/default.yaml) writes the id
of every ``WandbLogger`` of the trainer into each checkpoint. Lightning
creates the W&B run (``wandb.init``) in the trainer's setup, before any
callback state is restored, so the entry points call
:func:`continue_wandb_runs` with the checkpoint they resume from after the
trainer is built and before ``fit``: it reads the stored ids and sets
``id=<id>, resume="allow"`` on the loggers, whose run is not created yet.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["WandbRunId", "continue_wandb_runs", "stored_run_ids"]

_STATE_KEY = "WandbRunId"


def _wandb_loggers(loggers: Any) -> list[Any]:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - lightning always ships the class
        return []
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


class WandbRunId(Callback):
    """Stores the W&B run id of each ``WandbLogger`` in the checkpoint (``callbacks.WandbRunId.run_ids``)."""

    def __init__(self) -> None:
        self._trainer: Trainer | None = None

    @property
    def state_key(self) -> str:
        return _STATE_KEY

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        loggers = _wandb_loggers(self._trainer.loggers) if self._trainer is not None else []
        return {"run_ids": [str(lg.version) for lg in loggers if lg.version is not None]}

    def __repr__(self) -> str:
        return "WandbRunId()"


def stored_run_ids(ckpt_path: str) -> list[str]:
    """The W&B run ids in a checkpoint file (empty when it has none)."""
    import torch

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    state = (checkpoint.get("callbacks") or {}).get(_STATE_KEY) or {}
    return [str(run_id) for run_id in state.get("run_ids", [])]


def continue_wandb_runs(loggers: Any, ckpt_path: str | None) -> list[str]:
    """Point each ``WandbLogger`` (in order) at the run id stored in ``ckpt_path``; the ids set.

    A logger whose run already exists, or that the user gave an ``id``, is left alone.
    """
    targets = _wandb_loggers(loggers)
    if ckpt_path is None or not targets or "://" in str(ckpt_path):
        return []
    done = []
    for logger, run_id in zip(targets, stored_run_ids(str(ckpt_path)), strict=False):
        if logger._experiment is not None or logger._wandb_init.get("id"):
            continue
        logger._wandb_init.update(id=run_id, resume="allow")
        logger._id = run_id
        done.append(run_id)
    return done
