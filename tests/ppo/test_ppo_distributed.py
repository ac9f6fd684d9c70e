"""global_masked_whiten / global_loss_normalizer with W simulated ranks (threads and a fake all-reduce).

Each "rank" is a thread holding its own slice of a global batch; the fake
all-reduce sums the ranks' tensors behind a barrier, as a process group would.
The claims: whitening equals ``masked_whiten`` on the concatenated batch, and
averaging the ranks' gradients with the global normalizer gives the
single-process gradient of the global mini-batch loss (the per-rank
statistics the module used before do not).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tre_lightning.ppo import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    global_loss_normalizer,
    global_masked_whiten,
    loss_normalizer,
    masked_whiten,
)


class FakeGroup:
    """W threads; ``all_reduce(rank)`` returns the sum over ranks (same order everywhere)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def all_reduce(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total = total + other
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
            return total

        return reduce

    def run(self, fn: Callable[[int, Callable[[torch.Tensor], torch.Tensor]], Any]) -> list[Any]:
        results: list[Any] = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, self.all_reduce(rank))
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        if real or errors:
            raise (real or errors)[0]
        return results


def ragged_batch(rows: int, width: int, seed: int, scale: float = 3.0, offset: float = 5.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g, dtype=torch.float64) * scale + offset
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float().to(torch.float64)
    x = torch.where(mask.bool(), x, torch.full_like(x, float("inf")))  # padding garbage must not matter
    return x, mask


def split(x: torch.Tensor, mask: torch.Tensor, sizes: list[int]):
    """Rows into ranks; each rank's part cut to its own widest row (ranks pad independently)."""
    parts, start = [], 0
    for size in sizes:
        xs, ms = x[start : start + size], mask[start : start + size]
        width = max(1, int(ms.sum(dim=1).max())) if size else 1
        parts.append((xs[:, :width], ms[:, :width]))
        start += size
    return parts


@pytest.mark.parametrize("sizes", [[3, 5], [4, 4, 1], [1, 1, 6, 2]])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_global_whiten_equals_whitening_the_concatenated_batch(sizes: list[int], shift_mean: bool) -> None:
    x, mask = ragged_batch(sum(sizes), 9, seed=len(sizes))
    expected = masked_whiten(x, mask, shift_mean=shift_mean)
    parts = split(x, mask, sizes)
    group = FakeGroup(len(sizes))
    outs = group.run(lambda r, ar: global_masked_whiten(*parts[r], all_reduce=ar, shift_mean=shift_mean))
    assert group.calls == [2] * len(sizes)  # two passes: (sum, count), then centred squares
    start = 0
    for (xs, ms), out in zip(parts, outs, strict=True):
        ref = expected[start : start + len(xs), : xs.shape[1]]
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        assert torch.all(out[ms == 0] == 0)
        start += len(xs)
    # the per-rank statistic (what the module used to do) is visibly different
    big = max(range(len(sizes)), key=lambda r: float(parts[r][1].sum()))
    (xs, ms), start = parts[big], sum(sizes[:big])
    assert (masked_whiten(xs, ms) - expected[start : start + len(xs), : xs.shape[1]]).abs().max() > 1e-2


def test_global_whiten_float32_large_offset_two_pass() -> None:
    """Two passes (centred squares) keep float32 accurate where sum-of-squares would cancel."""
    x, mask = ragged_batch(8, 16, seed=7, scale=1.0, offset=1e4)
    expected = masked_whiten(x, mask)  # float64 reference
    parts = split(x.float(), mask.float(), [5, 3])
    outs = FakeGroup(2).run(lambda r, ar: global_masked_whiten(*parts[r], all_reduce=ar))
    got = torch.zeros_like(expected)
    got[:5, : parts[0][0].shape[1]] = outs[0].double()
    got[5:, : parts[1][0].shape[1]] = outs[1].double()
    assert (got - expected).abs().max() < 1e-2


def test_global_whiten_one_rank_and_no_all_reduce_are_masked_whiten() -> None:
    x, mask = ragged_batch(5, 7, seed=11)
    x, mask = x.float(), mask.float()
    assert torch.equal(global_masked_whiten(x, mask), masked_whiten(x, mask))
    assert torch.equal(global_masked_whiten(x, mask, all_reduce=lambda t: t.clone()), masked_whiten(x, mask))
    bf = x.where(mask.bool(), 0).bfloat16()
    assert torch.equal(global_masked_whiten(bf, mask, all_reduce=lambda t: t.clone()), masked_whiten(bf, mask))


def test_global_whiten_rank_without_tokens_and_too_few_tokens() -> None:
    x, mask = ragged_batch(4, 5, seed=2)
    empty = (torch.zeros(2, 3, dtype=x.dtype), torch.zeros(2, 3, dtype=x.dtype))
    parts = [(x, mask), empty]
    outs = FakeGroup(2).run(lambda r, ar: global_masked_whiten(*parts[r], all_reduce=ar))
    torch.testing.assert_close(outs[0], masked_whiten(x, mask), rtol=0, atol=1e-12)
    assert torch.equal(outs[1], torch.zeros(2, 3, dtype=x.dtype))
    one = torch.zeros(1, 3, dtype=x.dtype)
    one_mask = one.clone()
    one_mask[0, 0] = 1
    parts = [(one, one_mask), empty]
    with pytest.raises(ValueError, match="more than one element over all ranks"):
        FakeGroup(2).run(lambda r, ar: global_masked_whiten(*parts[r], all_reduce=ar))  # every rank raises


def _gradient_of(per_token_fn, mode: str, mask: torch.Tensor, normalizer: torch.Tensor | None, w: torch.Tensor):
    w = w.detach().clone().requires_grad_(True)
    loss = aggregate_loss(per_token_fn(w), mask, mode, normalizer=normalizer)
    (grad,) = torch.autograd.grad(loss, w)
    return loss.detach(), grad


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_averaged_rank_gradients_equal_the_global_mini_batch_gradient(mode: str) -> None:
    sizes = [2, 5, 3]  # unequal rows and (ragged) token counts per rank
    world = len(sizes)
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(sum(sizes), 8, 4, generator=g, dtype=torch.float64)
    _, mask = ragged_batch(sum(sizes), 8, seed=3)
    w0 = torch.randn(4, generator=g, dtype=torch.float64)

    def per_token(rows: slice):
        return lambda w: torch.tanh(feats[rows] @ w) ** 2

    def micro_grads(rows: slice, m: torch.Tensor, normalizer: torch.Tensor):  # gradient accumulation, 2 rows each
        loss, grad = 0.0, torch.zeros_like(w0)
        for s in range(rows.start, rows.stop, 2):
            sub = slice(s, min(s + 2, rows.stop))
            lo, gr = _gradient_of(per_token(sub), mode, mask[sub], normalizer, w0)
            loss, grad = loss + lo, grad + gr
        return loss, grad

    everything = slice(0, sum(sizes))
    single_loss, single_grad = micro_grads(everything, mask, loss_normalizer(mask, mode))
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    rows = [slice(bounds[r], bounds[r + 1]) for r in range(world)]

    def rank(r: int, ar):
        normalizer = global_loss_normalizer(mask[rows[r]], mode, all_reduce=ar, world_size=world)
        return normalizer, micro_grads(rows[r], mask[rows[r]], normalizer)

    results = FakeGroup(world).run(rank)
    assert all(torch.equal(res[0], results[0][0]) for res in results)  # the same denominator on every rank
    mean_loss = sum(res[1][0] for res in results) / world  # what sync_dist logs
    mean_grad = sum(res[1][1] for res in results) / world  # what FSDP / DDP give every rank
    torch.testing.assert_close(mean_grad, single_grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mean_loss, single_loss, rtol=1e-12, atol=1e-14)
    # the per-rank denominators are not the global update here (ragged ranks)
    per_rank = sum(micro_grads(rows[r], mask[rows[r]], loss_normalizer(mask[rows[r]], mode))[1]
                   for r in range(world)) / world
    assert (per_rank - single_grad).abs().max() > 1e-6


def test_global_loss_normalizer_single_process_and_arguments(arg_error) -> None:
    _, mask = ragged_batch(4, 6, seed=1)
    for mode in LOSS_AGGREGATIONS:
        assert torch.equal(global_loss_normalizer(mask, mode), loss_normalizer(mask, mode))
        assert torch.equal(global_loss_normalizer(mask, mode, all_reduce=lambda t: t.clone()),
                           loss_normalizer(mask, mode))
    assert float(global_loss_normalizer(mask, all_reduce=lambda t: 4 * t, world_size=4)) == float(mask.sum())
    with arg_error("world_size", "an int >= 1"):
        global_loss_normalizer(mask, world_size=0)
    with pytest.raises(ValueError, match="needs an all_reduce"):
        global_loss_normalizer(mask, world_size=2)
