"""clipped_policy_loss / clipped_value_loss against piecewise references, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from tre_lightning.ppo import aggregate_loss, clipped_policy_loss, clipped_value_loss

CASES = [(b, t, s) for (b, t) in [(1, 1), (2, 3), (4, 7), (6, 12)] for s in (0, 1, 2)]
CLIPS = [(0.2, 0.2, None), (0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.1, 0.3, 1.5)]


# ---------------------------------------------------------------- references
def ref_policy(logp, old, adv, lengths, eps_low, eps_high, dual, bound=20.0):
    """Piecewise form of the surrogate, written per case rather than with max/min of branches.

    A > 0: -A * min(r, 1 + eps_high)              (clipped iff r > 1 + eps_high)
    A < 0: |A| * max(r, 1 - eps_low)              (clipped iff r < 1 - eps_low)
           then with dual clip c: min(., |A| c)   (dual active iff |A| max(r, 1 - eps_low) > |A| c)
    A = 0: 0
    Also returns the (B, T) bool mask of the eps-clipped tokens (False on padding).
    """
    per = torch.zeros(logp.shape, dtype=torch.float64)
    clip_mask = torch.zeros(logp.shape, dtype=torch.bool)
    n_valid = n_clip = n_dual = 0
    kl = 0.0
    for b, n in enumerate(lengths):
        for t in range(n):
            d = min(max(float(logp[b, t]) - float(old[b, t]), -bound), bound)
            r, a = math.exp(d), float(adv[b, t])
            if a > 0:
                loss = -a * min(r, 1 + eps_high)
                clip_mask[b, t] = r > 1 + eps_high
            elif a < 0:
                loss = -a * max(r, 1 - eps_low)
                clip_mask[b, t] = r < 1 - eps_low
                if dual is not None and loss > -a * dual:
                    loss = -a * dual
                    n_dual += 1
            else:
                loss = 0.0
            per[b, t] = loss
            n_clip += bool(clip_mask[b, t])
            kl += -d
            n_valid += 1
    return per, n_clip / n_valid, n_dual / n_valid, kl / n_valid, clip_mask


def ref_value(values, old, returns, lengths, clip_range, scale):
    per = torch.zeros(values.shape, dtype=torch.float64)
    n_valid = n_clip = 0
    for b, n in enumerate(lengths):
        for t in range(n):
            v, vo, ret = float(values[b, t]), float(old[b, t]), float(returns[b, t])
            unclipped = (v - ret) ** 2
            if clip_range is None:
                loss = unclipped
            else:
                vc = vo + min(max(v - vo, -clip_range), clip_range)
                clipped = (vc - ret) ** 2
                loss = max(unclipped, clipped)
                n_clip += clipped > unclipped
            per[b, t] = scale * loss
            n_valid += 1
    return per, n_clip / n_valid


def _policy_batch(rb, batch, length, seed):
    g = rb.gen(seed)
    lengths = rb.lengths(batch, length, g)
    mask = rb.mask(lengths, length)
    old = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 4
    logp = rb.with_garbage(old + rb.randn(g, (batch, length), 0.7), mask, g)  # ratios spread over e^{±2}
    adv = rb.randn(g, (batch, length))
    adv[0, 0] = 0.0  # an A = 0 token
    return lengths, mask, logp, old, adv


# ---------------------------------------------------------------- policy loss
@pytest.mark.parametrize(("batch", "length", "seed"), CASES)
@pytest.mark.parametrize(("eps_low", "eps_high", "dual"), CLIPS)
def test_policy_loss_matches_reference(rb, batch, length, seed, eps_low, eps_high, dual):
    lengths, mask, logp, old, adv = _policy_batch(rb, batch, length, seed)
    out = clipped_policy_loss(
        logp, old, adv, mask, clip_ratio_low=eps_low, clip_ratio_high=eps_high, dual_clip=dual
    )
    per, clipfrac, clipfrac_lower, approx_kl, clip_mask = ref_policy(logp, old, adv, lengths, eps_low, eps_high, dual)
    torch.testing.assert_close(out.per_token, per)
    assert out.clipped.dtype == torch.bool and torch.equal(out.clipped, clip_mask)
    assert out.clipfrac.item() == pytest.approx(clipfrac, abs=1e-12)
    assert out.clipfrac_lower.item() == pytest.approx(clipfrac_lower, abs=1e-12)
    assert out.approx_kl.item() == pytest.approx(approx_kl, abs=1e-12)


def test_policy_loss_hand_case():
    # eps = 0.2, c = 3; tokens (A, r):
    #   ( 1, 1.5): max(-1.5, -1.2) = -1.2          clipped
    #   (-1, 0.5): max( 0.5,  0.8) =  0.8          clipped
    #   (-1, 4.0): max( 4.0,  1.2) =  4.0 -> min(4, 3) = 3   dual clip
    #   ( 1, 0.5): max(-0.5, -0.8) = -0.5          not clipped
    #   ( 2, 1.1): -2.2                            not clipped
    #   padding
    ratios = torch.tensor([[1.5, 0.5, 4.0, 0.5, 1.1, 1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 2.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.float64)
    old = torch.full_like(ratios, -1.0)
    out = clipped_policy_loss(old + ratios.log(), old, adv, mask, dual_clip=3.0)
    torch.testing.assert_close(out.per_token, torch.tensor([[-1.2, 0.8, 3.0, -0.5, -2.2, 0.0]], dtype=torch.float64))
    assert out.clipfrac.item() == pytest.approx(2 / 5)
    # the eps-clipped tokens, before the dual clip (the third token is dual-clipped only)
    assert out.clipped.tolist() == [[True, True, False, False, False, False]]
    assert out.clipfrac_lower.item() == pytest.approx(1 / 5)
    expected_kl = -sum(math.log(r) for r in (1.5, 0.5, 4.0, 0.5, 1.1)) / 5
    assert out.approx_kl.item() == pytest.approx(expected_kl)
    # without dual clip the third token keeps its 4.0 and clipfrac_lower is 0
    plain = clipped_policy_loss(old + ratios.log(), old, adv, mask)
    assert plain.per_token[0, 2].item() == pytest.approx(4.0)
    assert plain.clipfrac_lower.item() == 0.0


def test_log_ratio_clamp():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.tensor([[30.0, -30.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    out = clipped_policy_loss(logp, old, adv, torch.ones(1, 2))
    # r = e^{20} (not e^{30}) for the first token; e^{-20} for the second
    assert out.per_token[0, 0].item() == pytest.approx(math.exp(20.0))
    assert out.per_token[0, 1].item() == pytest.approx(-math.exp(-20.0))
    assert out.approx_kl.item() == pytest.approx(0.0)  # (-20 + 20) / 2 with the clamped log-ratio
    small = clipped_policy_loss(logp, old, adv, torch.ones(1, 2), log_ratio_clamp=2.0)
    assert small.per_token[0, 0].item() == pytest.approx(math.exp(2.0))


def _away_from_kinks(seed, shape=(3, 5)):
    """Ratios and advantages at least 0.05 away from every kink (0.8, 1.2, 3 for eps 0.2, c 3; A = 0)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([0.5, 0.7, 0.9, 1.0, 1.1, 1.3, 2.0, 4.0], dtype=torch.float64)
    ratios = grid[torch.randint(0, len(grid), shape, generator=g)]
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
    adv = sign * (0.3 + torch.rand(shape, generator=g, dtype=torch.float64))
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    return old + ratios.log(), old, adv, ratios


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_policy_loss_gradcheck(seed, dual):
    logp, old, adv, _ = _away_from_kinks(seed)
    mask = torch.ones_like(logp)
    mask[-1, 3:] = 0
    logp.requires_grad_(True)
    adv.requires_grad_(True)

    def fn(lp, a):
        return aggregate_loss(clipped_policy_loss(lp, old, a, mask, dual_clip=dual).per_token, mask)

    assert torch.autograd.gradcheck(fn, (logp, adv))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipped_tokens_get_zero_gradient(seed):
    logp, old, adv, ratios = _away_from_kinks(seed, shape=(4, 8))
    mask = torch.ones_like(logp)
    mask[2, 5:] = 0
    logp.requires_grad_(True)
    clipped_policy_loss(logp, old, adv, mask, dual_clip=3.0).per_token.sum().backward()
    grad = logp.grad
    for b in range(4):
        for t in range(8):
            r, a = float(ratios[b, t]), float(adv[b, t])
            clipped = (a > 0 and r > 1.2) or (a < 0 and r < 0.8) or (a < 0 and r > 3.0)
            if mask[b, t] == 0 or clipped:
                assert grad[b, t].item() == 0.0, (b, t, r, a)
            else:
                # d(-A r)/d logp = -A r
                assert grad[b, t].item() == pytest.approx(-a * r, rel=1e-9)


def test_policy_padding_has_no_influence(rb):
    lengths, mask, logp, old, adv = _policy_batch(rb, 4, 6, 0)
    g = rb.gen(99)
    a = clipped_policy_loss(logp, old, adv, mask, dual_clip=3.0)
    b = clipped_policy_loss(
        rb.with_garbage(logp, mask, g), rb.with_garbage(old, mask, g), rb.with_garbage(adv, mask, g), mask.bool(),
        dual_clip=3.0,
    )
    for field in ("per_token", "clipfrac", "clipfrac_lower", "approx_kl"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field))
    assert torch.all(a.per_token[~mask.bool()] == 0)


def test_policy_metrics_are_detached_and_dtype():
    logp = torch.randn(2, 3, requires_grad=True)
    out = clipped_policy_loss(logp, torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), dual_clip=3.0)
    assert out.per_token.requires_grad and out.per_token.dtype == torch.float32
    for m in (out.clipfrac, out.clipfrac_lower, out.approx_kl):
        assert m.dim() == 0 and not m.requires_grad


def test_policy_invalid_arguments(arg_error):
    a, m = torch.zeros(2, 3), torch.ones(2, 3)
    with arg_error("clip_ratio_low", "a finite number in [0, 1)"):
        clipped_policy_loss(a, a, a, m, clip_ratio_low=-0.1)
    with arg_error("clip_ratio_low", "a finite number in [0, 1)"):
        clipped_policy_loss(a, a, a, m, clip_ratio_low=1.0)
    with arg_error("clip_ratio_high", "a finite number >= 0"):
        clipped_policy_loss(a, a, a, m, clip_ratio_high=-0.2)
    for bad in (1.0, 0.5, -3.0):
        with arg_error("dual_clip", "a finite number > 1 or null"):
            clipped_policy_loss(a, a, a, m, dual_clip=bad)
    with arg_error("log_ratio_clamp", "a finite number > 0"):
        clipped_policy_loss(a, a, a, m, log_ratio_clamp=0.0)
    with pytest.raises(ValueError, match=r"log_probs and old_log_probs .*\(2, 3\).*\(2, 4\)"):
        clipped_policy_loss(a, torch.zeros(2, 4), a, m)
    with pytest.raises(ValueError, match=r"log_probs and advantages .*\(2, 3\).*\(1, 3\)"):
        clipped_policy_loss(a, a, torch.zeros(1, 3), m)
    with pytest.raises(ValueError, match=r"log_probs and mask .*\(2, 3\).*\(2, 2\)"):
        clipped_policy_loss(a, a, a, torch.ones(2, 2))


# ---------------------------------------------------------------- value loss
@pytest.mark.parametrize(("batch", "length", "seed"), CASES)
@pytest.mark.parametrize(("clip_range", "scale"), [(0.5, 0.5), (0.2, 1.0), (None, 0.5)])
def test_value_loss_matches_reference(rb, batch, length, seed, clip_range, scale):
    g = rb.gen(seed)
    lengths = rb.lengths(batch, length, g)
    mask = rb.mask(lengths, length)
    old = rb.randn(g, (batch, length))
    values = rb.with_garbage(old + rb.randn(g, (batch, length), 0.8), mask, g)
    returns = rb.with_garbage(rb.randn(g, (batch, length), 1.5), mask, g)
    out = clipped_value_loss(values, old, returns, mask, clip_range=clip_range, scale=scale)
    per, clipfrac = ref_value(values, old, returns, lengths, clip_range, scale)
    torch.testing.assert_close(out.per_token, per)
    assert out.vf_clipfrac.item() == pytest.approx(clipfrac, abs=1e-12)


def test_value_loss_hand_case():
    # c = 0.5, scale 0.5, old = 0:
    #   v = 1.0, R = 2.0: unclipped 1, clipped (0.5 - 2)^2 = 2.25 -> 0.5 * 2.25 = 1.125 (clipped)
    #   v = 1.0, R = 0.0: unclipped 1, clipped 0.25 -> 0.5                               (not clipped)
    #   v = 0.3, R = 1.3: inside the range -> 0.5 * 1 = 0.5
    values = torch.tensor([[1.0, 1.0, 0.3]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 0.0, 1.3]], dtype=torch.float64)
    out = clipped_value_loss(values, torch.zeros_like(values), returns, torch.ones_like(values))
    torch.testing.assert_close(out.per_token, torch.tensor([[1.125, 0.5, 0.5]], dtype=torch.float64))
    assert out.vf_clipfrac.item() == pytest.approx(1 / 3)


def _value_away_from_kinks(seed, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    dv = torch.tensor([-1.0, -0.2, 0.2, 1.0], dtype=torch.float64)[torch.randint(0, 4, shape, generator=g)]
    dr = torch.tensor([-2.0, -0.3, 0.3, 2.0], dtype=torch.float64)[torch.randint(0, 4, shape, generator=g)]
    old = torch.randn(shape, generator=g, dtype=torch.float64)
    return old + dv, old, old + dr, dv, dr


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("clip_range", [0.5, None])
def test_value_loss_gradcheck(seed, clip_range):
    values, old, returns, _, _ = _value_away_from_kinks(seed)
    mask = torch.ones_like(values)
    mask[0, 2:] = 0
    values.requires_grad_(True)

    def fn(v):
        return aggregate_loss(clipped_value_loss(v, old, returns, mask, clip_range=clip_range).per_token, mask)

    assert torch.autograd.gradcheck(fn, (values,))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_clipped_tokens_get_zero_gradient(seed):
    values, old, returns, dv, dr = _value_away_from_kinks(seed, shape=(4, 6))
    mask = torch.ones_like(values)
    mask[1, 4:] = 0
    values.requires_grad_(True)
    clipped_value_loss(values, old, returns, mask, clip_range=0.5, scale=0.5).per_token.sum().backward()
    for b in range(4):
        for t in range(6):
            v, r = float(dv[b, t]), float(dr[b, t])  # relative to old
            vc = min(max(v, -0.5), 0.5)
            if mask[b, t] == 0 or (vc - r) ** 2 > (v - r) ** 2:
                assert values.grad[b, t].item() == 0.0
            else:
                assert values.grad[b, t].item() == pytest.approx(0.5 * 2 * (v - r), rel=1e-9)


def test_value_invalid_arguments(arg_error):
    a, m = torch.zeros(2, 3), torch.ones(2, 3)
    with arg_error("clip_range", "a finite number > 0 or null"):
        clipped_value_loss(a, a, a, m, clip_range=0.0)
    with arg_error("clip_range", "a finite number > 0 or null"):
        clipped_value_loss(a, a, a, m, clip_range=-0.5)
    with arg_error("scale", "a finite number > 0"):
        clipped_value_loss(a, a, a, m, scale=-1.0)
    with pytest.raises(ValueError, match=r"values and returns .*\(2, 3\).*\(3, 3\)"):
        clipped_value_loss(a, a, torch.zeros(3, 3), m)
    with pytest.raises(ValueError, match=r"values and old_values .*\(2, 3\).*\(2,\)"):
        clipped_value_loss(a, torch.zeros(2), a, m)
