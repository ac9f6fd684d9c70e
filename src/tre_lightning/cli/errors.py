"""How the entry points refuse: one line on stderr, no traceback, a documented exit status.

* a configuration problem (:class:`~tre_lightning.checks.ConfigError`, which
  includes every constructor's :class:`~tre_lightning.checks.ArgumentError`):
  ``<prog>: error: invalid configuration: <key>: <message>``, exit status 2;
* a data problem (:class:`~tre_lightning.tasks.data_io.DataError`: file, row,
  column): ``<prog>: error: invalid data: <message>``, exit status 2;
* a checkpoint that cannot be written (a full disk, a read-only run folder:
  :class:`~tre_lightning.training.checkpoint_io.CheckpointWriteError`):
  ``<prog>: error: cannot write the checkpoint ...: <why>; ...``, exit status 2;
* an optional extra that is missing at run time (vLLM or a CUDA GPU for the
  vLLM engine, bitsandbytes for 4-bit models or 8-bit AdamW): its message,
  exit status 1. The error may arrive wrapped, so the cause/context chain is
  searched.

Exit statuses of ``tre-train`` and ``tre-lightning``: 0 success (and
``--help``); 2 a refused configuration or data, including the errors Hydra
reports itself while composing ``tre-train``'s config (an unknown key, an
unknown group option, a key that needs ``+``: Hydra's own message, a few lines
without a traceback, then one line of ours) and jsonargparse's parse errors of
``tre-lightning``; 1 a missing extra, or an error while the run is going (a
traceback).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

__all__ = ["CONFIG_EXIT", "EXTRA_EXIT", "exit_on_error", "hydra_exit_status", "missing_extra"]

CONFIG_EXIT = 2
"""Exit status for a refused configuration or data."""
EXTRA_EXIT = 1
"""Exit status for a missing optional extra."""


def _in_chain(err: BaseException, kinds: type | tuple[type, ...]) -> BaseException | None:
    """The first error of ``kinds`` in ``err``'s cause/context chain, or None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def missing_extra(err: BaseException) -> BaseException | None:
    """The missing-extra error in ``err``'s cause/context chain, or None."""
    from tre_lightning.models.lora import LoraUnavailableError
    from tre_lightning.models.quant import BitsAndBytesUnavailableError
    from tre_lightning.rollout.vllm import VLLMUnavailableError

    return _in_chain(err, (VLLMUnavailableError, BitsAndBytesUnavailableError, LoraUnavailableError))


def hydra_exit_status(code: object, started: bool) -> object:
    """The exit status of a ``SystemExit(code)`` from ``hydra.main``: Hydra's own failure before the run
    started (status 1: composing the config failed) is a configuration error, :data:`CONFIG_EXIT`."""
    return CONFIG_EXIT if code == 1 and not started else code


@contextlib.contextmanager
def exit_on_error(prog: str) -> Iterator[None]:
    """Turn a refused configuration, bad data or a missing extra into one line and an exit status."""
    from tre_lightning.checks import ConfigError
    from tre_lightning.tasks.data_io import DataError
    from tre_lightning.training.checkpoint_io import CheckpointWriteError

    try:
        yield
    except ConfigError as err:
        message = f"{err.key}: {err.message}" if err.key else err.message
        print(f"{prog}: error: invalid configuration: {message}", file=sys.stderr, flush=True)
        raise SystemExit(CONFIG_EXIT) from None
    except DataError as err:
        print(f"{prog}: error: invalid data: {err}", file=sys.stderr, flush=True)
        raise SystemExit(CONFIG_EXIT) from None
    except Exception as err:
        written = _in_chain(err, CheckpointWriteError)
        if written is not None:
            print(f"{prog}: error: {written.strerror}", file=sys.stderr, flush=True)
            raise SystemExit(CONFIG_EXIT) from None
        found = missing_extra(err)
        if found is None:
            raise
        print(f"{prog}: {found}", file=sys.stderr, flush=True)
        raise SystemExit(EXTRA_EXIT) from None
