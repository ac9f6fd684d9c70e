"""Learning-rate warm-up and schedules (per PPO iteration) and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from test_module_support import LengthTask, tiny_module, fit, trainer, validate

from tre_lightning.training.optim import clip_grad_norm, lr_factor


def test_lr_factor() -> None:
    assert [lr_factor(s, 3, 10, "constant", 0.0) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(3, 3, 13, "linear", 0.0) == 1.0
    assert lr_factor(8, 3, 13, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(13, 3, 13, "linear", 0.1) == pytest.approx(0.1)
    assert lr_factor(8, 3, 13, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(13, 3, 13, "cosine", 0.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(100, 0, None, "cosine", 0.0) == 1.0  # unknown length: constant after warm-up


def test_schedules_step_once_per_iteration() -> None:
    module = tiny_module(LengthTask(), lr=1e-3, warmup_steps=2, schedule="linear", critic_warmup_ratio=None)
    lrs = []

    import lightning as L

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append([g["lr"] for opt in trainer.optimizers for g in opt.param_groups])

    fit(trainer(max_steps=4, callbacks=[Record()]), module)
    # warm-up over 2 iterations, then linear decay to 0 at max_steps = 4
    expected = [1e-3 * lr_factor(s, 2, 4, "linear", 0.0) for s in range(4)]
    assert [a for a, _ in lrs] == pytest.approx(expected)
    assert [c for _, c in lrs] == pytest.approx(expected)


def test_clip_grad_norm_returns_pre_clip_norm() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    norm = clip_grad_norm([p], 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([math.inf, 0.0, 0.0, 0.0])
    assert not math.isfinite(float(clip_grad_norm([p], 1.0)))  # reported, never raised
