"""Kernels of tre_lightning.regularizers.functional against slow literal references."""

from __future__ import annotations

import math

import pytest
import torch
from reg_reference import ref_entropy, ref_log_probs, ref_min_entropy, ref_peak, ref_tre, region

from tre_lightning.regularizers import functional as F

INF = math.inf


def _family(kind: str, rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    if kind == "random":
        return 3.0 * z
    if kind == "peaked":  # most rows have a one-token nucleus at 0.99
        z = 2.0 * z
        boost = torch.rand(rows, generator=gen, dtype=torch.float64) * 14.0 + 4.0
        z[:, 0] += boost
        return z
    if kind == "flat":  # nuclei of most of the vocabulary
        return 0.1 * z
    if kind == "tied":  # few distinct values: ties everywhere, including at the boundary
        return torch.randint(0, 4, (rows, vocab), generator=gen).double()
    if kind == "masked":  # masked vocabulary; rows with 1 and 2 finite logits
        z = 3.0 * z
        z[torch.rand(rows, vocab, generator=gen) < 0.4] = -INF
        z[0, 1:] = -INF
        z[1, 2:] = -INF
        z[0, 0] = 1.0
        z[1, :2] = torch.tensor([0.5, -0.5], dtype=torch.float64)
        return z
    raise ValueError(kind)


FAMILIES = ["random", "peaked", "flat", "tied", "masked"]
TRE_CASES = [
    {"top_k": 1},
    {"top_k": 2},
    {"top_k": 5},
    {"top_p": 0.5},
    {"top_p": 0.9},
    {"top_p": 0.99},
    {"top_p": 1.0},
]


def _tre_kwargs(case: dict) -> dict:
    return {"top_k": case.get("top_k"), "top_p": case.get("top_p")}


def _grad(fn, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    z = z.detach().clone().requires_grad_(True)
    (fn(z).double() * weights).sum().backward()
    return z.grad


def _tie_groups_match(g: torch.Tensor, g_ref: torch.Tensor, z: torch.Tensor, rtol=1e-9, atol=1e-12) -> None:
    """Equal gradients up to a permutation inside groups of equal logits (per row).

    Which of several tied tokens enters a region is a convention (the
    reference takes the lowest ids); the value does not depend on it.
    """
    v = z.shape[-1]
    for gr, grr, zr in zip(g.reshape(-1, v), g_ref.reshape(-1, v), z.reshape(-1, v), strict=True):
        for value in torch.unique(zr[torch.isfinite(zr)]):
            sel = zr == value
            torch.testing.assert_close(gr[sel].sort().values, grr[sel].sort().values, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- values and gradients, float64


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("vocab", [7, 300])
def test_entropy_min_entropy_peak_match_reference(kind, vocab):
    gen = torch.Generator().manual_seed(vocab)
    z = _family(kind, 12, vocab, gen)
    w = torch.randn(12, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(F.entropy(z, chunk_size=5), ref_entropy(z), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(F.min_entropy(z, chunk_size=5), ref_min_entropy(z), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(F.peak_probability(z, chunk_size=5), ref_peak(z), rtol=1e-10, atol=1e-12)
    pmax, ent = F.token_stats(z, chunk_size=5)
    torch.testing.assert_close(pmax, ref_peak(z), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ent, ref_entropy(z), rtol=1e-10, atol=1e-12)

    g = _grad(lambda x: F.entropy(x, chunk_size=5), z, w)
    g_ref = _grad(ref_entropy, z, w)
    torch.testing.assert_close(g, g_ref.nan_to_num(0.0), rtol=1e-9, atol=1e-12)
    assert torch.isfinite(g).all()
    if kind != "tied":  # the subgradient of max at a tie is a convention
        g = _grad(lambda x: F.min_entropy(x, chunk_size=5), z, w)
        torch.testing.assert_close(g, _grad(ref_min_entropy, z, w), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("case", TRE_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_trust_region_entropy_matches_algorithm_1(kind, case):
    gen = torch.Generator().manual_seed(1)
    z = _family(kind, 10, 40, gen)
    w = torch.randn(10, generator=gen, dtype=torch.float64)
    out = F.trust_region_entropy(z, **_tre_kwargs(case), chunk_size=3)
    ref, size = ref_tre(z, **_tre_kwargs(case))
    torch.testing.assert_close(out.value, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(out.region_size, size)
    torch.testing.assert_close(out.peak_prob, ref_peak(z), rtol=1e-10, atol=1e-12)
    assert (out.value[size <= 1] == 0).all()  # exactly 0 where |TR| = 1

    g = _grad(lambda x: F.trust_region_entropy(x, **_tre_kwargs(case), chunk_size=3).value, z, w)
    g_ref = _grad(lambda x: ref_tre(x, **_tre_kwargs(case))[0], z, w)
    assert torch.isfinite(g).all()
    if kind == "tied":
        _tie_groups_match(g, g_ref, z)
    else:
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "flat", "tied", "masked"])
@pytest.mark.parametrize("top_p", [0.6, 0.99])
def test_tre_p_wide_nuclei_exact(kind, top_p):
    """Nuclei far beyond the top-256 stage: the histogram search is still exact."""
    gen = torch.Generator().manual_seed(2)
    z = _family(kind, 6, 2500, gen)
    if kind in ("random", "masked"):
        z = z / 6.0  # sigma 0.5: nuclei in the thousands
    w = torch.randn(6, generator=gen, dtype=torch.float64)
    out = F.trust_region_entropy(z, top_p=top_p, chunk_size=4)
    ref, size = ref_tre(z, top_p=top_p)
    assert int(size.max()) > 256
    assert torch.equal(out.region_size, size)
    torch.testing.assert_close(out.value, ref, rtol=1e-9, atol=1e-11)
    g = _grad(lambda x: F.trust_region_entropy(x, top_p=top_p, chunk_size=4).value, z, w)
    g_ref = _grad(lambda x: ref_tre(x, top_p=top_p)[0], z, w)
    if kind == "tied":
        _tie_groups_match(g, g_ref, z)
    else:
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-11)


def test_tre_p_boundary_inside_a_large_tie_group():
    """400 tied tokens straddle the threshold: exactly the needed number are in."""
    vocab = 3000
    z = torch.zeros(1, vocab, dtype=torch.float64)
    z[0, 1000:1400] = 1.0
    p_tied = math.e / (400 * math.e + 2600)
    top_p = 0.2
    needed = math.ceil(top_p / p_tied)
    out = F.trust_region_entropy(z, top_p=top_p)
    assert int(out.region_size) == needed > 256
    # uniform local distribution: H = log n, scaled value = log V
    torch.testing.assert_close(out.value, torch.tensor([math.log(vocab)], dtype=torch.float64))
    z = z.requires_grad_(True)
    F.trust_region_entropy(z, top_p=top_p).value.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_tre_p_max_region_caps_like_the_authors_code():
    gen = torch.Generator().manual_seed(3)
    z = _family("flat", 5, 600, gen)
    for cap in (1, 3, 256, 1000):
        out = F.trust_region_entropy(z, top_p=0.99, max_region=cap, chunk_size=2)
        ref, size = ref_tre(z, top_p=0.99, cap=cap)
        assert torch.equal(out.region_size, size)
        torch.testing.assert_close(out.value, ref, rtol=1e-10, atol=1e-12)


def test_tre_p_equal_one_is_the_support():
    gen = torch.Generator().manual_seed(4)
    z = _family("masked", 8, 50, gen)
    out = F.trust_region_entropy(z, top_p=1.0)
    finite = torch.isfinite(z).sum(-1)
    assert torch.equal(out.region_size, finite)
    expect = torch.where(finite > 1, math.log(50) / finite.clamp(min=2).double().log() * ref_entropy(z), 0.0)
    torch.testing.assert_close(out.value, expect, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- structure


def test_tre_k_gradient_reaches_only_the_top_k_logits():
    gen = torch.Generator().manual_seed(5)
    z = _family("random", 16, 200, gen).requires_grad_(True)
    for k in (1, 2, 7):
        z.grad = None
        F.trust_region_entropy(z, top_k=k).value.sum().backward()
        top = z.detach().topk(k, dim=-1).indices
        outside = torch.ones_like(z, dtype=torch.bool).scatter_(1, top, False)
        assert (z.grad[outside] == 0).all()
        assert (z.grad[~outside] != 0).any() or k == 1


def test_tre_k_with_vocab_not_larger_than_k_is_the_entropy():
    gen = torch.Generator().manual_seed(6)
    z = _family("random", 6, 5, gen)
    for k in (5, 8):
        out = F.trust_region_entropy(z, top_k=k)
        torch.testing.assert_close(out.value, ref_entropy(z), rtol=1e-10, atol=1e-12)
        assert (out.region_size == 5).all()
    assert (F.trust_region_entropy(z[:, :1], top_k=2).value == 0).all()  # V = 1


def test_tre_k_without_peak_skips_it():
    z = torch.randn(4, 30)
    out = F.trust_region_entropy(z, top_k=2, with_peak=False)
    assert torch.isnan(out.peak_prob).all()
    torch.testing.assert_close(out.value, F.trust_region_entropy(z, top_k=2).value)


@pytest.mark.parametrize("chunk", [1, 2, 7, 1000])
def test_results_do_not_depend_on_chunk_size(chunk):
    gen = torch.Generator().manual_seed(7)
    z = torch.cat([_family("peaked", 9, 700, gen), _family("flat", 4, 700, gen) * 3]).float()
    base = {
        "ent": F.entropy(z, chunk_size=3),
        "min": F.min_entropy(z, chunk_size=3),
        "trk": F.trust_region_entropy(z, top_k=2, chunk_size=3).value,
        "trp": F.trust_region_entropy(z, top_p=0.99, chunk_size=3).value,
    }
    other = {
        "ent": F.entropy(z, chunk_size=chunk),
        "min": F.min_entropy(z, chunk_size=chunk),
        "trk": F.trust_region_entropy(z, top_k=2, chunk_size=chunk).value,
        "trp": F.trust_region_entropy(z, top_p=0.99, chunk_size=chunk).value,
    }
    for key in base:
        torch.testing.assert_close(other[key], base[key], rtol=1e-6, atol=1e-6)


def test_non_contiguous_logits_are_not_copied_and_give_the_same_result():
    gen = torch.Generator().manual_seed(8)
    full = torch.randn(3, 9, 120, generator=gen, dtype=torch.float64) * 3
    sliced = full[:, 2:-1]  # what a module passes: the response positions
    assert not sliced.is_contiguous()
    tokens = torch.randint(0, 120, sliced.shape[:-1], generator=gen)
    w = torch.randn(sliced.shape[:-1], generator=gen, dtype=torch.float64)
    for fn, ref in [
        (lambda x: F.entropy(x, chunk_size=4), ref_entropy),
        (lambda x: F.trust_region_entropy(x, top_p=0.9, chunk_size=4).value, lambda x: ref_tre(x, top_p=0.9)[0]),
        (lambda x: F.log_probs_from_logits(x, tokens, chunk_size=4), lambda x: ref_log_probs(x, tokens)),
    ]:
        leaf = full.clone().requires_grad_(True)
        (fn(leaf[:, 2:-1]) * w).sum().backward()
        leaf_ref = full.clone().requires_grad_(True)
        (ref(leaf_ref[:, 2:-1]) * w).sum().backward()
        torch.testing.assert_close(leaf.grad, leaf_ref.grad, rtol=1e-9, atol=1e-12)


def test_log_probs_from_logits_matches_log_softmax_gather():
    gen = torch.Generator().manual_seed(9)
    z = _family("masked", 10, 64, gen).reshape(2, 5, 64)
    finite = torch.isfinite(z)
    tokens = torch.multinomial(finite.reshape(-1, 64).double(), 1, generator=gen).reshape(2, 5)
    w = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    out = F.log_probs_from_logits(z, tokens, chunk_size=3)
    torch.testing.assert_close(out, ref_log_probs(z, tokens), rtol=1e-10, atol=1e-12)
    g = _grad(lambda x: F.log_probs_from_logits(x, tokens, chunk_size=3), z, w)
    torch.testing.assert_close(g, _grad(lambda x: ref_log_probs(x, tokens), z, w), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="tokens"):
        F.log_probs_from_logits(z, tokens[:, :3])


def test_skipped_rows_get_zero_gradient():
    """Rows whose incoming gradient is 0 (padding) are not recomputed and get exact zeros."""
    z = torch.randn(6, 50, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    for fn in (F.entropy, F.min_entropy, lambda x, chunk_size: F.trust_region_entropy(x, top_p=0.9, chunk_size=chunk_size).value):
        z.grad = None
        (fn(z, chunk_size=2) * w).sum().backward()
        assert (z.grad[[0, 1, 3, 4, 5]] == 0).all()
        assert (z.grad[2] != 0).any()


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(dtype):
    gen = torch.Generator().manual_seed(10)
    z = torch.cat([_family("random", 8, 500, gen), _family("peaked", 8, 500, gen)]).to(dtype)
    z64 = z.double()  # the reference sees exactly the rounded inputs
    w = torch.randn(16, generator=gen, dtype=torch.float64)
    tol = {"rtol": 1e-5, "atol": 2e-5}
    gtol = {"rtol": 1e-2, "atol": 1e-3} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 2e-5}
    pairs = [
        (lambda x: F.entropy(x, chunk_size=5), ref_entropy),
        (lambda x: F.min_entropy(x, chunk_size=5), ref_min_entropy),
        (lambda x: F.trust_region_entropy(x, top_k=2, chunk_size=5).value, lambda x: ref_tre(x, top_k=2)[0]),
        (lambda x: F.trust_region_entropy(x, top_p=0.99, chunk_size=5).value, lambda x: ref_tre(x, top_p=0.99)[0]),
    ]
    for fn, ref in pairs:
        out = fn(z)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref(z64), **tol)
        leaf = z.clone().requires_grad_(True)
        (fn(leaf).double() * w).sum().backward()
        assert leaf.grad.dtype == dtype
        # rounding to bfloat16 creates ties (e.g. at the top-2 boundary)
        _tie_groups_match(leaf.grad.double(), _grad(ref, z64, w), z64, **gtol)


# --------------------------------------------------------------------------- gradcheck (float64)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(11)
    z = (torch.randn(2, 3, 11, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    zm = z.detach().clone()
    zm[0, 0, :4] = -INF
    zm.requires_grad_(True)
    tokens = torch.randint(0, 11, (2, 3), generator=gen)
    fns = [
        lambda x: F.entropy(x, chunk_size=2),
        lambda x: F.min_entropy(x, chunk_size=2),
        lambda x: F.log_probs_from_logits(x, tokens, chunk_size=2),
        lambda x: F.trust_region_entropy(x, top_k=3, chunk_size=2).value,
        lambda x: F.trust_region_entropy(x, top_p=0.8, chunk_size=2).value,
        lambda x: F.trust_region_entropy(x, top_p=1.0, chunk_size=2).value,
    ]
    for fn in fns:
        assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6)
    for fn in (fns[0], fns[1], fns[3], fns[4], fns[5]):  # masked vocabulary (-inf stays -inf)
        assert torch.autograd.gradcheck(fn, (zm,), eps=1e-6, atol=1e-6)


def test_region_reference_is_literal():
    """The reference's own region rule on a hand example (mass ranked above < P)."""
    row = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))
    assert region(row, top_p=0.5) == [0]
    assert region(row, top_p=0.79) == [0, 1]
    assert region(row, top_p=0.81) == [0, 1, 2]
    assert region(row, top_p=1.0) == [0, 1, 2, 3]
    out = F.trust_region_entropy(row[None], top_p=0.81)
    assert int(out.region_size) == 3


# --------------------------------------------------------------------------- validation and memory


def test_argument_validation():
    z = torch.randn(2, 10)
    with pytest.raises(ValueError, match="exactly one"):
        F.trust_region_entropy(z)
    with pytest.raises(ValueError, match="exactly one"):
        F.trust_region_entropy(z, top_k=2, top_p=0.9)
    with pytest.raises(ValueError, match="top_k"):
        F.trust_region_entropy(z, top_k=0)
    for p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            F.trust_region_entropy(z, top_p=p)
    with pytest.raises(ValueError, match="max_region"):
        F.trust_region_entropy(z, top_p=0.9, max_region=0)
    with pytest.raises(ValueError, match="chunk_size"):
        F.entropy(z, chunk_size=0)
    with pytest.raises(TypeError, match="floating"):
        F.entropy(torch.ones(2, 3, dtype=torch.long))


def _peak_allocated(fn) -> int:
    """Peak bytes allocated through torch's CPU allocator during fn (profiler memory events)."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            mem = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    mem.sort(key=lambda e: e["ts"])
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] - start for e in mem)


@pytest.mark.parametrize(
    "name",
    ["entropy", "min_entropy", "tre_k", "tre_p", "log_probs"],
)
def test_extra_memory_is_a_few_chunks(name):
    """Forward and backward hold O(chunk x V) beyond the logits and their gradient."""
    rows, vocab, chunk = 64, 20000, 4
    gen = torch.Generator().manual_seed(12)
    z = (torch.randn(rows, vocab, generator=gen) * 2).requires_grad_(True)
    z.data[:, 0] += 8.0  # mostly small nuclei, some wide ones
    z.data[:3] *= 0.05  # flat rows: nuclei in the thousands (the histogram path)
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    fn = {
        "entropy": lambda: F.entropy(z, chunk_size=chunk),
        "min_entropy": lambda: F.min_entropy(z, chunk_size=chunk),
        "tre_k": lambda: F.trust_region_entropy(z, top_k=2, chunk_size=chunk).value,
        "tre_p": lambda: F.trust_region_entropy(z, top_p=0.99, chunk_size=chunk).value,
        "log_probs": lambda: F.log_probs_from_logits(z, tokens, chunk_size=chunk),
    }[name]
    unit = chunk * vocab * 4
    holder = {}
    fwd = _peak_allocated(lambda: holder.setdefault("out", fn()))
    bwd = _peak_allocated(lambda: holder["out"].sum().backward())
    grad_bytes = z.grad.numel() * 4
    assert fwd <= 4 * unit
    assert bwd - grad_bytes <= 4 * unit


# --------------------------------------------------------------------------- exact nucleus: the "< P" rule, ties, fallbacks


def _exact_mass_rows(dtype: torch.dtype, n_tied_in: int) -> tuple[torch.Tensor, float]:
    """One row whose probabilities are powers of two: 1/2 for token 0 and 2**-11 for
    1,024 tied tokens, with P = 1/2 + n_tied_in * 2**-11 exactly (a cumulative mass)."""
    z = torch.full((1, 1025), -10 * math.log(2), dtype=dtype)
    z[0, 0] = 0.0
    p = torch.softmax(z, -1)
    assert p[0, 0] == 0.5 and bool((p[0, 1:] == 2**-11).all())  # the premise: exact float probabilities
    return z, 0.5 + n_tied_in * 2**-11


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_tied_in", [100, 300])  # 101 tokens: sparse path; 301: dense path
def test_tre_p_cumulative_mass_equal_to_p_excludes_the_next_token(dtype, n_tied_in):
    """Mass ranked above == P exactly: that token is out (the rule is "< P", not "<= P").

    Token 0 (p = 1/2) and 1,024 tokens of p = 2**-11: with P = 1/2 + m 2**-11 the
    region is token 0 and the first m tied tokens (lowest ids), m + 1 in all.
    Checked against the mutant ``incl = ... < top_p`` -> ``<= top_p`` in
    ``_nucleus._select``: the region gets m + 2 tokens and all four cases fail
    (sparse and dense path, float32 and float64).
    """
    z, top_p = _exact_mass_rows(dtype, n_tied_in)
    zg = z.clone().requires_grad_(True)
    out = F.trust_region_entropy(zg, top_p=top_p)
    assert int(out.region_size) == n_tied_in + 1
    q = torch.tensor([0.5] + [2**-11] * n_tied_in, dtype=torch.float64)
    q = q / q.sum()
    expect = math.log(1025) / math.log(n_tied_in + 1) * float(-(q * q.log()).sum())
    # (the value is the entropy of the local softmax of the logits, whose float32
    # rounding of -10 ln 2 moves it by ~1e-6 from this hand value)
    torch.testing.assert_close(out.value.double(), torch.tensor([expect], dtype=torch.float64), rtol=1e-5, atol=0)
    out.value.sum().backward()
    g = zg.grad[0]
    assert (g[n_tied_in + 1 :] == 0).all()  # the tied tokens left out (higher ids) get no gradient
    assert (g[1 : n_tied_in + 1] != 0).all()
    ref, size = ref_tre(z.double(), top_p=top_p)
    assert int(size) == n_tied_in + 1
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.value.double(), ref, rtol=tol, atol=0)


def test_tre_p_capped_top16_path_cumulative_mass_equal_to_p():
    """The capped variant's top-16 stage applies the same "< P" rule at an exact tie.

    Probabilities 1/2, 1/4, 1/8, 1/16, 1/16 (exact in float32) and P = 3/4:
    the region is the first two tokens. Checked against the mutant ``(cs <
    top_p)`` -> ``(cs <= top_p)`` in ``_tre_capped``: it gives 3 tokens and this
    test fails. The uncapped kernel (no top-16 stage any more) is checked too.
    """
    p = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]])
    z = p.log()
    assert torch.equal(torch.softmax(z, -1), p)  # the premise: exact float32 probabilities
    for kwargs in ({"max_region": 256}, {}):
        out = F.trust_region_entropy(z, top_p=0.75, **kwargs)
        assert int(out.region_size) == 2
        q = torch.tensor([2 / 3, 1 / 3])
        torch.testing.assert_close(out.value, math.log(5) / math.log(2) * -(q * q.log()).sum()[None])


@pytest.mark.parametrize("m", [3, 40, 900])  # small region, small but spread over blocks, dense
def test_tre_p_exact_mass_of_random_rows(m):
    """P equal to the exact (float64) sum of the m largest float32 probabilities of a row
    (untied logits) gives a region of exactly m tokens, on the sparse and the dense path.

    Whether a mutant of the rule shows here depends on whether token m + 1 falls
    in the boundary's value bin; the tied-token tests above are the ones checked
    against the mutants.
    """
    gen = torch.Generator().manual_seed(m)
    z = (torch.randn(3, 4000, generator=gen) * 0.7).float()
    p = torch.softmax(z, -1)
    for row in range(3):
        top = p[row].sort(descending=True).values[:m]
        top_p = math.fsum(top.double().tolist())  # exact: float32 values >= 2**-29
        assert top_p < 1.0
        out = F.trust_region_entropy(z[row : row + 1], top_p=top_p)
        assert int(out.region_size) == m
        # the value over those m tokens (the float64 reference's own
        # probabilities differ by ~1e-8 and may draw the line elsewhere here)
        q = torch.log_softmax(z[row].double().sort(descending=True).values[:m], 0)
        expect = math.log(4000) / math.log(m) * float(-(q.exp() * q).sum())
        torch.testing.assert_close(out.value.double(), torch.tensor([expect], dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_tre_p_support_when_the_float32_mass_never_reaches_p():
    """P above the total of the float32 probabilities: the region is every finite logit."""
    gen = torch.Generator().manual_seed(13)
    z = (torch.randn(2, 3000, generator=gen) * 1.5).float()
    z[1, :700] = -INF
    totals = [math.fsum(r) for r in torch.softmax(z, -1).double().tolist()]
    top_p = math.nextafter(max(totals), 2.0)
    if top_p >= 1.0:
        pytest.skip("float32 probabilities of this row sum to >= 1; the premise does not hold")
    out = F.trust_region_entropy(z, top_p=top_p)
    finite = torch.isfinite(z).sum(-1)
    assert torch.equal(out.region_size, finite)
    expect = torch.where(finite > 1, math.log(3000) / finite.double().log() * ref_entropy(z.double()), 0.0)
    torch.testing.assert_close(out.value.double(), expect, rtol=1e-5, atol=1e-6)


def _mixed_rows(vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Peaked, flat, tied and masked rows in one batch (every path of the kernel in one chunk)."""
    parts = [
        _family("peaked", 3, vocab, gen),
        _family("flat", 3, vocab, gen) * 5,  # nuclei of thousands: dense rows
        _family("random", 3, vocab, gen) / 2,
        _family("tied", 2, vocab, gen),
        _family("masked", 3, vocab, gen),
    ]
    return torch.cat(parts)[torch.randperm(14, generator=gen)]


@pytest.mark.parametrize("band", ["predicted", "too_high", "too_low", "empty", "everything"])
def test_tre_p_exact_whatever_band_is_predicted(band, monkeypatch):
    """Wrong band predictions only cost time: the band is checked exactly and widened.

    ``too_high`` puts the band above the boundary (it is widened downwards),
    ``too_low`` below it (upwards), ``empty`` has no token at all; every row must
    still match the literal reference, values, sizes and gradients.
    """
    from tre_lightning.regularizers import _nucleus

    orig = _nucleus.predict_band

    def fake(z, p, zmax, top_p, active, work):
        lo, hi = orig(z, p, zmax, top_p, active, work)
        inf = torch.full_like(lo, INF)
        if band == "too_high":
            lo, hi = zmax - 1e-3, inf
        elif band == "too_low":
            lo, hi = torch.full_like(lo, -INF), z.masked_fill(torch.isinf(z), INF).amin(1) + 1e-3
        elif band == "empty":
            lo = hi = zmax - 0.5
        elif band == "everything":
            lo, hi = torch.full_like(lo, -INF), inf
        return torch.where(active, lo, inf), torch.where(active, hi, inf)

    monkeypatch.setattr(_nucleus, "predict_band", fake)
    gen = torch.Generator().manual_seed(21)
    z = _mixed_rows(3000, gen)
    w = torch.randn(14, generator=gen, dtype=torch.float64)
    out = F.trust_region_entropy(z, top_p=0.9, chunk_size=5)
    ref, size = ref_tre(z, top_p=0.9)
    assert torch.equal(out.region_size, size)
    torch.testing.assert_close(out.value, ref, rtol=1e-9, atol=1e-11)
    g = _grad(lambda x: F.trust_region_entropy(x, top_p=0.9, chunk_size=5).value, z, w)
    g_ref = _grad(lambda x: ref_tre(x, top_p=0.9)[0], z, w)
    _tie_groups_match(g, g_ref, z, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("top_p", [0.5, 0.99])
def test_tre_p_mixed_batch_matches_reference(top_p):
    """Sparse, dense, dominant-token, tied and masked rows side by side in chunks."""
    gen = torch.Generator().manual_seed(22)
    z = _mixed_rows(3000, gen)
    w = torch.randn(14, generator=gen, dtype=torch.float64)
    out = F.trust_region_entropy(z, top_p=top_p, chunk_size=6)
    ref, size = ref_tre(z, top_p=top_p)
    assert torch.equal(out.region_size, size)
    assert int(size.max()) > 256  # the dense path is exercised
    torch.testing.assert_close(out.value, ref, rtol=1e-9, atol=1e-11)
    g = _grad(lambda x: F.trust_region_entropy(x, top_p=top_p, chunk_size=6).value, z, w)
    g_ref = _grad(lambda x: ref_tre(x, top_p=top_p)[0], z, w)
    _tie_groups_match(g, g_ref, z, rtol=1e-8, atol=1e-11)


def test_gradcheck_float64_dense_region():
    """The dense backward (regions above SMALL_REGION tokens), masked logits included."""
    gen = torch.Generator().manual_seed(23)
    z = torch.randn(2, 400, generator=gen, dtype=torch.float64) * 0.1
    z[1, :30] = -INF
    fn = lambda x: F.trust_region_entropy(x, top_p=0.95).value  # noqa: E731
    assert int(fn(z).min()) > 0 and int(F.trust_region_entropy(z, top_p=0.95).region_size.min()) > F.SMALL_REGION
    assert torch.autograd.gradcheck(fn, (z.requires_grad_(True),), eps=1e-6, atol=1e-6)


@pytest.mark.slow
def test_fused_cpu_passes_match_eager(monkeypatch):
    """The compiled (fused) CPU passes give the same regions and, to rounding, the same
    values and gradients as the eager ones (flat, peaked, tied and masked float32 rows)."""
    from tre_lightning.regularizers import _fuse

    gen = torch.Generator().manual_seed(24)
    z = torch.cat([_mixed_rows(20000, gen), (torch.randn(4, 20000, generator=gen) * 2).double()]).float()
    w = torch.randn(z.shape[0], generator=gen)
    runs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("TRE_LIGHTNING_COMPILE", mode)
        leaf = z.clone().requires_grad_(True)
        out = F.trust_region_entropy(leaf, top_p=0.99, chunk_size=8)
        (out.value * w).sum().backward()
        runs[mode] = (out.region_size, out.value, leaf.grad)
    assert _fuse._compiled.get("above_sums") is not None and _fuse._compiled.get("dense_grad") is not None
    assert torch.equal(runs["0"][0], runs["1"][0])
    torch.testing.assert_close(runs["1"][1], runs["0"][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs["1"][2], runs["0"][2], rtol=1e-4, atol=1e-7)


def test_tre_p_boundary_token_on_the_band_edge(monkeypatch):
    """The tokens above the band already hold exactly P: the boundary is the last of
    them, not a band token (the check is ``mass above >= P``).

    Probabilities 1/2, 1/4, 1/8, 1/16, 1/16 (exact in float32), P = 3/4 and a band
    forced to start just below token 1: the region is tokens 0 and 1, with their
    gradient. Checked against two mutants, each of which fails this test (the
    boundary logit is lost and the region's gradient comes out zero):
    ``fail_above = m_a >= top_p`` -> ``>`` in ``nucleus_chunk``, and the
    boundary-bin comparison ``... + suf[:, :nb] >= top_p`` -> ``>`` in ``_select``.
    """
    from tre_lightning.regularizers import _nucleus

    p = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]])
    z = p.log()
    assert torch.equal(torch.softmax(z, -1), p)
    edge = float((z[0, 1] + z[0, 2]) / 2)

    def fake(z_, p_, zmax, top_p, active, work):
        return torch.full_like(zmax, -INF), torch.full_like(zmax, edge)

    monkeypatch.setattr(_nucleus, "predict_band", fake)
    monkeypatch.setattr(F, "SMALL_REGION", 1)  # the dense path, which uses the boundary logit
    zg = z.clone().requires_grad_(True)
    out = F.trust_region_entropy(zg, top_p=0.75)
    assert int(out.region_size) == 2
    out.value.sum().backward()
    g_ref = _grad(lambda x: ref_tre(x, top_p=0.75)[0], z.double(), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(zg.grad.double(), g_ref, rtol=1e-5, atol=1e-6)
