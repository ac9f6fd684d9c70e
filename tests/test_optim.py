"""The optimizer factory: torch AdamW and 8-bit AdamW (bitsandbytes CPU backend).

The FSDP2 (DTensor) side of 8-bit AdamW, with a distributed checkpoint, is
tested with 2 processes in tests/test_fsdp_distributed.py.
"""

from __future__ import annotations

import importlib.util
import io
import sys

import pytest
import torch
from torch import nn

import tre_lightning.training.adamw8bit as optim_mod
from tre_lightning.training.adamw8bit import adamw8bit_class, build_optimizer

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes>=0.50 (the quant extra)"
)


def _regression(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 8))  # 8192 and 1024 weights
    x = torch.randn(64, 64)
    y = torch.randn(64, 8)
    return model, x, y


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_torch_adamw_with_the_given_hyperparameters() -> None:
    model, _, _ = _regression()
    model[0].bias.requires_grad_(False)
    opt = build_optimizer(model.parameters(), lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1, eps=1e-6)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (1e-3, (0.8, 0.95), 0.1, 1e-6)
    assert len(group["params"]) == 3  # the frozen bias is dropped


def test_param_groups_are_kept() -> None:
    model, _, _ = _regression()
    opt = build_optimizer([{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters()}], lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": 1e-3, "betas": (0.9, 1.0)}, "betas"),
        ({"lr": 1e-3, "weight_decay": -1.0}, "weight_decay"),
        ({"lr": 1e-3, "eps": 0.0}, "eps"),
    ],
)
def test_invalid_hyperparameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_optimizer([nn.Parameter(torch.ones(2))], **kwargs)


def test_no_trainable_parameter() -> None:
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer([nn.Parameter(torch.ones(2), requires_grad=False)], lr=1e-3)


@needs_bnb
def test_eight_bit_adamw_reduces_the_loss_on_cpu() -> None:
    import bitsandbytes as bnb

    model, x, y = _regression()
    opt = build_optimizer(model.parameters(), lr=1e-2, weight_decay=0.0, eight_bit=True)
    assert isinstance(opt, bnb.optim.AdamW8bit) and type(opt).__name__ == "AdamW8bitSharded"
    losses = _train(model, opt, x, y, 30)
    assert losses[-1] < 0.5 * losses[0]
    big, small = opt.state[model[0].weight], opt.state[model[2].weight]
    assert big["state1"].dtype == torch.uint8 and big["state2"].dtype == torch.uint8  # 8192 >= 4096
    assert small["state1"].dtype == torch.float32  # 1024 < min_8bit_size


@needs_bnb
def test_eight_bit_tracks_torch_adamw() -> None:
    model8, x, y = _regression()
    model32, _, _ = _regression()
    l8 = _train(model8, build_optimizer(model8.parameters(), lr=1e-2, eight_bit=True), x, y, 10)
    l32 = _train(model32, build_optimizer(model32.parameters(), lr=1e-2), x, y, 10)
    assert l8 == pytest.approx(l32, rel=2e-2)


@needs_bnb
def test_eight_bit_state_dict_is_fp32_and_resumes() -> None:
    model, x, y = _regression()
    opt = build_optimizer(model.parameters(), lr=1e-2, eight_bit=True)
    _train(model, opt, x, y, 5)
    sd = opt.state_dict()
    entry = sd["state"][0]
    assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
    assert entry["exp_avg"].dtype == torch.float32 and entry["exp_avg"].shape == model[0].weight.shape
    assert float(entry["step"]) == 5
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sd}, buffer)

    # de-quantize -> re-quantize gives back the same codes and block scales
    opt_copy = build_optimizer(model.parameters(), lr=1e-2, eight_bit=True)
    opt_copy.load_state_dict(sd)
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(opt_copy.state[p][key]), torch.as_tensor(value)), key

    # uninterrupted
    _train(model, opt, x, y, 3)
    # resumed into fresh objects
    buffer.seek(0)
    saved = torch.load(buffer)
    model2, _, _ = _regression(seed=1)
    model2.load_state_dict(saved["model"])
    opt2 = build_optimizer(model2.parameters(), lr=1e-2, eight_bit=True)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[model2[0].weight]["state1"].dtype == torch.uint8
    assert opt2.state[model2[0].weight]["step"] == 5
    _train(model2, opt2, x, y, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_missing_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    monkeypatch.setattr(optim_mod, "_CLASS", None)
    with pytest.raises(ImportError, match=r"tre-lightning\[quant\]"):
        build_optimizer([nn.Parameter(torch.ones(2))], lr=1e-3, eight_bit=True)
    with pytest.raises(ImportError, match="8-bit AdamW"):
        adamw8bit_class()


@needs_bnb
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eight_bit_state_round_trips_bit_for_bit_over_many_blocks(seed: int) -> None:
    """256 blocks: some have a negative extreme whose scale, recomputed as extreme / |min code|, can land one
    float32 step off; the re-quantization must still give back the same codes and scales exactly."""
    torch.manual_seed(seed)
    p = nn.Parameter(torch.randn(64, 1024))
    opt = build_optimizer([p], lr=1e-2, eight_bit=True)
    for _ in range(5):
        p.grad = torch.randn_like(p)
        opt.step()
    copy = build_optimizer([p], lr=1e-2, eight_bit=True)
    copy.load_state_dict(opt.state_dict())
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(copy.state[p][key], opt.state[p][key]), key
