"""Optional extras (``vllm``, ``quant``) missing at run time: a clear message, no traceback.

Choosing the vLLM engine without vLLM or a CUDA GPU raises
:class:`~tre_lightning.rollout.vllm.VLLMUnavailableError`; a 4-bit model or
8-bit AdamW without bitsandbytes raises
:class:`~tre_lightning.models.quant.BitsAndBytesUnavailableError`. Both
messages say what is missing and what to do. The entry points (``tre-train``,
``tre-lightning``, ``tre-eval``) run inside :func:`exit_on_missing_extra`,
which prints that message and exits with status 1. The error may arrive
wrapped (Hydra's ``instantiate`` raises ``InstantiationException`` from it),
so the exception's cause/context chain is searched.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

__all__ = ["exit_on_missing_extra", "missing_extra"]


def missing_extra(err: BaseException) -> BaseException | None:
    """The missing-extra error in ``err``'s cause/context chain, or None."""
    from tre_lightning.models.quant import BitsAndBytesUnavailableError
    from tre_lightning.rollout.vllm import VLLMUnavailableError

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, (VLLMUnavailableError, BitsAndBytesUnavailableError)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def exit_on_missing_extra(prog: str) -> Iterator[None]:
    """Print ``<prog>: <message>`` to stderr and exit 1 when a missing extra stops the block."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a missing extra
        found = missing_extra(err)
        if found is None:
            raise
        print(f"{prog}: {found}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
