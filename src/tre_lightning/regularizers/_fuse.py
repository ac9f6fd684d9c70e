"""Fused (torch.compile) versions of TRE-P's two memory-bound passes, CPU only.

Eager PyTorch runs each elementwise op as its own pass over the (rows, V)
chunk; on a CPU those passes, not the arithmetic, are the cost. The two
passes below read each logit once when compiled (one C++ loop from
TorchInductor) instead of 5-6 times:

* :func:`above_sums`: count, exact float64 mass and sum(p z) of the tokens
  above a per-row threshold (the mass is a float64 sum of float32 values:
  exact in any order, see :mod:`tre_lightning.regularizers._nucleus`);
* :func:`dense_grad`: the gradient of the local-softmax entropy over
  {z > tau}, written into the gradient tensor.

They are used for chunks of at least ``MIN_ELEMENTS`` logits on CPU (the
first call compiles, a few seconds to a minute; the compiled code is cached
on disk by PyTorch). ``TRE_LIGHTNING_COMPILE=0`` turns them off, ``=1`` uses
them for any size (tests). When compiling fails (no C++ toolchain, ...), a
warning is issued once and the eager code is used from then on. On other
devices the eager code is used (one kernel per op is cheap there).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

#: chunks smaller than this (logits) stay eager: compiling would not pay.
MIN_ELEMENTS = 1 << 22
_ENV = "TRE_LIGHTNING_COMPILE"
_compiled: dict[str, Callable | None] = {}


def wanted(x: Tensor) -> bool:
    """Whether the fused passes apply to the (rows, V) chunk ``x``.

    Only contiguous float32 chunks (the compute dtype of float32 / bfloat16 /
    float16 logits): one compiled variant per pass, so the recompile limit is
    never reached; float64 (tests) stays eager.
    """
    mode = os.environ.get(_ENV, "auto")
    if mode == "0" or x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return False
    return mode == "1" or x.numel() >= MIN_ELEMENTS


def _above_sums(
    z: Tensor, p: Tensor, lo: Tensor, hi: Tensor, band: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a = z > hi[:, None]
    band.copy_(((z > lo[:, None]) & ~a).to(band.dtype))  # float32: a fast store
    return a.sum(1), torch.where(a, p, 0.0).to(torch.float64).sum(1), torch.where(a, p * z, 0.0).sum(1), band


def _dense_grad(z: Tensor, tau: Tensor, delta: Tensor, scale: Tensor, out: Tensor) -> Tensor:
    u = z - tau[:, None]
    e = torch.exp(u.clamp(min=-80.0))  # no underflow (slow path of exp) on masked logits
    return out.copy_(torch.where(u > 0, (scale[:, None] * e) * (u + delta[:, None]), 0.0))


def _run(name: str, fn: Callable, *args):
    """fn compiled once (dynamic shapes) and called; None when compiling failed."""
    if name not in _compiled:
        try:
            _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
        except Exception as exc:  # pragma: no cover - depends on the toolchain
            _disable(name, exc)
    cf = _compiled.get(name)
    if cf is None:
        return None
    try:
        return cf(*args)
    except Exception as exc:  # pragma: no cover - depends on the toolchain
        _disable(name, exc)
        return None


def _disable(name: str, exc: Exception) -> None:
    _compiled[name] = None
    warnings.warn(
        f"tre_lightning: torch.compile of the TRE-P pass {name!r} failed ({type(exc).__name__}: {exc}); "
        f"using the eager version (slower on CPU). Set {_ENV}=0 to skip the attempt.",
        RuntimeWarning,
        stacklevel=3,
    )


def above_sums(z: Tensor, p: Tensor, lo: Tensor, hi: Tensor, band: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(count, float64 mass, sum p z) of the tokens with z > hi per row, or None.

    Also writes the band indicator lo < z <= hi into ``band`` (float32 0/1).
    Shapes: z, p, band (r, V); lo, hi (r,). None means "not fused here: use eager".
    """
    if not (wanted(z) and p.is_contiguous() and band.is_contiguous()):
        return None
    out = _run("above_sums", _above_sums, z, p, lo, hi, band)
    return None if out is None else (out[0], out[1], out[2])


def dense_grad(z: Tensor, tau: Tensor, delta: Tensor, scale: Tensor, out: Tensor) -> bool:
    """out = where(z > tau, scale e^(z - tau) (z - tau + delta), 0); False when not fused.

    Shapes: z, out (r, V); tau, delta, scale (r,) in z's dtype.
    """
    if not (wanted(z) and out.is_contiguous()):
        return False
    return _run("dense_grad", _dense_grad, z, tau, delta, scale, out) is not None
