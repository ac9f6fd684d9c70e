"""The strategy objects' effect in the PPO loss on a tiny batch, and their validation."""

from __future__ import annotations

import math

import pytest
import torch
from reg_reference import ref_entropy, ref_min_entropy, ref_tre

from tre_lightning.checks import ArgumentError
from tre_lightning.ppo import clipped_policy_loss, sampled_kl
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
from tre_lightning.regularizers._utils import token_covariance

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


def _ctx(logits, tokens, old, adv, mask, **clip) -> PolicyContext:
    """The context the module builds: ``clipped`` from the surrogate (eps 0.2 unless ``clip`` says otherwise)."""
    log_probs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    clipped = clipped_policy_loss(log_probs.detach(), old, adv, mask, **clip).clipped
    return PolicyContext(
        logits=logits, log_probs=log_probs, old_log_probs=old, advantages=adv, mask=mask, clipped=clipped
    )


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


def _all(active: bool) -> list:
    """Every strategy, at its method setting (``active``) or at its neutral setting.

    Neutral: ``coef=0`` for the loss terms, ``unselected_weight=1`` for
    Forking-Tokens, ``detach_prob=0`` for Clip-Cov.
    """
    c = 1.0 if active else 0.0
    return [
        Ent(coef=c),
        TREK(coef=c),
        TREP(coef=c),
        MinEnt(coef=c),
        ForkingTokens(unselected_weight=1.0 - c),
        KLCov(coef=c),
        ClipCov(detach_prob=c, clip_fraction=1.0, cov_lower=-1e9, cov_upper=1e9, seed=0),
    ]


# --------------------------------------------------------------------------- neutral settings


def test_every_neutral_setting_is_vanilla_ppo_exactly():
    vanilla_loss, vanilla_grad = _loss_and_grad([])
    loss, grad = _loss_and_grad(_all(active=False))
    assert torch.equal(loss, vanilla_loss)
    assert torch.equal(grad, vanilla_grad)
    logits, tokens, old, adv, mask = _batch()
    for reg in _all(active=False):
        out = reg(_ctx(logits, tokens, old, adv, mask))
        assert out.loss is None and out.pg_weight is None and out.pg_detach is None


def test_active_settings_change_the_loss():
    vanilla_loss, vanilla_grad = _loss_and_grad([])
    for reg in _all(active=True):
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


def test_forking_unselected_weight_interpolates_the_weight():
    logits, tokens, old, adv, mask = _batch(2)
    ctx = _ctx(logits, tokens, old, adv, mask)
    sel = ForkingTokens()(ctx).pg_weight
    assert set(sel.unique().tolist()) == {0.0, 1.0}
    # the former coef = 0.25 is unselected_weight = 0.75: 1 on selected tokens, 0.75 elsewhere
    part = ForkingTokens(unselected_weight=0.75)(ctx).pg_weight
    torch.testing.assert_close(part, 0.75 + 0.25 * sel)


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
    """KL-Cov's term is sampled_kl(log pi_old, log pi): D_KL(pi_old || pi_theta), gradient through log pi."""
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.5, -2.0, -0.2], dtype=torch.float64)
    x = lp.detach() - old
    torch.testing.assert_close(sampled_kl(old, lp, "k1", clamp=None), -x)
    torch.testing.assert_close(sampled_kl(old, lp, "abs", clamp=None), x.abs())
    torch.testing.assert_close(sampled_kl(old, lp, "k3", clamp=None), torch.exp(x) - x - 1)
    # k3 and abs pull log pi back toward log pi_old; k3 is 0 with zero gradient at equality
    k3 = sampled_kl(old, lp, "k3", clamp=None).sum()
    k3.backward()
    assert lp.grad[0] > 0 and lp.grad[2] < 0 and lp.grad[1] == 0


def _former_sampled_token_kl(log_probs, old_log_probs, estimator):
    """KL-Cov's own estimator before issue 11 (x = log pi - log pi_old), kept here as the reference."""
    x = log_probs - old_log_probs.detach()
    if estimator == "k1":
        return -x
    if estimator == "abs":
        return x.abs()
    x = x.clamp(-20.0, 20.0)
    return torch.expm1(x) - x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["k1", "abs", "k3"])
def test_kl_cov_term_and_gradient_are_bit_identical_to_the_former_estimator(estimator, dtype):
    """KL-Cov through sampled_kl(old, new, clamp=None) equals its former own estimator, to the bit.

    Checked against a mutation: with the arguments swapped (sampled_kl(new, old)) k1 and k3 fail.
    """
    logits, tokens, old, adv, mask = _batch(6, dtype=dtype)
    offsets = torch.zeros(B, T, dtype=dtype)
    offsets[1, :3] = torch.tensor([25.0, -25.0, 19.5])  # past k3's exponent clamp, and just inside
    ctx = _ctx(logits, tokens, old + offsets, adv, mask)
    out = KLCov(top_fraction=1.0, kl_estimator=estimator)(ctx)
    expect = torch.where(mask > 0, _former_sampled_token_kl(ctx.log_probs, ctx.old_log_probs, estimator), 0.0)
    assert torch.equal(out.loss, expect)
    (grad,) = torch.autograd.grad((out.loss * mask).sum(), logits, retain_graph=True)
    (expect_grad,) = torch.autograd.grad((expect * mask).sum(), logits)
    assert torch.equal(grad, expect_grad)


def test_kl_cov_metric_is_the_mean_kl_over_the_selected_tokens():
    logits, tokens, old, adv, mask = _batch(3)
    ctx = _ctx(logits, tokens, old, adv, mask)
    out = KLCov(top_fraction=0.2, kl_estimator="abs")(ctx)
    chosen = out.loss != 0
    assert int(chosen.sum()) == 3
    torch.testing.assert_close(out.metrics["policy/klcov_kl"], out.loss.detach()[chosen].float().mean())
    assert out.metrics["policy/klcov_kl"].dtype == torch.float32


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


def test_clip_cov_seed_makes_draws_reproducible_and_detach_prob_thins_them():
    logits, tokens, old, adv, mask = _batch(4)
    ctx = _ctx(logits, tokens, old, adv, mask)
    kw = {"clip_fraction": 1.0, "cov_lower": -1e9, "cov_upper": 1e9}
    a, b = ClipCov(seed=5, **kw)(ctx), ClipCov(seed=5, **kw)(ctx)
    assert torch.equal(a.pg_detach, b.pg_detach)
    full = int(a.pg_detach.sum())
    counts = [int(ClipCov(detach_prob=0.5, seed=s, **kw)(ctx).pg_detach.sum()) for s in range(20)]
    assert max(counts) <= full and min(counts) < full  # each drawn token kept with probability 0.5


def _former_clip_mask(ctx, eps_low, eps_high):
    """How Clip-Cov re-derived the surrogate's clip before issue 11 (the reference for bit-identity)."""
    dt = torch.promote_types(ctx.log_probs.dtype, torch.float32)
    ratio = (ctx.log_probs.detach() - ctx.old_log_probs).to(dt).clamp(-20.0, 20.0).exp()
    adv = ctx.advantages.to(dt)
    return -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high) > -adv * ratio


def _former_clip_cov(ctx, clip_fraction, lower, upper, detach_prob, seed, eps_low, eps_high):
    """The former ClipCov selection end to end: own clip mask, own covariance, same draws."""
    valid = ctx.mask > 0
    a = torch.where(valid, ctx.advantages.detach(), 0.0)
    lp = torch.where(valid, ctx.log_probs.detach(), 0.0)
    n = valid.sum().clamp(min=1)
    cov = (a - a.sum() / n) * (lp - lp.sum() / n)
    assert torch.equal(token_covariance(ctx.advantages, ctx.log_probs, ctx.mask), cov)
    cand = valid & ~_former_clip_mask(ctx, eps_low, eps_high) & (cov > lower) & (cov < upper)
    cand_idx = cand.reshape(-1).nonzero().squeeze(1)
    k = min(int(valid.sum()), max(1, int(int(valid.sum()) * clip_fraction)))
    gen = torch.Generator().manual_seed(seed)
    chosen = cand_idx[torch.randperm(cand_idx.numel(), generator=gen)[: min(k, cand_idx.numel())]]
    if 0.0 < detach_prob < 1.0 and chosen.numel():
        chosen = chosen[torch.rand(chosen.numel(), generator=gen) < detach_prob]
    detach = torch.zeros_like(valid)
    detach.view(-1)[chosen] = True
    return detach


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("eps_low", "eps_high", "dual"), [(0.2, 0.2, None), (0.2, 0.28, 3.0), (0.05, 0.1, 1.5)])
def test_clip_cov_selection_is_bit_identical_to_the_former_derivation(dtype, eps_low, eps_high, dual):
    """ctx.clipped (the surrogate's mask) selects exactly what Clip-Cov used to re-derive.

    Checked against a mutation: with ``~ctx.clipped`` dropped from the
    candidates, the selections differ.
    """
    gen = torch.Generator().manual_seed(11)
    b, t = 4, 16
    logits = (torch.randn(b, t, V, generator=gen, dtype=dtype) * 2).requires_grad_(True)
    tokens = torch.randint(0, V, (b, t), generator=gen)
    lp = torch.log_softmax(logits.detach(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    old = lp + 0.4 * torch.randn(b, t, generator=gen, dtype=dtype)  # ratios spread over e^{±1}: many clipped
    adv = torch.randn(b, t, generator=gen, dtype=dtype)
    mask = torch.ones(b, t, dtype=dtype)
    mask[1, 10:] = 0
    mask[3, 4:] = 0
    ctx = _ctx(logits, tokens, old, adv, mask, clip_ratio_low=eps_low, clip_ratio_high=eps_high, dual_clip=dual)
    former = _former_clip_mask(ctx, eps_low, eps_high) & (mask > 0)
    assert torch.equal(ctx.clipped, former) and 0 < int(former.sum()) < int(mask.sum())
    median = float(token_covariance(adv, lp, mask)[mask > 0].median())
    for lower, upper in [(-1e9, 1e9), (median, 1e9), (-1e9, median)]:
        for detach_prob in (1.0, 0.5):
            for seed in range(3):
                kw = {"clip_fraction": 0.5, "cov_lower": lower, "cov_upper": upper}
                got = ClipCov(detach_prob=detach_prob, seed=seed, **kw)(ctx).pg_detach
                expect = _former_clip_cov(ctx, 0.5, lower, upper, detach_prob, seed, eps_low, eps_high)
                assert torch.equal(got, expect), (lower, upper, detach_prob, seed)


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
    names = set()
    for cls in ALL:
        assert Regularizer in cls.__mro__  # inherits explicitly (jsonargparse lists subclasses)
        reg = cls()
        assert isinstance(reg, Regularizer)
        assert isinstance(reg.name, str) and reg.name
        names.add(reg.name)
        out = reg(ctx)
        assert isinstance(out, RegularizerOutput)
        assert cls.__name__ in repr(reg)
        # coef is the weight of a loss term: exactly the classes whose output has a loss have one
        assert hasattr(reg, "coef") == (out.loss is not None), cls.__name__
    assert names == {"ent", "tre_k", "tre_p", "min_ent", "forking", "kl_cov", "clip_cov"}


def test_a_duck_typed_regularizer_is_still_a_regularizer():
    class Bonus:  # does not inherit from Regularizer
        name = "bonus"
        coef = 0.5

        def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
            return RegularizerOutput(loss=-ctx.log_probs)

    class Nameless:
        coef = 0.5

        def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
            return RegularizerOutput()

    assert isinstance(Bonus(), Regularizer)
    assert not isinstance(Nameless(), Regularizer)  # `name` is part of the protocol
    assert not isinstance(object(), Regularizer)


def test_forking_and_clip_cov_have_no_coef():
    for cls, kw in [(ForkingTokens, {"coef": 1.0}), (ClipCov, {"coef": 1.0})]:
        with pytest.raises(TypeError, match="coef"):
            cls(**kw)
        assert not hasattr(cls(), "coef")


@pytest.mark.parametrize(
    ("cls", "kwargs", "name", "allowed"),
    [
        (Ent, {"coef": -0.1}, "coef", "a finite number >= 0"),
        (Ent, {"coef": math.nan}, "coef", "a finite number >= 0"),
        (Ent, {"coef": "0.1"}, "coef", "a finite number >= 0"),
        (Ent, {"chunk_size": 0}, "chunk_size", "an int >= 1 or null"),
        (TREK, {"top_k": 0}, "top_k", "an int >= 1"),
        (TREK, {"top_k": 1.5}, "top_k", "an int >= 1"),
        (TREK, {"coef": -1.0}, "coef", "a finite number >= 0"),
        (TREP, {"top_p": 0.0}, "top_p", "a finite number in (0, 1]"),
        (TREP, {"top_p": 1.01}, "top_p", "a finite number in (0, 1]"),
        (TREP, {"max_region": 0}, "max_region", "an int >= 1 or null"),
        (MinEnt, {"coef": -0.001}, "coef", "a finite number >= 0"),
        (ForkingTokens, {"top_fraction": 0.0}, "top_fraction", "a finite number in (0, 1]"),
        (ForkingTokens, {"top_fraction": 1.5}, "top_fraction", "a finite number in (0, 1]"),
        (ForkingTokens, {"unselected_weight": 1.5}, "unselected_weight", "a finite number in [0, 1]"),
        (ForkingTokens, {"unselected_weight": -0.1}, "unselected_weight", "a finite number in [0, 1]"),
        (KLCov, {"top_fraction": 0.0}, "top_fraction", "a finite number in (0, 1]"),
        (KLCov, {"top_fraction": 2.0}, "top_fraction", "a finite number in (0, 1]"),
        (KLCov, {"kl_estimator": "k2"}, "kl_estimator", "one of ['k1', 'abs', 'k3']"),
        (KLCov, {"coef": -1.0}, "coef", "a finite number >= 0"),
        (ClipCov, {"clip_fraction": 0.0}, "clip_fraction", "a finite number in (0, 1]"),
        (ClipCov, {"cov_lower": 5.0, "cov_upper": 1.0}, "cov_lower", "< cov_upper (1)"),
        (ClipCov, {"cov_upper": math.inf}, "cov_upper", "a finite number"),
        (ClipCov, {"detach_prob": 2.0}, "detach_prob", "a finite number in [0, 1]"),
        (ClipCov, {"seed": 1.5}, "seed", "an int or null"),
    ],
)
def test_invalid_arguments_raise_a_clear_error(cls, kwargs, name, allowed):
    with pytest.raises(ArgumentError) as info:
        cls(**kwargs)
    assert (info.value.param, info.value.allowed) == (name, allowed)
    assert str(info.value) == f"{name} must be {allowed}, got {kwargs[name]!r}"


def test_defaults_follow_the_paper():
    assert (Ent().coef, TREK().coef, TREP().coef, MinEnt().coef) == (0.001,) * 4
    assert TREK().top_k == 2 and TREP().top_p == 0.99 and TREP().max_region is None
    f = ForkingTokens()
    assert (f.top_fraction, f.unselected_weight) == (0.2, 0.0)
    c = ClipCov()
    assert (c.clip_fraction, c.cov_lower, c.cov_upper, c.detach_prob) == (0.0002, 1.0, 5.0, 1.0)
