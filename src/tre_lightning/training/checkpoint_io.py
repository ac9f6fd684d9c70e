"""Atomic checkpoint files: a crash while saving never leaves a corrupt checkpoint.

Lightning's default ``TorchCheckpointIO`` serialises the whole checkpoint
into memory and then writes it through fsspec, whose local "transaction"
writes a temporary file in the system temp folder and *moves* it over the
target: across file systems that move is a copy, so a process killed during
it leaves a truncated ``last.ckpt``, and nothing is fsync'ed.

:class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the
target's own folder (``.<name>.<random>.tmp``), flushes and fsyncs it, then
``os.replace``-s it over the target (atomic on POSIX and Windows) and fsyncs
the folder. A crash at any point leaves either the previous complete file or
the new complete file under the target name; at worst a stray ``.tmp`` file,
which the next save into that folder removes. Remote paths (``s3://`` ...)
fall back to Lightning's behaviour.

``tre-train`` and ``tre-lightning`` install it by default
(:func:`with_atomic_checkpoint_io`); pass your own ``CheckpointIO`` plugin to
replace it. It covers every strategy that writes through the checkpoint IO
(single device, DDP, FSDP2 with ``save_distributed_checkpoint=false``); a
distributed (sharded) FSDP2 checkpoint is a folder written by
``torch.distributed.checkpoint`` and is not covered.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_save", "check_resume_path", "with_atomic_checkpoint_io"]

_TMP_SUFFIX = ".tmp"


def _dump(obj: Any, file: Any, target: Path) -> None:
    """Serialise ``obj`` into the open binary ``file`` bound for ``target`` (a seam for fault-injection tests)."""
    torch.save(obj, file)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened on Windows
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


def _stale_temps(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"))


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` that is all-or-nothing under crashes.

    Writes ``.<name>.<random>.tmp`` next to ``path``, fsyncs it, renames it
    over ``path`` with ``os.replace`` and fsyncs the folder. On an exception
    the temporary file is removed and ``path`` is untouched. Temporary files
    left by an earlier killed save of the same ``path`` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temps(path):
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            _dump(obj, file, path)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (see :func:`atomic_save`); loading is unchanged."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        from fsspec.implementations.local import LocalFileSystem

        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_save(checkpoint, os.fspath(path))

    def __repr__(self) -> str:
        return "AtomicCheckpointIO()"


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """``plugins`` (None, one plugin or a list) with an :class:`AtomicCheckpointIO` added,
    unless a ``CheckpointIO`` is already among them (the user's choice wins)."""
    if plugins is None:
        items: list[Any] = []
    elif isinstance(plugins, Sequence) and not isinstance(plugins, str):
        items = list(plugins)
    else:
        items = [plugins]
    if not any(isinstance(p, CheckpointIO) for p in items):
        items.append(AtomicCheckpointIO())
    return items


def check_resume_path(path: Any, key: str) -> None:
    """Refuse a resume path that cannot be a checkpoint (before anything is built).

    Lightning's special values (``last``, ``best``, ``hpc``, ``registry``) and
    remote URLs pass; a local path must exist.
    """
    from tre_lightning.checks import ConfigError

    if path is None or str(path) in ("last", "best", "hpc", "registry") or "://" in str(path):
        return
    if not Path(str(path)).expanduser().exists():
        raise ConfigError(key, f"checkpoint {str(path)!r} does not exist (a .ckpt file to resume from, or null)")
