"""masked_sum / masked_mean / masked_max / masked_var / masked_whiten against explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from tre_lightning.ppo import masked_max, masked_mean, masked_sum, masked_var, masked_whiten

CASES = [(b, t, s) for (b, t) in [(1, 2), (2, 3), (4, 7), (6, 12)] for s in (0, 1, 2)]


# ---------------------------------------------------------------- references
def ref_sum_mean(x, lengths):
    """Total sum, total mean, per-row sums and per-row means over the first lengths[b] tokens."""
    total, count, row_sums, row_means = 0.0, 0, [], []
    for b, n in enumerate(lengths):
        s = 0.0
        for t in range(n):
            s += float(x[b, t])
        row_sums.append(s)
        row_means.append(s / n if n else 0.0)
        total += s
        count += n
    return total, total / count, row_sums, row_means


def ref_var(x, lengths, unbiased):
    vals = [float(x[b, t]) for b, n in enumerate(lengths) for t in range(n)]
    mean = sum(vals) / len(vals)
    ss = sum((v - mean) ** 2 for v in vals)
    return ss / (len(vals) - 1) if unbiased else ss / len(vals)


def ref_whiten(x, lengths, shift_mean, eps=1e-8):
    vals = [float(x[b, t]) for b, n in enumerate(lengths) for t in range(n)]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for b, n in enumerate(lengths):
        for t in range(n):
            w = (float(x[b, t]) - mean) / math.sqrt(var + eps)
            out[b, t] = w if shift_mean else w + mean
    return out


# ---------------------------------------------------------------- random vs loops
@pytest.mark.parametrize(("batch", "length", "seed"), CASES)
def test_max_matches_loops(rb, batch, length, seed):
    g = rb.gen(seed)
    lengths = rb.lengths(batch, length, g)
    mask = rb.mask(lengths, length)
    x = rb.with_garbage(rb.randn(g, (batch, length), 3.0), mask, g)  # garbage up to 1e4 in the padding
    vals = [float(x[b, t]) for b, n in enumerate(lengths) for t in range(n)]
    assert masked_max(x, mask).item() == max(vals)
    assert masked_max(x, mask.bool()).item() == max(vals)
    rows = [max(float(x[b, t]) for t in range(n)) for b, n in enumerate(lengths)]
    assert masked_max(x, mask, dim=1).tolist() == rows


def test_max_of_an_empty_selection_is_zero_and_weights_do_not_matter():
    x = torch.tensor([[-3.0, -1.0, 7.0], [-2.0, -5.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.25, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert masked_max(x, mask).item() == -1.0  # a fractional weight still selects
    assert masked_max(x, mask, dim=1).tolist() == [-1.0, 0.0]
    assert masked_max(x, torch.zeros_like(x)).item() == 0.0
    assert masked_max(x.float(), mask).dtype == torch.float32


@pytest.mark.parametrize(("batch", "length", "seed"), CASES)
def test_sum_and_mean_match_loops(rb, batch, length, seed):
    g = rb.gen(seed)
    lengths = rb.lengths(batch, length, g)
    mask = rb.mask(lengths, length)
    x = rb.with_garbage(rb.randn(g, (batch, length), 3.0), mask, g)
    total, mean, row_sums, row_means = ref_sum_mean(x, lengths)
    torch.testing.assert_close(masked_sum(x, mask), torch.tensor(total, dtype=torch.float64))
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(mean, dtype=torch.float64))
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor(row_sums, dtype=torch.float64))
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor(row_means, dtype=torch.float64))
    # per column (dim=0): sum over rows whose length exceeds t
    col = [sum(float(x[b, t]) for b in range(batch) if lengths[b] > t) for t in range(length)]
    torch.testing.assert_close(masked_sum(x, mask, dim=0), torch.tensor(col, dtype=torch.float64))


@pytest.mark.parametrize(("batch", "length", "seed"), [c for c in CASES if c[0] * c[1] > 2])
@pytest.mark.parametrize("unbiased", [True, False])
def test_var_matches_loops(rb, batch, length, seed, unbiased):
    g = rb.gen(seed)
    lengths = rb.lengths(batch, length, g, min_len=2 if length > 1 else 1)
    mask = rb.mask(lengths, length)
    x = rb.with_garbage(rb.randn(g, (batch, length), 2.0) + 5.0, mask, g)
    expected = ref_var(x, lengths, unbiased)
    torch.testing.assert_close(masked_var(x, mask, unbiased=unbiased), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(("batch", "length", "seed"), [c for c in CASES if c[0] * c[1] > 2])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_loops(rb, batch, length, seed, shift_mean):
    g = rb.gen(seed)
    lengths = rb.lengths(batch, length, g, min_len=2 if length > 1 else 1)
    mask = rb.mask(lengths, length)
    x = rb.with_garbage(rb.randn(g, (batch, length), 2.0) - 1.0, mask, g)
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(out, ref_whiten(x, lengths, shift_mean))


# ---------------------------------------------------------------- hand-computed
def test_whiten_hand_case():
    # valid values 1, 2, 3: mean 2, unbiased var ((1)^2 + 0 + (1)^2) / 2 = 1 -> -1, 0, 1
    x = torch.tensor([[1.0, 2.0, 777.0], [3.0, -5.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    expected = torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64) / math.sqrt(1 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask), expected)
    # biased variance 2/3; unbiased 1
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), torch.tensor(2 / 3, dtype=torch.float64))
    torch.testing.assert_close(masked_var(x, mask), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(masked_sum(x, mask), torch.tensor(6.0, dtype=torch.float64))


def test_padding_has_no_influence(rb):
    g = rb.gen(7)
    lengths = [5, 2, 4, 1]
    mask = rb.mask(lengths, 6)
    x = rb.randn(g, (4, 6))
    a = rb.with_garbage(x, mask, g, magnitude=1e6)
    b = rb.with_garbage(x, mask, g, magnitude=3.0)
    c = torch.where(mask.bool(), x, torch.full_like(x, float("inf")))  # even inf must not leak
    for fn in (masked_sum, masked_mean, masked_var):
        torch.testing.assert_close(fn(a, mask), fn(b, mask))
        torch.testing.assert_close(fn(a, mask), fn(c, mask))
    wa, wb, wc = masked_whiten(a, mask), masked_whiten(b, mask), masked_whiten(c, mask)
    torch.testing.assert_close(wa, wb)
    torch.testing.assert_close(wa, wc)
    assert torch.all(wa[~mask.bool()] == 0)
    torch.testing.assert_close(masked_mean(a, mask, dim=1), masked_mean(c, mask, dim=1))


def test_bool_and_float_masks_agree(rb):
    g = rb.gen(3)
    mask = rb.mask([3, 1, 4], 4)
    x = rb.randn(g, (3, 4))
    for fn in (masked_sum, masked_mean, masked_var, masked_whiten):
        torch.testing.assert_close(fn(x, mask), fn(x, mask.bool()))


def test_fractional_mask_is_a_weighted_mean():
    x = torch.tensor([[2.0, 4.0, 100.0]], dtype=torch.float64)
    w = torch.tensor([[0.1, 0.3, 0.0]], dtype=torch.float64)
    # (0.1*2 + 0.3*4) / (0.1 + 0.3) = 1.4 / 0.4 = 3.5 (weights summing to < 1 are not clamped to 1)
    torch.testing.assert_close(masked_mean(x, w), torch.tensor(3.5, dtype=torch.float64))
    torch.testing.assert_close(masked_sum(x, w), torch.tensor(1.4, dtype=torch.float64))


def test_empty_selection():
    x = torch.randn(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert masked_mean(x, torch.zeros_like(x)).item() == 0.0
    assert masked_sum(x, torch.zeros_like(x)).item() == 0.0
    row = masked_mean(x, mask, dim=1)
    assert row[1].item() == 0.0 and not torch.isnan(row).any()
    with pytest.raises(ValueError, match="mask"):
        masked_var(x, torch.zeros_like(x))
    one = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="unbiased"):
        masked_var(x, one)
    assert masked_var(x, one, unbiased=False).item() == 0.0


def test_low_precision_accumulates_in_float32(rb):
    g = rb.gen(11)
    lengths = [300, 257, 64]
    mask = rb.mask(lengths, 300)
    x64 = rb.randn(g, (3, 300)) * 0.1 + 1.0
    x16 = x64.to(torch.bfloat16)
    exact = ref_sum_mean(x16.double(), lengths)
    out = masked_mean(x16, mask)
    assert out.dtype == torch.bfloat16
    # the true mean of the bf16 values, rounded once to bf16
    assert out.item() == pytest.approx(exact[1], rel=2**-7)
    w = masked_whiten(x16, mask)
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w.double(), ref_whiten(x16.double(), lengths, True), atol=0.05, rtol=0.02)


# ---------------------------------------------------------------- validation
def test_invalid_arguments(arg_error):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"x and mask .*\(2, 3\).*\(2, 4\)"):
        masked_mean(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"x and mask .*\(2, 3\).*\(3,\)"):
        masked_sum(x, torch.ones(3))
    with arg_error("dim", "an int in [-2, 1] or null"):
        masked_sum(x, torch.ones(2, 3), dim=2)
    with arg_error("dim", "an int in [-2, 1] or null"):
        masked_mean(x, torch.ones(2, 3), dim=1.0)  # type: ignore[arg-type]
    with arg_error("eps", "a finite number >= 0"):
        masked_whiten(torch.randn(2, 3), torch.ones(2, 3), eps=-1e-8)
    with pytest.raises(ValueError, match="x must be a floating-point"):
        masked_mean(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(TypeError, match="mask"):
        masked_mean(x, [[1, 1, 1], [1, 1, 1]])  # type: ignore[arg-type]
