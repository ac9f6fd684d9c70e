"""The ``lightning.Trainer`` settings PPO cannot run with, refused before anything is built.

PPO optimizes manually (several steps of two optimizers per iteration), so
some Trainer settings do not apply or break it, and Lightning finds some
others only inside ``fit`` (``val_check_interval=0`` divides by zero after
the first iteration; a fractional ``max_steps`` runs as its ceiling). The
entry points check the Trainer's arguments before building it
(:func:`check_trainer_args`); ``PPOModule.setup`` checks any other trainer's
settings (:func:`trainer_settings` reads them back from a built Trainer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tre_lightning.checks import ArgumentError

__all__ = ["check_trainer_args", "trainer_settings"]

_MANUAL = "PPO optimizes manually"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_trainer_args(args: Mapping[str, Any]) -> None:
    """Raise :class:`~tre_lightning.checks.ArgumentError` (keyed ``trainer.<arg>``) for an argument PPO cannot use.

    Args:
        args: the Trainer's constructor arguments (a config node; keys that are absent keep Lightning's defaults).
    """
    precision = str(args.get("precision", "32-true"))
    if precision in ("16", "16-mixed", "16-true"):
        raise ArgumentError("trainer.precision", "32-true, bf16-mixed or bf16-true (fp16 with a grad scaler "
                            "is not supported)", precision)
    for name in ("max_steps", "max_epochs", "min_steps", "min_epochs"):
        value = args.get(name)
        if value is not None and (not _is_int(value) or value < -1):
            what = "PPO iterations" if "steps" in name else "epochs"
            raise ArgumentError(f"trainer.{name}", f"an int >= -1 ({what}; -1: no limit) or null", value)
    interval = args.get("val_check_interval")
    if interval is not None and not (_is_int(interval) and interval >= 1
                                     or _is_real(interval) and not _is_int(interval) and 0.0 < interval <= 1.0):
        raise ArgumentError("trainer.val_check_interval", "an int >= 1 (PPO iterations between validations), "
                            "a float in (0, 1] (a fraction of the epoch) or null", interval)
    clip = args.get("gradient_clip_val")
    if clip is not None and clip != 0:
        raise ArgumentError("trainer.gradient_clip_val", f"null ({_MANUAL}: clip the gradient norm with "
                            "ppo.max_grad_norm)", clip)
    if args.get("gradient_clip_algorithm") is not None:
        raise ArgumentError("trainer.gradient_clip_algorithm", f"null ({_MANUAL}: ppo.max_grad_norm clips "
                            "the norm)", args["gradient_clip_algorithm"])
    accumulate = args.get("accumulate_grad_batches", 1)
    if accumulate != 1 or not _is_int(accumulate):
        raise ArgumentError("trainer.accumulate_grad_batches", f"1 ({_MANUAL}: gradients are accumulated over "
                            "ppo.micro_batch_size pieces of each ppo.mini_batch_size)", accumulate)


def trainer_settings(trainer: Any) -> dict[str, Any]:
    """The settings :func:`check_trainer_args` checks, read from a built ``lightning.Trainer``."""
    loop = trainer.fit_loop
    return {
        "precision": trainer.precision,
        "max_steps": loop.max_steps,
        "gradient_clip_val": trainer.gradient_clip_val,
        "gradient_clip_algorithm": trainer.gradient_clip_algorithm,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "val_check_interval": trainer.val_check_interval,
    }
