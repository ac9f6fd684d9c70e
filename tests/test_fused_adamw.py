"""``training.optim.build_optimizer`` switches torch AdamW to ``fused=True`` where that is safe.

The reference is torch's plain per-tensor AdamW (``foreach=False``), built by hand
with the same hyper-parameters; the fused trajectory must follow it up to float
rounding. Checked against the mutations "rebuild the groups without their
weight_decay" (the first two tests fail) and "fuse regardless of the parameter
type" (the DTensor test fails).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tre_lightning.training.config import OptimConfig
from tre_lightning.training.optim import build_optimizer, fusable


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_plain_cpu_parameters_get_fused_adamw_with_the_configured_hyperparameters() -> None:
    model = _model()
    model[0].bias.requires_grad_(False)
    cfg = OptimConfig(betas=(0.8, 0.95), weight_decay=0.1, eps=1e-6)
    opt = build_optimizer(model.parameters(), 1e-3, cfg)
    assert type(opt) is torch.optim.AdamW
    (group,) = opt.param_groups
    assert group["fused"] is True and not group["foreach"]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (1e-3, (0.8, 0.95), 0.1, 1e-6)
    assert len(group["params"]) == 3  # the frozen bias is still dropped


def test_fused_trajectory_matches_plain_adamw() -> None:
    cfg = OptimConfig(betas=(0.9, 0.99), weight_decay=0.05, eps=1e-7)
    fused_model, ref_model = _model(), _model()
    fused = build_optimizer(fused_model.parameters(), 3e-3, cfg)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=3e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.05,
                            foreach=False)
    _steps(fused_model, fused, 20)
    _steps(ref_model, ref, 20)
    for (name, got), want in zip(fused_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(fused_model[0].weight, _model()[0].weight)  # it did train


def test_meta_and_integer_tensors_are_not_fusable() -> None:
    assert fusable([torch.zeros(3), nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))])
    assert not fusable([torch.zeros(3), torch.zeros(3, device="meta")])
    assert not fusable([torch.zeros(3, dtype=torch.int64)])


def test_fsdp2_dtensor_parameters_keep_the_unfused_default() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        assert not fusable([param])
        opt = build_optimizer([param], 1e-3, OptimConfig())
        assert not opt.param_groups[0]["fused"]
    finally:
        dist.destroy_process_group()
