"""Optimizers, learning-rate schedules and gradient clipping for the PPO module.

Optimizer construction lives in one small function (:func:`build_optimizer`,
which defers to :func:`tre_lightning.training.adamw8bit.build_optimizer`: torch AdamW or
8-bit AdamW). The schedules count PPO iterations (one per
``training_step``), as verl does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from tre_lightning.training.config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "clip_grad_norm", "lr_factor"]


def build_optimizer(params: Iterable[nn.Parameter], lr: float, cfg: OptimConfig) -> Optimizer:
    """AdamW (torch, or 8-bit bitsandbytes with ``cfg.eight_bit``) over the trainable ``params``."""
    from tre_lightning.training.adamw8bit import build_optimizer as _build

    return _build(
        params,
        lr,
        betas=(float(cfg.betas[0]), float(cfg.betas[1])),
        weight_decay=cfg.weight_decay,
        eps=cfg.eps,
        eight_bit=cfg.eight_bit,
    )


def lr_factor(step: int, warmup: int, total: int | None, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at PPO iteration ``step`` (0-based).

    Linear warm-up from 1/(warmup+1) to 1 over ``warmup`` iterations, then
    constant, or linear / cosine decay to ``min_ratio`` at ``total``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or total is None or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be constant, linear or cosine, got {schedule!r}")


def build_scheduler(optimizer: Optimizer, cfg: OptimConfig, total_steps: int | None, critic: bool) -> LambdaLR:
    """The warm-up + schedule of :class:`OptimConfig` as a ``LambdaLR`` stepped once per PPO iteration."""
    total = cfg.total_steps if cfg.total_steps is not None else total_steps
    warmup = cfg.warmup_for(total, critic) if total is not None else (cfg.warmup_steps or 0)
    schedule, floor = cfg.schedule, cfg.min_lr_ratio
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, schedule, floor))


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float | None) -> Tensor:
    """Clip the gradients' total 2-norm to ``max_norm`` (None: only measure); returns the pre-clip norm.

    Works for FSDP2 (DTensor) parameters: the norm is gathered to a plain tensor.
    Never raises on a non-finite norm: the caller skips the step.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(
        with_grad, max_norm=math.inf if max_norm is None else max_norm, error_if_nonfinite=False
    )
    full_tensor = getattr(norm, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else norm
