"""What an exact resume needs besides weights and optimizer states: RNG streams and the data position.

Each PPO iteration reseeds torch from (run seed, iteration, process rank)
(:func:`step_seed`), so a resumed run samples exactly what the uninterrupted
run sampled. The global RNG states are still checkpointed
(:func:`rng_state`): user code that draws from them between iterations
(a callback, a reward function) must see the same numbers after a resume.
:class:`DataPosition` says where the next training batch starts; the data
module owns it and Lightning checkpoints it with the data module's state.
Everything here is tensors, ints and lists, so checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["DataPosition", "ResumeState", "rng_state", "set_rng_state", "step_seed"]


@dataclass
class DataPosition:
    """Where the next training batch starts: epoch and batch index within it."""

    epoch: int = 0
    batch: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, int]) -> DataPosition:
        return cls(epoch=int(state["epoch"]), batch=int(state["batch"]))


def rng_state() -> dict[str, Any]:
    """The torch, Python, NumPy (and CUDA, when initialised) RNG states as plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_seed(seed: int, step: int, rank: int) -> int:
    """A well-mixed 63-bit seed for (run seed, PPO iteration, process)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x % (1 << 63)


class ResumeState:
    """The RNG side of an exact resume.

    ``begin_iteration`` first restores the RNG states loaded from a
    checkpoint (once), then seeds the iteration and returns its private
    generator (mini-batch shuffles).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._pending: dict[str, Any] | None = None

    def begin_iteration(self, step: int, rank: int) -> torch.Generator:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None
        seed = step_seed(self.seed, step, rank)
        torch.manual_seed(seed)
        return torch.Generator().manual_seed(seed ^ 0x5DEECE66D)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pending = state.get("rng")
