"""How the entry points refuse: one line on stderr, no traceback, a documented exit status.

* a configuration problem (:class:`~tre_lightning.checks.ConfigError`, which
  includes every constructor's :class:`~tre_lightning.checks.ArgumentError`):
  ``<prog>: error: invalid configuration: <key>: <message>``, exit status 2;
* a data problem (:class:`~tre_lightning.tasks.data_io.DataError`: file, row,
  column): ``<prog>: error: invalid data: <message>``, exit status 2;
* an optional extra that is missing at run time (vLLM or a CUDA GPU for the
  vLLM engine, bitsandbytes for 4-bit models or 8-bit AdamW): its message,
  exit status 1. The error may arrive wrapped, so the cause/context chain is
  searched.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

__all__ = ["CONFIG_EXIT", "EXTRA_EXIT", "exit_on_error", "missing_extra"]

CONFIG_EXIT = 2
"""Exit status for a refused configuration or data."""
EXTRA_EXIT = 1
"""Exit status for a missing optional extra."""


def missing_extra(err: BaseException) -> BaseException | None:
    """The missing-extra error in ``err``'s cause/context chain, or None."""
    from tre_lightning.models.quant import BitsAndBytesUnavailableError
    from tre_lightning.rollout.vllm import VLLMUnavailableError

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, VLLMUnavailableError | BitsAndBytesUnavailableError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def exit_on_error(prog: str) -> Iterator[None]:
    """Turn a refused configuration, bad data or a missing extra into one line and an exit status."""
    from tre_lightning.checks import ConfigError
    from tre_lightning.tasks.data_io import DataError

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
        found = missing_extra(err)
        if found is None:
            raise
        print(f"{prog}: {found}", file=sys.stderr, flush=True)
        raise SystemExit(EXTRA_EXIT) from None
