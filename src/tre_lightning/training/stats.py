"""Weighted running means of an iteration's scalar diagnostics."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RunningMeans"]


class RunningMeans:
    """Weighted means (and maxima) of scalar diagnostics, kept as tensors until :meth:`result`
    (no host synchronisation inside the loop)."""

    def __init__(self) -> None:
        self._sum: dict[str, Tensor] = {}
        self._weight: dict[str, float] = {}
        self._max: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor | float, weight: float = 1.0) -> None:
        v = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
        if name in self._sum:
            self._sum[name] = self._sum[name] + v.to(self._sum[name].device) * weight
        else:
            self._sum[name] = v * weight
        self._weight[name] = self._weight.get(name, 0.0) + weight

    def add_max(self, name: str, value: Tensor | float) -> None:
        v = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
        self._max[name] = torch.maximum(self._max[name], v.to(self._max[name].device)) if name in self._max else v

    def result(self) -> dict[str, float]:
        out = {k: float(self._sum[k]) / self._weight[k] for k in self._sum if self._weight[k] > 0}
        out.update({k: float(v) for k, v in self._max.items()})
        return out
