"""``ckpt_path=auto``: resume from the newest checkpoint of the run folder, or start fresh.

A job that is requeued (SLURM, a spot instance) relaunches the same command;
with ``ckpt_path=auto`` and a fixed run folder (``hydra.run.dir=...`` for
``tre-train``, ``trainer.default_root_dir`` and the checkpoint callback's
``dirpath`` for ``tre-lightning``) the first launch starts from scratch and
every later one continues from the newest ``*.ckpt`` that the trainer's
``ModelCheckpoint`` callbacks wrote. :func:`resolve_auto_resume` runs after
the trainer is built and before :func:`~tre_lightning.training.checkpoint_io.check_resume_path`
checks the file it names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tre_lightning.checks import ConfigError

__all__ = ["AUTO", "checkpoint_folders", "is_auto", "newest_checkpoint", "resolve_auto_resume"]

AUTO = "auto"
"""The value of ``ckpt_path`` that asks for the newest checkpoint of the run."""


def is_auto(path: Any) -> bool:
    """``ckpt_path`` is :data:`AUTO`."""
    return isinstance(path, str) and path == AUTO


def checkpoint_folders(trainer: Any) -> list[Path]:
    """The ``dirpath`` of each ``ModelCheckpoint`` of ``trainer`` (resolved by the trainer), in order."""
    folders = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    return list(dict.fromkeys(folders))


def newest_checkpoint(folders: list[Path]) -> Path | None:
    """The ``*.ckpt`` file with the latest modification time in ``folders`` (ties: the name), None if none.

    Hidden files (``.last.ckpt.<random>.tmp`` of an interrupted atomic save) are skipped.
    """
    files = [f for folder in folders if folder.is_dir() for f in folder.glob("*.ckpt")
             if f.is_file() and not f.name.startswith(".")]
    return max(files, key=lambda f: (f.stat().st_mtime_ns, f.name)) if files else None


def resolve_auto_resume(path: Any, trainer: Any, key: str) -> Any:
    """``path`` unchanged unless it is ``auto``; then the newest checkpoint, or None (start fresh)."""
    if not is_auto(path):
        return path
    folders = checkpoint_folders(trainer)
    if not folders:
        raise ConfigError(key, "auto resumes from the checkpoints of a ModelCheckpoint callback with a dirpath; "
                               "the run has none (add callbacks.checkpoint, or pass a .ckpt path)")
    newest = newest_checkpoint(folders)
    return str(newest) if newest is not None else None
