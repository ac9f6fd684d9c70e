"""aggregate_loss / loss_normalizer: loop references, micro-batch sums, gradients."""

from __future__ import annotations

import pytest
import torch

from tre_lightning.ppo import LOSS_AGGREGATIONS, aggregate_loss, loss_normalizer

CASES = [(b, t, s) for (b, t) in [(1, 1), (2, 3), (4, 7), (6, 12)] for s in (0, 1, 2)]
MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def ref_aggregate(loss, lengths, mode, norm_length):
    """Loops over sequences and tokens; sequences without a valid token do not count."""
    seq_sums, seq_lens = [], []
    for b, n in enumerate(lengths):
        s = 0.0
        for t in range(n):
            s += float(loss[b, t])
        seq_sums.append(s)
        seq_lens.append(n)
    nonempty = [i for i, n in enumerate(seq_lens) if n > 0]
    if mode == "token-mean":
        return sum(seq_sums) / sum(seq_lens)
    if mode == "seq-mean-token-sum":
        return sum(seq_sums[i] for i in nonempty) / len(nonempty)
    if mode == "seq-mean-token-mean":
        return sum(seq_sums[i] / seq_lens[i] for i in nonempty) / len(nonempty)
    assert mode == "seq-mean-token-sum-norm"
    return sum(seq_sums[i] / norm_length for i in nonempty) / len(nonempty)


@pytest.mark.parametrize(("batch", "length", "seed"), CASES)
@pytest.mark.parametrize("mode", MODES)
def test_matches_loop_reference(rb, batch, length, seed, mode):
    g = rb.gen(seed)
    lengths = rb.lengths(batch, length, g)
    mask = rb.mask(lengths, length)
    loss = rb.with_garbage(rb.randn(g, (batch, length)), mask, g)
    out = aggregate_loss(loss, mask, mode)
    assert out.dim() == 0
    assert out.item() == pytest.approx(ref_aggregate(loss, lengths, mode, length), rel=1e-12, abs=1e-12)
    if mode == "seq-mean-token-sum-norm":
        custom = aggregate_loss(loss, mask, mode, norm_length=4096)
        assert custom.item() == pytest.approx(ref_aggregate(loss, lengths, mode, 4096), rel=1e-12, abs=1e-12)


def test_hand_case():
    # rows [1, 2, 3] (3 tokens) and [4] (1 token), L = T = 3
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((6 + 4) / (2 * 3))
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_length=5).item() == pytest.approx(1.0)
    assert aggregate_loss(loss, mask, "token-mean", normalizer=8).item() == pytest.approx(10 / 8)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean", normalizer=4.0).item() == pytest.approx(6 / 4)


def test_empty_rows_and_empty_mask():
    loss = torch.tensor([[1.0, 2.0], [7.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    # the all-padding row does not count as a sequence
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(3.0)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(1.5)
    for mode in MODES:
        out = aggregate_loss(loss, torch.zeros_like(mask), mode)
        assert out.item() == 0.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_batches_sum_to_mini_batch(rb, mode, seed):
    g = rb.gen(seed)
    lengths = rb.lengths(8, 10, g)
    lengths[3] = 0  # an all-padding row inside one micro-batch
    mask = rb.mask(lengths, 10)
    loss = rb.with_garbage(rb.randn(g, (8, 10)), mask, g)
    full = aggregate_loss(loss, mask, mode)
    # the mini-batch's denominator, counted by hand
    tokens = sum(lengths)
    sequences = sum(1 for n in lengths if n > 0)
    normalizer = tokens if mode == "token-mean" else sequences
    assert loss_normalizer(mask, mode).item() == normalizer
    splits = [(0, 3), (3, 5), (5, 8)]  # uneven micro-batches
    total = sum(aggregate_loss(loss[a:b], mask[a:b], mode, normalizer=normalizer) for a, b in splits)
    torch.testing.assert_close(total, full)
    total_t = sum(
        aggregate_loss(loss[a:b], mask[a:b], mode, normalizer=loss_normalizer(mask, mode)) for a, b in splits
    )
    torch.testing.assert_close(total_t, full)
    if mode != "seq-mean-token-sum-norm":
        # the default per-micro-batch denominators do NOT add up (which is why `normalizer` exists)
        naive = sum(aggregate_loss(loss[a:b], mask[a:b], mode) for a, b in splits) / len(splits)
        assert abs(naive.item() - full.item()) > 1e-6


def test_micro_batch_gradients_accumulate_to_mini_batch(rb):
    g = rb.gen(4)
    lengths = [5, 2, 7, 1, 3, 6]
    mask = rb.mask(lengths, 7)
    base = rb.randn(g, (6, 7))
    p1 = base.clone().requires_grad_(True)
    aggregate_loss(p1 * 2.0, mask).backward()
    p2 = base.clone().requires_grad_(True)
    for a, b in [(0, 2), (2, 3), (3, 6)]:
        aggregate_loss(p2[a:b] * 2.0, mask[a:b], normalizer=sum(lengths)).backward()
    torch.testing.assert_close(p1.grad, p2.grad)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(rb, mode):
    g = rb.gen(1)
    lengths = [4, 1, 3]
    mask = rb.mask(lengths, 4)
    loss = rb.randn(g, (3, 4)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: aggregate_loss(x, mask, mode), (loss,))
    assert torch.autograd.gradcheck(lambda x: aggregate_loss(x, mask, mode, normalizer=7.0), (loss,))


def test_low_precision():
    loss = torch.full((4, 300), 0.01, dtype=torch.bfloat16)
    mask = torch.ones(4, 300)
    out = aggregate_loss(loss, mask, "seq-mean-token-sum")
    assert out.dtype == torch.bfloat16
    # 300 * bf16(0.01) summed in float32, then rounded once
    assert out.item() == pytest.approx(300 * float(torch.tensor(0.01, dtype=torch.bfloat16)), rel=2**-7)


def test_invalid_arguments(arg_error):
    a, m = torch.zeros(2, 3), torch.ones(2, 3)
    modes = "one of ['token-mean', 'seq-mean-token-sum', 'seq-mean-token-mean', 'seq-mean-token-sum-norm']"
    with arg_error("mode", modes):
        aggregate_loss(a, m, "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"per_token and mask .*\(2, 3\).*\(2, 4\)"):
        aggregate_loss(a, torch.ones(2, 4))
    with arg_error("normalizer", "a finite number > 0"):
        aggregate_loss(a, m, normalizer=0)
    with arg_error("normalizer", "a finite number > 0"):
        aggregate_loss(a, m, normalizer=-3.0)
    with arg_error("normalizer", "a finite number > 0"):
        aggregate_loss(a, m, normalizer="7")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalizer must be a scalar"):
        aggregate_loss(a, m, normalizer=torch.ones(2))
    with arg_error("norm_length", "an int >= 1"):
        aggregate_loss(a, m, "seq-mean-token-sum-norm", norm_length=0)
    with arg_error("norm_length", "an int >= 1"):
        aggregate_loss(a, m, "seq-mean-token-sum-norm", norm_length=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_token must be 2-D"):
        aggregate_loss(torch.zeros(3), torch.ones(3))
    with arg_error("mode", modes):
        loss_normalizer(m, "mean")  # type: ignore[arg-type]
    assert list(LOSS_AGGREGATIONS) == MODES
