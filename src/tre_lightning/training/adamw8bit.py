"""Optimizer factory: torch AdamW, or bitsandbytes 8-bit AdamW (also under FSDP2).

8-bit AdamW and FSDP2: FSDP2 parameters and gradients are ``DTensor``s,
which bitsandbytes' kernels do not accept (bitsandbytes issues 89 and 1633).
:class:`AdamW8bitSharded` makes the combination work by stepping on the
local shards: for a ``DTensor`` parameter it hands bitsandbytes the plain
local tensor (``p.to_local()``, which shares storage with the parameter) and
the local gradient shard, and keeps the 8-bit state of that shard only.
Which tensors get 8-bit state (``min_8bit_size``) is decided on the *global*
parameter size, so sharded and unsharded runs quantize the same tensors.
Adam is elementwise and bitsandbytes quantizes its state in blocks of 256
elements, so a sharded step equals the unsharded one whenever shard
boundaries fall on block boundaries (they do for the row-sharded weights of
the usual model sizes), and differs by quantization noise otherwise.

Checkpoints: ``state_dict()`` returns the moments de-quantized to fp32 as
``exp_avg``/``exp_avg_sq`` (``DTensor``s shaped like the parameter when the
parameter is one), so ``torch.distributed.checkpoint`` (Lightning's
``ModelParallelStrategy``) saves and reloads them correctly, also on a
different number of ranks; ``load_state_dict`` re-quantizes them, exactly
(same codes and block scales) when the shards are the same. A checkpoint
stores fp32 moments, as torch AdamW does; memory during training holds the
8-bit ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["adamw8bit_class", "build_optimizer"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

_BLOCKSIZE = 256


def build_optimizer(
    params: ParamsT,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.01,
    eps: float = 1e-8,
    eight_bit: bool = False,
    *,
    min_8bit_size: int = 4096,
) -> torch.optim.Optimizer:
    """AdamW over ``params``: torch's, or 8-bit (bitsandbytes) when ``eight_bit``.

    Args:
        params: parameters or param-group dicts (plain tensors or FSDP2
            ``DTensor``s; frozen ones, ``requires_grad=False``, are dropped).
        lr: learning rate (> 0).
        betas: Adam betas, each in [0, 1).
        weight_decay: decoupled weight decay (>= 0).
        eps: Adam epsilon (> 0).
        eight_bit: use :class:`AdamW8bitSharded` (needs the ``quant`` extra).
        min_8bit_size: tensors with fewer elements keep 32-bit state (8-bit only).

    Returns:
        ``torch.optim.AdamW`` or ``AdamW8bitSharded``.

    Raises:
        ValueError: for out-of-range hyper-parameters or no trainable parameter.
        ImportError: ``eight_bit`` without bitsandbytes (message names the extra).
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1), got {betas}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")
    groups = _trainable_groups(params)
    if not groups:
        raise ValueError("build_optimizer got no trainable parameters (all have requires_grad=False)")
    betas = (float(betas[0]), float(betas[1]))
    if not eight_bit:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    cls = adamw8bit_class()
    return cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)


def _trainable_groups(params: ParamsT) -> list[dict[str, Any]]:
    items = list(params)
    if items and isinstance(items[0], dict):
        groups = []
        for g in items:
            kept = [p for p in g["params"] if p.requires_grad]
            if kept:
                groups.append({**g, "params": kept})
        return groups
    kept = [p for p in items if p.requires_grad]
    return [{"params": kept}] if kept else []


_CLASS: type | None = None


def adamw8bit_class() -> type[torch.optim.Optimizer]:
    """The ``AdamW8bitSharded`` class (built on first use: bitsandbytes is optional).

    Raises:
        ImportError: bitsandbytes missing; the message names the ``quant`` extra.
    """
    global _CLASS
    if _CLASS is None:
        from tre_lightning.models.quant import require_bitsandbytes

        bnb = require_bitsandbytes("8-bit AdamW (eight_bit=True)")
        _CLASS = _make_class(bnb)
    return _CLASS


def __getattr__(name: str) -> Any:
    if name == "AdamW8bitSharded":
        return adamw8bit_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _as_param_like(p: Tensor, local_value: Tensor) -> Tensor:
    """Wrap a local-shard tensor as a DTensor laid out like ``p`` (identity for plain ``p``)."""
    if not _is_dtensor(p):
        return local_value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


def _quantize_blockwise(x: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    """Blockwise (256) 8-bit quantization that inverts bitsandbytes' de-quantization.

    ``x ~= code[q] * absmax[block]``. The block scale is chosen so that values
    that came from ``dequantize_blockwise`` map back to the same codes and
    scales, bit for bit: the signed dynamic map's most negative code is about
    -0.993, not -1, so a block whose largest-magnitude moment was negative is
    rescaled by ``1 / |min code|`` (bitsandbytes' own ``quantize_blockwise``
    would shrink that block's scale and re-round every element in it); that
    division can land one float32 step off the original scale (two scales
    can give the same extreme), so the neighbouring float32 scales are tried
    too and, per block, the one that reproduces every value is kept.

    Returns:
        ``(codes uint8 shaped like x, absmax float32 (blocks,))``.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // _BLOCKSIZE)
    padded = torch.zeros(blocks * _BLOCKSIZE, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    view = padded.view(blocks, _BLOCKSIZE)
    code = code.float().to(flat.device)
    lowest = float(code.min())
    sorted_code, order = torch.sort(code)
    midpoints = (sorted_code[1:] + sorted_code[:-1]) / 2

    def codes(absmax: Tensor) -> Tensor:
        normalized = view / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
        return order[torch.bucketize(normalized.clamp(sorted_code[0], sorted_code[-1]), midpoints)]

    if lowest < 0:  # signed map
        absmax = torch.maximum(view.clamp(min=0).amax(dim=1), (-view).clamp(min=0).amax(dim=1) / -lowest)
        candidates = [absmax] + [torch.nextafter(absmax, torch.full_like(absmax, d)) for d in (math.inf, -math.inf)]
    else:
        absmax = view.abs().amax(dim=1)
        candidates = [absmax]
    best_q = codes(candidates[0])
    best_misses = (code[best_q] * candidates[0].unsqueeze(1) != view).sum(dim=1)
    for candidate in candidates[1:]:
        q_c = codes(candidate)
        misses = (code[q_c] * candidate.unsqueeze(1) != view).sum(dim=1)
        better = misses < best_misses
        absmax = torch.where(better, candidate, absmax)
        best_q = torch.where(better.unsqueeze(1), q_c, best_q)
        best_misses = torch.where(better, misses, best_misses)
    q = best_q.to(torch.uint8).reshape(-1)[:n].reshape(x.shape)
    return q, absmax


def _make_class(bnb: Any) -> type[torch.optim.Optimizer]:
    import bitsandbytes.functional as F

    def moment(st: dict[str, Any], which: int) -> Tensor:
        s = st[f"state{which}"]
        if s.dtype != torch.uint8:
            return s.float().clone()
        if s.numel() == 0:
            return torch.zeros(s.shape, dtype=torch.float32, device=s.device)
        deq = F.dequantize_blockwise(
            s.contiguous(), absmax=st[f"absmax{which}"], code=st[f"qmap{which}"], blocksize=_BLOCKSIZE
        )
        return deq.float().reshape(s.shape)

    class AdamW8bitSharded(bnb.optim.AdamW8bit):  # type: ignore[misc, name-defined]
        """bitsandbytes ``AdamW8bit`` that also steps FSDP2 (``DTensor``) parameters.

        Same arguments as ``bitsandbytes.optim.AdamW8bit``. See the
        ``tre_lightning.training.adamw8bit`` module docstring for how sharded parameters
        and checkpoints are handled.
        """

        def _eight_bit(self, config: dict[str, Any], p: Tensor) -> bool:
            return config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]  # global size

        @torch.no_grad()
        def init_state(self, group: dict[str, Any], p: Tensor, gindex: int, pindex: int) -> None:
            config = self.get_config(gindex, pindex, group)
            local = _local(p)
            state = self.state[p]
            state["step"] = 0
            if not self._eight_bit(config, p):
                state["state1"] = torch.zeros_like(local, dtype=torch.float32)
                state["state2"] = torch.zeros_like(local, dtype=torch.float32)
            else:
                state["state1"] = torch.zeros_like(local, dtype=torch.uint8)
                state["qmap1"] = self._qmap("dynamic", local.device)
                state["state2"] = torch.zeros_like(local, dtype=torch.uint8)
                state["qmap2"] = self._qmap("udynamic", local.device)
                blocks = -(-local.numel() // _BLOCKSIZE)
                state["absmax1"] = torch.zeros((blocks,), dtype=torch.float32, device=local.device)
                state["absmax2"] = torch.zeros((blocks,), dtype=torch.float32, device=local.device)
            if config["max_unorm"] > 0.0:
                state["unorm_vec"] = torch.zeros((1,), device=local.device)

        @torch.no_grad()
        def update_step(self, group: dict[str, Any], p: Tensor, gindex: int, pindex: int) -> None:
            if not _is_dtensor(p):
                super().update_step(group, p, gindex, pindex)
                return
            local = p.to_local()
            if local.numel() == 0:  # uneven sharding: this rank holds no rows
                self.state[p]["step"] += 1
                return
            # A plain alias of the shard (same storage) carrying the local grad;
            # the state is re-keyed to it for bitsandbytes' kernel call.
            work = local.detach()
            work.grad = _local(p.grad).detach()
            self.state[work] = self.state.pop(p)
            try:
                super().update_step(group, work, gindex, pindex)
            finally:
                self.state[p] = self.state.pop(work)
            if work.data_ptr() != local.data_ptr():  # bitsandbytes made a contiguous copy
                local.copy_(work)

        # -- checkpoints: fp32 moments, laid out like the parameter ------------

        def state_dict(self) -> dict[str, Any]:
            sd = torch.optim.Optimizer.state_dict(self)
            params = [p for g in self.param_groups for p in g["params"]]
            state: dict[int, Any] = {}
            for idx, p in enumerate(params):
                st = self.state.get(p)
                if not st:
                    continue
                state[idx] = {
                    "step": torch.tensor(float(st["step"])),
                    "exp_avg": _as_param_like(p, moment(st, 1)),
                    "exp_avg_sq": _as_param_like(p, moment(st, 2)),
                }
            sd["state"] = state
            return sd

        def load_state_dict(self, state_dict: dict[str, Any], move_to_device: bool = True) -> None:
            params = [p for g in self.param_groups for p in g["params"]]
            saved_groups = state_dict["param_groups"]
            if len(saved_groups) != len(self.param_groups):
                raise ValueError("loaded state dict has a different number of parameter groups")
            saved_ids = [i for g in saved_groups for i in g["params"]]
            if len(saved_ids) != len(params):
                raise ValueError("loaded state dict has a different number of parameters")
            id_map = dict(zip(saved_ids, params))
            new_state = {id_map[k]: self._requantized(id_map[k], v) for k, v in state_dict["state"].items()}
            for group, saved in zip(self.param_groups, saved_groups):
                for k, v in saved.items():
                    if k != "params":
                        group[k] = v
            self.state.clear()
            self.state.update(new_state)

        def _requantized(self, p: Tensor, value: dict[str, Any]) -> dict[str, Any]:
            local = _local(p)
            if "state1" in value:  # bitsandbytes' own layout (same ranks and sizes)
                return {k: (v.to(local.device) if torch.is_tensor(v) else v) for k, v in value.items()}
            gindex, pindex = self._index_of(p)
            config = self.get_config(gindex, pindex, self.param_groups[gindex])
            step = value.get("step", 0)
            state: dict[str, Any] = {"step": int(step.item()) if torch.is_tensor(step) else int(step)}
            m = _local(value["exp_avg"]).to(device=local.device, dtype=torch.float32).reshape(local.shape)
            v = _local(value["exp_avg_sq"]).to(device=local.device, dtype=torch.float32).reshape(local.shape)
            if not self._eight_bit(config, p):
                state["state1"], state["state2"] = m.clone(), v.clone()
            else:
                qmap1, qmap2 = self._qmap("dynamic", local.device), self._qmap("udynamic", local.device)
                blocks = -(-local.numel() // _BLOCKSIZE)
                if local.numel() == 0:
                    q1, q2 = torch.zeros_like(local, dtype=torch.uint8), torch.zeros_like(local, dtype=torch.uint8)
                    a1 = a2 = torch.zeros((blocks,), dtype=torch.float32, device=local.device)
                else:
                    q1, a1 = _quantize_blockwise(m, qmap1)
                    q2, a2 = _quantize_blockwise(v, qmap2)
                state.update(
                    state1=q1.reshape(local.shape),
                    state2=q2.reshape(local.shape),
                    qmap1=qmap1,
                    qmap2=qmap2,
                    absmax1=a1,
                    absmax2=a2,
                )
            if config["max_unorm"] > 0.0:
                state["unorm_vec"] = torch.zeros((1,), device=local.device)
            return state

        def _qmap(self, name: str, device: torch.device) -> Tensor:
            if name not in self.name2qmap:
                self.fill_qmap()
            self.name2qmap[name] = self.name2qmap[name].to(device)
            return self.name2qmap[name]

        def _index_of(self, p: Tensor) -> tuple[int, int]:
            for gi, g in enumerate(self.param_groups):
                for pi, q in enumerate(g["params"]):
                    if q is p:
                        return gi, pi
            raise KeyError("parameter not in this optimizer")

    AdamW8bitSharded.__module__ = __name__
    AdamW8bitSharded.__qualname__ = "AdamW8bitSharded"
    return AdamW8bitSharded
