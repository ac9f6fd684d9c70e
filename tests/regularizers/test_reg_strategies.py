"""The strategy objects' effect in the PPO loss on a tiny batch, and their validation."""

from __future__ import annotations

import math

import pytest
import torch
from reg_reference import ref_entropy, ref_min_entropy, ref_tre

from tre_lightning.regularizers import (
    TREK,
    TREP,
    ClipCov,
    Ent,
    ForkingTokens,
    KLCov,
    MinEnt,
    PolicyContext,
    Regularizer,
    RegularizerOutput,
)
from tre_lightning.regularizers.kl_cov import sampled_token_kl

B, T, V = 3, 6, 40
ALL = [Ent, TREK, TREP, MinEnt, ForkingTokens, KLCov, ClipCov]


def _batch(seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen, dtype=dtype) * 2).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    old = torch.log_softmax(logits.detach() + 0.3 * torch.randn(B, T, V, generator=gen, dtype=dtype), -1)
    old = old.gather(-1, tokens[..., None]).squeeze(-1)
    adv = torch.randn(B, T, generator=gen, dtype=dtype)
    mask = torch.ones(B, T, dtype=dtype)
    mask[0, 4:] = 0
    mask[2, 5:] = 0
    return logits, tokens, old, adv, mask


def _ctx(logits, tokens, old, adv, mask) -> PolicyContext:
    log_probs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    return PolicyContext(logits=logits, log_probs=log_probs, old_log_probs=old, advantages=adv, mask=mask)


def _loss(ctx: PolicyContext, regs: list, eps: float = 0.2) -> torch.Tensor:
    """Token-mean PPO loss composed per the seam (base.py): a stand-in for the module."""
    ratio = torch.exp(ctx.log_probs - ctx.old_log_probs)
    pg = torch.maximum(-ctx.advantages * ratio, -ctx.advantages * ratio.clamp(1 - eps, 1 + eps))
    weight = ctx.mask
    detach = torch.zeros_like(ctx.mask, dtype=torch.bool)
    extra = 0.0
    for reg in regs:
        out = reg(ctx)
        if out.pg_weight is not None:
            weight = weight * out.pg_weight
        if out.pg_detach is not None:
            detach = detach | out.pg_detach
        if out.loss is not None:
            extra = extra + reg.coef * (out.loss * ctx.mask).sum() / ctx.mask.sum()
    pg = torch.where(detach, pg.detach(), pg)
    return (pg * weight).sum() / weight.sum() + extra


def _loss_and_grad(regs: list, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    logits, tokens, old, adv, mask = _batch(seed)
    loss = _loss(_ctx(logits, tokens, old, adv, mask), regs)
    loss.backward()
    return loss.detach(), logits.grad


def _all_with(coef_of) -> list:
    return [
        Ent(coef=coef_of("ent")),
        TREK(coef=coef_of("tre_k")),
        TREP(coef=coef_of("tre_p")),
        MinEnt(coef=coef_of("min_ent")),
        ForkingTokens(coef=coef_of("forking")),
        KLCov(coef=coef_of("kl_cov")),
        ClipCov(coef=coef_of("clip_cov"), clip_fraction=1.0, cov_lower=-1e9, cov_upper=1e9, seed=0),
    ]


# --------------------------------------------------------------------------- coefficient 0


def test_every_coefficient_zero_is_vanilla_ppo_exactly():
    vanilla_loss, vanilla_grad = _loss_and_grad([])
    loss, grad = _loss_and_grad(_all_with(lambda _: 0.0))
    assert torch.equal(loss, vanilla_loss)
    assert torch.equal(grad, vanilla_grad)
    logits, tokens, old, adv, mask = _batch()
    for reg in _all_with(lambda _: 0.0):
        out = reg(_ctx(logits, tokens, old, adv, mask))
        assert out.loss is None and out.pg_weight is None and out.pg_detach is None


def test_nonzero_coefficients_change_the_loss():
    vanilla_loss, vanilla_grad = _loss_and_grad([])
    for reg in _all_with(lambda _: 1.0):
        loss, grad = _loss_and_grad([reg])
        assert not torch.equal(grad, vanilla_grad), type(reg).__name__


# --------------------------------------------------------------------------- loss terms


@pytest.mark.parametrize(
    ("reg", "ref"),
    [
        (Ent(coef=0.5), ref_entropy),
        (MinEnt(coef=0.5), ref_min_entropy),
        (TREK(coef=0.5, top_k=3), lambda z: ref_tre(z, top_k=3)[0]),
        (TREP(coef=0.5, top_p=0.9), lambda z: ref_tre(z, top_p=0.9)[0]),
    ],
    ids=["ent", "min_ent", "tre_k", "tre_p"],
)
def test_entropy_terms_are_minus_the_entropy_on_valid_tokens(reg, ref):
    logits, tokens, old, adv, mask = _batch()
    out = reg(_ctx(logits, tokens, old, adv, mask))
    expect = torch.where(mask > 0, -ref(logits.detach()), 0.0)
    torch.testing.assert_close(out.loss, expect, rtol=1e-10, atol=1e-12)
    # the module adds coef * token-mean: check that against the vanilla loss
    vanilla, _ = _loss_and_grad([])
    total, _ = _loss_and_grad([reg])
    torch.testing.assert_close(total - vanilla, reg.coef * (expect * mask).sum() / mask.sum())
    for value in out.metrics.values():
        assert value.dim() == 0 and not value.requires_grad


@pytest.mark.parametrize("make", [Ent, MinEnt, lambda coef: TREK(coef=coef), lambda coef: TREP(coef=coef, top_p=0.9)])
def test_a_gradient_step_on_the_term_raises_the_entropy(make):
    logits, tokens, old, adv, mask = _batch(1)
    reg = make(coef=1.0)
    out = reg(_ctx(logits, tokens, old, adv, mask))
    (out.loss * mask).sum().backward()
    stepped = logits.detach() - 0.05 * logits.grad
    valid = mask > 0
    if isinstance(reg, (TREK, TREP)):
        kw = {"top_k": reg.top_k} if isinstance(reg, TREK) else {"top_p": reg.top_p}
        before, after = ref_tre(logits.detach(), **kw)[0], ref_tre(stepped, **kw)[0]
    elif isinstance(reg, MinEnt):
        before, after = ref_min_entropy(logits.detach()), ref_min_entropy(stepped)
    else:
        before, after = ref_entropy(logits.detach()), ref_entropy(stepped)
    assert after[valid].sum() > before[valid].sum()


def test_padding_positions_get_no_term_and_no_gradient():
    logits, tokens, old, adv, mask = _batch()
    logits.data[0, 5] = math.nan  # garbage at a padded position must not leak
    ctx = _ctx(logits, tokens, old, adv, mask)
    out = TREP(coef=1.0)(ctx)
    assert torch.isfinite(out.loss).all()
    (out.loss * mask).sum().backward()
    assert (logits.grad[0, 4:] == 0).all()


# --------------------------------------------------------------------------- Forking-Tokens


def test_forking_keeps_the_top_20_percent_and_divides_by_their_count():
    logits, tokens, old, adv, mask = _batch(2)
    ctx = _ctx(logits, tokens, old, adv, mask)
    out = ForkingTokens()(ctx)
    n_valid = int(mask.sum())  # 15
    k = math.ceil(0.2 * n_valid)  # 3
    h = ref_entropy(logits.detach()).masked_fill(mask == 0, -math.inf)
    expect = torch.zeros(B * T)
    expect[h.reshape(-1).topk(k).indices] = 1.0
    assert torch.equal(out.pg_weight.reshape(-1).float(), expect)
    torch.testing.assert_close(out.metrics["policy/forking_frac"], torch.tensor(k / n_valid))
    # surrogate averaged over the k selected tokens: denominator k, not n_valid
    ratio = torch.exp(ctx.log_probs - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    sel = expect.reshape(B, T).bool()
    torch.testing.assert_close(_loss(ctx, [ForkingTokens()]), pg[sel].sum() / k)


def test_forking_fractional_coef_interpolates_the_weight():
    logits, tokens, old, adv, mask = _batch(2)
    ctx = _ctx(logits, tokens, old, adv, mask)
    sel = ForkingTokens()(ctx).pg_weight
    half = ForkingTokens(coef=0.25)(ctx).pg_weight
    torch.testing.assert_close(half, 0.75 + 0.25 * sel)


# --------------------------------------------------------------------------- KL-Cov


def _cov(adv, lp, mask):
    valid = mask > 0
    a, l_ = adv[valid], lp[valid]
    cov = torch.full_like(adv, -math.inf)
    cov[valid] = (a - a.mean()) * (l_ - l_.mean())
    return cov


@pytest.mark.parametrize(("fraction", "k"), [(0.2, 3), (0.1, 1), (0.002, 1), (1.0, 15)])
def test_kl_cov_selects_int_n_fraction_tokens_by_covariance(fraction, k):
    logits, tokens, old, adv, mask = _batch(3)
    ctx = _ctx(logits, tokens, old, adv, mask)
    reg = KLCov(top_fraction=fraction, kl_estimator="abs")
    out = reg(ctx)
    assert k == max(1, int(15 * fraction))
    assert float(out.metrics["policy/klcov_selected"]) == k
    cov = _cov(adv, ctx.log_probs.detach(), mask)
    chosen = torch.zeros(B * T, dtype=torch.bool)
    chosen[cov.reshape(-1).topk(k).indices] = True
    chosen = chosen.reshape(B, T)
    expect = torch.where(chosen, (ctx.log_probs - old).abs(), 0.0)
    torch.testing.assert_close(out.loss, expect)
    assert int((out.loss != 0).sum()) == k


def test_kl_estimators():
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.5, -2.0, -0.2], dtype=torch.float64)
    x = lp.detach() - old
    torch.testing.assert_close(sampled_token_kl(lp, old, "k1"), -x)
    torch.testing.assert_close(sampled_token_kl(lp, old, "abs"), x.abs())
    torch.testing.assert_close(sampled_token_kl(lp, old, "k3"), torch.exp(x) - x - 1)
    # k3 and abs pull log pi back toward log pi_old; k3 is 0 with zero gradient at equality
    k3 = sampled_token_kl(lp, old, "k3").sum()
    k3.backward()
    assert lp.grad[0] > 0 and lp.grad[2] < 0 and lp.grad[1] == 0


def test_kl_cov_defaults_follow_the_paper_text():
    reg = KLCov()
    assert (reg.coef, reg.top_fraction, reg.kl_estimator) == (1.0, 0.2, "k3")


# --------------------------------------------------------------------------- Clip-Cov


def test_clip_cov_detaches_random_high_covariance_unclipped_tokens():
    logits, tokens, old, adv, mask = _batch(4)
    ctx = _ctx(logits, tokens, old, adv, mask)
    lp = ctx.log_probs.detach()
    cov = _cov(adv, lp, mask)
    ratio = torch.exp(lp - old)
    clipped = -adv * ratio.clamp(0.8, 1.2) > -adv * ratio
    lower = float(cov[mask > 0].median())
    cand = (mask > 0) & ~clipped & (cov > lower) & (cov < 1e9)
    out = ClipCov(clip_fraction=0.2, cov_lower=lower, cov_upper=1e9, seed=1)(ctx)
    k = max(1, int(15 * 0.2))
    det = out.pg_detach
    assert int(det.sum()) == min(k, int(cand.sum())) > 0
    assert not (det & ~cand).any()
    assert float(out.metrics["policy/clipcov_detached"]) == int(det.sum())
    assert float(out.metrics["policy/clipcov_candidates"]) == int(cand.sum())
    # composed per the seam: no surrogate gradient there, the token stays in the denominator
    lp_leaf = lp.clone().requires_grad_(True)
    ratio2 = torch.exp(lp_leaf - old)
    pg = torch.maximum(-adv * ratio2, -adv * ratio2.clamp(0.8, 1.2))
    pg = torch.where(det, pg.detach(), pg)
    ((pg * mask).sum() / mask.sum()).backward()
    assert (lp_leaf.grad[det] == 0).all()
    assert (lp_leaf.grad[(mask > 0) & ~det & ~clipped] != 0).all()


def test_clip_cov_seed_makes_draws_reproducible_and_coef_thins_them():
    logits, tokens, old, adv, mask = _batch(4)
    ctx = _ctx(logits, tokens, old, adv, mask)
    kw = {"clip_fraction": 1.0, "cov_lower": -1e9, "cov_upper": 1e9}
    a, b = ClipCov(seed=5, **kw)(ctx), ClipCov(seed=5, **kw)(ctx)
    assert torch.equal(a.pg_detach, b.pg_detach)
    full = int(a.pg_detach.sum())
    counts = [int(ClipCov(coef=0.5, seed=s, **kw)(ctx).pg_detach.sum()) for s in range(20)]
    assert max(counts) <= full and min(counts) < full  # each drawn token kept with probability 0.5


# --------------------------------------------------------------------------- composition


def test_several_regularizers_compose_additively():
    regs = [TREP(coef=0.3, top_p=0.9), KLCov(coef=0.7, kl_estimator="k3"), Ent(coef=0.2)]
    vanilla, _ = _loss_and_grad([])
    total, _ = _loss_and_grad(regs)
    parts = [(_loss_and_grad([r])[0] - vanilla) for r in regs]
    torch.testing.assert_close(total - vanilla, sum(parts))


# --------------------------------------------------------------------------- protocol and validation


def test_every_class_implements_the_protocol():
    logits, tokens, old, adv, mask = _batch()
    ctx = _ctx(logits, tokens, old, adv, mask)
    for cls in ALL:
        reg = cls()
        assert isinstance(reg, Regularizer)
        assert isinstance(reg(ctx), RegularizerOutput)
        assert cls.__name__ in repr(reg)


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (Ent, {"coef": -0.1}, "coef"),
        (Ent, {"coef": math.nan}, "coef"),
        (Ent, {"chunk_size": 0}, "chunk_size"),
        (TREK, {"top_k": 0}, "top_k"),
        (TREK, {"top_k": 1.5}, "top_k"),
        (TREK, {"coef": -1.0}, "coef"),
        (TREP, {"top_p": 0.0}, "top_p"),
        (TREP, {"top_p": 1.01}, "top_p"),
        (TREP, {"max_region": 0}, "max_region"),
        (MinEnt, {"coef": -0.001}, "coef"),
        (ForkingTokens, {"top_fraction": 0.0}, "top_fraction"),
        (ForkingTokens, {"top_fraction": 1.5}, "top_fraction"),
        (ForkingTokens, {"coef": 1.5}, "coef"),
        (KLCov, {"top_fraction": 0.0}, "top_fraction"),
        (KLCov, {"top_fraction": 2.0}, "top_fraction"),
        (KLCov, {"kl_estimator": "k2"}, "kl_estimator"),
        (KLCov, {"coef": -1.0}, "coef"),
        (ClipCov, {"clip_fraction": 0.0}, "clip_fraction"),
        (ClipCov, {"cov_lower": 5.0, "cov_upper": 1.0}, "cov_lower"),
        (ClipCov, {"coef": 2.0}, "coef"),
        (ClipCov, {"seed": 1.5}, "seed"),
    ],
)
def test_invalid_arguments_raise_a_clear_error(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_defaults_follow_the_paper():
    assert (Ent().coef, TREK().coef, TREP().coef, MinEnt().coef) == (0.001,) * 4
    assert TREK().top_k == 2 and TREP().top_p == 0.99 and TREP().max_region is None
    assert ForkingTokens().top_fraction == 0.2
    c = ClipCov()
    assert (c.clip_fraction, c.cov_lower, c.cov_upper) == (0.0002, 1.0, 5.0)
