"""The ``lightning.Trainer`` settings PPO cannot run with, refused before anything is built.

PPO optimizes manually (several steps of two optimizers per iteration), so
some Trainer settings do not apply or break it. The entry points check the
Trainer's arguments before building it; ``PPOModule.setup`` checks any other
trainer's settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tre_lightning.checks import ArgumentError

__all__ = ["check_trainer_args"]


def check_trainer_args(args: Mapping[str, Any]) -> None:
    """Raise :class:`~tre_lightning.checks.ArgumentError` (keyed ``trainer.<arg>``) for an argument PPO cannot use."""
    precision = str(args.get("precision", "32-true"))
    if precision in ("16", "16-mixed", "16-true"):
        raise ArgumentError("trainer.precision", "32-true, bf16-mixed or bf16-true (fp16 with a grad scaler "
                            "is not supported)", precision)
