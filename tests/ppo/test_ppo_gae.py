"""compute_gae against a per-sequence loop and hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from tre_lightning.ppo import compute_gae

CASES = [(b, t, s) for (b, t) in [(1, 1), (2, 3), (4, 7), (6, 12)] for s in (0, 1, 2)]
GAMMA_LAM = [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.0, 1.0)]


def ref_gae(rewards, values, lengths, gamma, lam):
    """One sequence at a time, token by token, V after the last valid token = 0."""
    batch, length = rewards.shape
    adv = torch.zeros(batch, length, dtype=torch.float64)
    ret = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        n = lengths[b]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(n)):
            v = float(values[b, t])
            delta = float(rewards[b, t]) + gamma * next_value - v
            a = delta + gamma * lam * next_adv
            adv[b, t] = a
            ret[b, t] = a + v
            next_value, next_adv = v, a
    return adv, ret


@pytest.mark.parametrize(("batch", "length", "seed"), CASES)
@pytest.mark.parametrize(("gamma", "lam"), GAMMA_LAM)
def test_matches_loop_reference(rb, batch, length, seed, gamma, lam):
    g = rb.gen(seed)
    lengths = rb.lengths(batch, length, g)
    mask = rb.mask(lengths, length)
    rewards = rb.with_garbage(rb.randn(g, (batch, length)), mask, g)
    values = rb.with_garbage(rb.randn(g, (batch, length)), mask, g)
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = ref_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_hand_case_gamma_lam_one():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.8], gamma = lam = 1, V after the last token = 0:
    #   delta_2 = 1 + 0   - 0.8 = 0.2      A_2 = 0.2
    #   delta_1 = 0 + 0.8 - 0.6 = 0.2      A_1 = 0.2 + 0.2 = 0.4
    #   delta_0 = 0 + 0.6 - 0.5 = 0.1      A_0 = 0.1 + 0.4 = 0.5
    #   returns = A + V = [1.0, 1.0, 1.0] (the undiscounted return-to-go)
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.8]], dtype=torch.float64)
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3))
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.4, 0.2]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64))


def test_hand_case_discounted_and_ragged():
    # row 0: r = [1, 0, 2], V = [1, 2, 0.5], gamma = lam = 0.5 (gamma*lam = 0.25)
    #   delta_2 = 2 + 0.5*0   - 0.5 =  1.5     A_2 =  1.5
    #   delta_1 = 0 + 0.5*0.5 - 2   = -1.75    A_1 = -1.75 + 0.25*1.5    = -1.375
    #   delta_0 = 1 + 0.5*2   - 1   =  1.0     A_0 =  1.0 + 0.25*(-1.375) = 0.65625
    #   returns = [1.65625, 0.625, 2.0]
    # row 1: one valid token, r = 3, V = 1, padding holds garbage: A = 3 - 1 = 2, return 3
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 50.0, -80.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 2.0, 0.5], [1.0, 1e4, -1e4]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.65625, -1.375, 1.5], [2.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[1.65625, 0.625, 2.0], [3.0, 0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gamma_lam_one_is_return_to_go_minus_value(rb, seed):
    # closed form for gamma = lam = 1: A_t = sum_{k >= t} r_k - V_t
    g = rb.gen(seed)
    lengths = rb.lengths(5, 9, g)
    mask = rb.mask(lengths, 9)
    rewards = rb.randn(g, (5, 9)) * mask
    values = rb.randn(g, (5, 9))
    adv, _ = compute_gae(rewards, values, mask)
    for b, n in enumerate(lengths):
        for t in range(n):
            togo = sum(float(rewards[b, k]) for k in range(t, n))
            assert float(adv[b, t]) == pytest.approx(togo - float(values[b, t]), abs=1e-12)


def test_padding_never_leaks(rb):
    g = rb.gen(5)
    lengths = [6, 3, 1, 4]
    mask = rb.mask(lengths, 6)
    rewards, values = rb.randn(g, (4, 6)), rb.randn(g, (4, 6))
    a1, r1 = compute_gae(rb.with_garbage(rewards, mask, g), rb.with_garbage(values, mask, g), mask)
    a2, r2 = compute_gae(rewards * mask, values * mask, mask.bool())
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)
    assert torch.all(a1[~mask.bool()] == 0) and torch.all(r1[~mask.bool()] == 0)
    # each row equals that row computed alone, truncated to its length
    for b, n in enumerate(lengths):
        a_row, _ = compute_gae(rewards[b : b + 1, :n], values[b : b + 1, :n], torch.ones(1, n))
        torch.testing.assert_close(a1[b, :n], a_row[0])


def test_no_gradient_and_dtypes():
    values = torch.randn(2, 4, requires_grad=True)
    adv, ret = compute_gae(torch.randn(2, 4), values, torch.ones(2, 4))
    assert not adv.requires_grad and not ret.requires_grad
    adv16, ret16 = compute_gae(torch.randn(2, 4).bfloat16(), torch.randn(2, 4).bfloat16(), torch.ones(2, 4))
    assert adv16.dtype == torch.bfloat16 and ret16.dtype == torch.bfloat16


def test_low_precision_recursion_in_float32(rb):
    # a long response: the bf16 result must be the float32 result rounded once, not an accumulation of bf16 errors
    g = rb.gen(0)
    length = 512
    rewards = (rb.randn(g, (2, length)) * 0.01).bfloat16()
    values = (rb.randn(g, (2, length)) * 0.01).bfloat16()
    mask = torch.ones(2, length)
    adv16, _ = compute_gae(rewards, values, mask)
    ref, _ = ref_gae(rewards.double(), values.double(), [length, length], 1.0, 1.0)
    torch.testing.assert_close(adv16.double(), ref, rtol=2**-7, atol=1e-3)


def test_invalid_arguments(arg_error):
    r, v, m = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    with arg_error("gamma", "a finite number in [0, 1]"):
        compute_gae(r, v, m, gamma=1.5)
    with arg_error("lam", "a finite number in [0, 1]"):
        compute_gae(r, v, m, lam=-0.1)
    # a non-number is an argument outside its range too (ArgumentError, a ValueError), not a TypeError
    with arg_error("gamma", "a finite number in [0, 1]"):
        compute_gae(r, v, m, gamma="0.9")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"token_rewards and values .*\(2, 3\).*\(2, 4\)"):
        compute_gae(r, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match=r"token_rewards and mask .*\(2, 3\).*\(3, 2\)"):
        compute_gae(r, v, torch.ones(3, 2))
    with pytest.raises(ValueError, match="token_rewards must be 2-D"):
        compute_gae(torch.zeros(3), torch.zeros(3), torch.ones(3))
    with arg_error("gamma", "a finite number in [0, 1]"):
        compute_gae(r, v, m, gamma=float("nan"))
