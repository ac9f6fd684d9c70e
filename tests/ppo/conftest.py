"""Shared helpers for the PPO maths tests: ragged right-padded batches, argument errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import SimpleNamespace

import pytest
import torch

from tre_lightning.checks import ArgumentError


def _lengths(batch: int, length: int, g: torch.Generator, min_len: int = 1) -> list[int]:
    """Random lengths in [min_len, length]; the first row is full, the last is shortest."""
    lengths = torch.randint(min_len, length + 1, (batch,), generator=g).tolist()
    lengths[0] = length
    if batch > 1:
        lengths[-1] = min_len
    return lengths


def _mask(lengths: list[int], length: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    mask = torch.zeros(len(lengths), length, dtype=dtype)
    for b, n in enumerate(lengths):
        for t in range(n):
            mask[b, t] = 1
    return mask


def _randn(g: torch.Generator, shape: tuple[int, ...], scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=dtype) * scale


def _with_garbage(x: torch.Tensor, mask: torch.Tensor, g: torch.Generator, magnitude: float = 1e4) -> torch.Tensor:
    """A copy of ``x`` with large finite random values in the padding."""
    noise = (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1).to(x.dtype) * magnitude
    return torch.where(mask.bool(), x, noise)


@pytest.fixture
def rb() -> SimpleNamespace:
    """Ragged-batch helpers: lengths, mask, randn, with_garbage, generator."""
    return SimpleNamespace(
        lengths=_lengths,
        mask=_mask,
        randn=_randn,
        with_garbage=_with_garbage,
        gen=lambda seed: torch.Generator().manual_seed(seed),
    )


@contextmanager
def _argument_error(param: str, allowed: str) -> Iterator[None]:
    with pytest.raises(ArgumentError) as info:
        yield
    assert (info.value.param, info.value.allowed) == (param, allowed), str(info.value)
    assert str(info.value).startswith(f"{param} must be {allowed}, got ")


@pytest.fixture
def arg_error() -> Callable[[str, str], AbstractContextManager[None]]:
    """``with arg_error("gamma", "a finite number in [0, 1]"):`` expects exactly that ArgumentError."""
    return _argument_error
