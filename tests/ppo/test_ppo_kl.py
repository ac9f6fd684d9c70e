"""sampled_kl: the direction, each estimator against a per-element reference, clamps, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from tre_lightning.ppo import KL_ESTIMATORS, sampled_kl


def ref_kl(logp: float, ref: float, estimator: str, clamp: float | None) -> float:
    d = logp - ref
    if estimator == "k1":
        return d
    if estimator == "abs":
        return abs(d)
    if estimator == "k2":
        return 0.5 * d * d
    x = min(max(ref - logp, -20.0), 20.0)
    k3 = math.exp(x) - x - 1.0
    return k3 if clamp is None else min(max(k3, -clamp), clamp)


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
@pytest.mark.parametrize("clamp", [10.0, None, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_elementwise_reference(rb, estimator, clamp, seed):
    g = rb.gen(seed)
    logp = -torch.rand(3, 7, generator=g, dtype=torch.float64) * 6
    ref = -torch.rand(3, 7, generator=g, dtype=torch.float64) * 6
    out = sampled_kl(logp, ref, estimator, clamp=clamp)
    for b in range(3):
        for t in range(7):
            expected = ref_kl(float(logp[b, t]), float(ref[b, t]), estimator, clamp)
            assert float(out[b, t]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_hand_case():
    # logp = -1, ref = -2: d = 1 -> k1 = 1, abs = 1, k2 = 0.5, k3 = e^{-1} - (-1) - 1 = e^{-1}
    logp, ref = torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([[-2.0]], dtype=torch.float64)
    assert sampled_kl(logp, ref, "k1").item() == pytest.approx(1.0)
    assert sampled_kl(ref, logp, "abs").item() == pytest.approx(1.0)
    assert sampled_kl(logp, ref, "k2").item() == pytest.approx(0.5)
    assert sampled_kl(logp, ref, "k3").item() == pytest.approx(math.exp(-1.0))
    # d = -1 -> k3 = e^{1} - 1 - 1
    assert sampled_kl(ref, logp, "k3").item() == pytest.approx(math.e - 2.0)


def test_clamps():
    logp = torch.tensor([[0.0, -5.0, -30.0, -50.0]], dtype=torch.float64)
    ref = torch.zeros_like(logp)
    # k3 with x = ref - logp = 0, 5, 30 (exponent clamped to 20), 50 (clamped to 20)
    unclamped = sampled_kl(logp, ref, "k3", clamp=None)
    assert unclamped[0, 1].item() == pytest.approx(math.exp(5) - 6)
    assert unclamped[0, 2].item() == pytest.approx(math.exp(20) - 21)
    assert unclamped[0, 3].item() == pytest.approx(math.exp(20) - 21)
    clamped = sampled_kl(logp, ref, "k3")
    assert clamped.tolist() == [[0.0, 10.0, 10.0, 10.0]]
    assert sampled_kl(logp, ref, "k3", exp_clamp=3.0, clamp=None)[0, 2].item() == pytest.approx(math.exp(3) - 4)
    # k1 / abs / k2 are not clamped (as verl)
    assert sampled_kl(logp, ref, "k1")[0, 3].item() == -50.0
    assert sampled_kl(logp, ref, "abs")[0, 3].item() == 50.0
    assert sampled_kl(logp, ref, "k2")[0, 3].item() == 1250.0


def test_k3_properties_and_precision():
    d = torch.linspace(-3, 3, 61, dtype=torch.float64).reshape(1, -1)
    k3 = sampled_kl(d, torch.zeros_like(d), "k3")
    assert torch.all(k3 >= 0)
    # small differences: k3 ~ d^2 / 2; in bf16 the expm1 form keeps the relative precision
    tiny = torch.tensor([[1e-3, -2e-3]], dtype=torch.bfloat16)
    out = sampled_kl(tiny, torch.zeros_like(tiny), "k3")
    expected = [0.5 * float(v) ** 2 for v in tiny[0]]
    assert out.dtype == torch.bfloat16
    for got, exp in zip(out[0].tolist(), expected):
        assert got == pytest.approx(exp, rel=0.02)


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_gradcheck(estimator):
    g = torch.Generator().manual_seed(0)
    # |d| in [0.1, 1.5]: away from abs's kink at 0 and from k3's clamps
    sign = torch.where(torch.rand(2, 5, generator=g) < 0.5, -1.0, 1.0).double()
    d = sign * (0.1 + 1.4 * torch.rand(2, 5, generator=g, dtype=torch.float64))
    ref = -torch.rand(2, 5, generator=g, dtype=torch.float64)
    logp = (ref + d).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: sampled_kl(lp, ref, estimator), (logp,))
    # and through the second argument (KL-Cov's gradient flows through log_q = log pi_theta)
    ref_leaf = ref.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lq: sampled_kl(logp.detach(), lq, estimator), (ref_leaf,))


def test_gradient_zero_where_k3_clamped():
    logp = torch.tensor([[-8.0, -0.5]], dtype=torch.float64, requires_grad=True)
    sampled_kl(logp, torch.zeros(1, 2, dtype=torch.float64), "k3").sum().backward()
    assert logp.grad[0, 0].item() == 0.0  # e^8 - 9 > 10: clamped
    # d/dlogp (e^{-logp} + logp - 1) at logp = -0.5 = 1 - e^{0.5}
    assert logp.grad[0, 1].item() == pytest.approx(1 - math.exp(0.5))


def test_invalid_arguments(arg_error):
    a = torch.zeros(2, 3)
    with arg_error("estimator", "one of ['k1', 'abs', 'k2', 'k3']"):
        sampled_kl(a, a, "low_var_kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"log_p and log_q .*\(2, 3\).*\(3, 2\)"):
        sampled_kl(a, torch.zeros(3, 2), "k1")
    with arg_error("clamp", "a finite number > 0 or null"):
        sampled_kl(a, a, "k3", clamp=0.0)
    with arg_error("exp_clamp", "a finite number > 0"):
        sampled_kl(a, a, "k3", exp_clamp=-1.0)
    with pytest.raises(TypeError):  # the estimator is explicit: no default
        sampled_kl(a, a)  # type: ignore[call-arg]
    assert set(KL_ESTIMATORS) == {"k1", "abs", "k2", "k3"}


# ---------------------------------------------------------------- the direction
def _brute_force_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_direction_is_kl_p_q_for_tokens_sampled_from_p(estimator):
    """E_{a~p}[sampled_kl(log p(a), log q(a))] is KL(p || q) exactly for the unbiased estimators.

    The expectation is taken exactly (a sum over the whole support weighted
    by p), so the test is deterministic. p and q are chosen so that
    KL(p || q) and KL(q || p) differ by far more than the tolerance: swapping
    the arguments (or the sign of d) fails here (checked by mutation:
    ``d = log_q - log_p`` fails both estimators).
    """
    p = [0.55, 0.25, 0.1, 0.06, 0.04]
    q = [0.05, 0.15, 0.2, 0.3, 0.3]
    forward, reverse = _brute_force_kl(p, q), _brute_force_kl(q, p)
    assert abs(forward - reverse) > 0.1
    log_p = torch.tensor(p, dtype=torch.float64).log()
    log_q = torch.tensor(q, dtype=torch.float64).log()
    weights = torch.tensor(p, dtype=torch.float64)
    expectation = float((weights * sampled_kl(log_p, log_q, estimator, clamp=None)).sum())
    assert expectation == pytest.approx(forward, rel=1e-12)
    # the two callers: the reward's KL(pi_old || pi_ref) and KL-Cov's KL(pi_old || pi_theta)
    # both pass the sampling policy (pi_old) first; with the roles swapped the sum is the reverse KL
    swapped = float((torch.tensor(q, dtype=torch.float64) * sampled_kl(log_q, log_p, estimator, clamp=None)).sum())
    assert swapped == pytest.approx(reverse, rel=1e-12)


def test_abs_and_k2_are_biased_upwards_from_the_same_direction():
    p = [0.55, 0.25, 0.1, 0.06, 0.04]
    q = [0.05, 0.15, 0.2, 0.3, 0.3]
    log_p = torch.tensor(p, dtype=torch.float64).log()
    log_q = torch.tensor(q, dtype=torch.float64).log()
    weights = torch.tensor(p, dtype=torch.float64)
    d = [math.log(pi / qi) for pi, qi in zip(p, q)]
    e_abs = float((weights * sampled_kl(log_p, log_q, "abs")).sum())
    e_k2 = float((weights * sampled_kl(log_p, log_q, "k2")).sum())
    assert e_abs == pytest.approx(sum(pi * abs(di) for pi, di in zip(p, d)), rel=1e-12)
    assert e_k2 == pytest.approx(sum(pi * di * di / 2 for pi, di in zip(p, d)), rel=1e-12)
    assert e_abs >= _brute_force_kl(p, q)  # E|d| >= |E d|
