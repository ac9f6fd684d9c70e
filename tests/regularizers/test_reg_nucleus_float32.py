"""Exact TRE-P on float32 probabilities of flat rows (the benchmark's Gaussian cases).

The reference is deliberately slow and obvious: the float32 probabilities that
the kernel uses (``torch.softmax`` of the float32 logits), each turned into an
exact Python integer (a float32 value times 2**149 is an integer), tokens sorted
by (logit descending, id ascending), and a token is in when the exact integer
mass ranked above it is below P (P also exact, as a multiple of 2**-149 or a
Fraction). No float sum appears in the reference, so it does not share the
kernel's float64-accumulation argument.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from tre_lightning.regularizers import functional as F

SCALE = 2**149  # every float32 value is an integer multiple of 2**-149


def _exact_ints(p: torch.Tensor) -> list[int]:
    """Each float32 probability as an exact integer multiple of 2**-149 (scaling a
    float64 by a power of two and truncating an integral float are both exact)."""
    return [int(x * 2.0**149) for x in p.double().tolist()]


def _order(z: torch.Tensor) -> list[int]:
    zl = z.tolist()
    return sorted(range(len(zl)), key=lambda i: (-zl[i], i))


def ref_region(z: torch.Tensor, top_p: Fraction) -> list[int]:
    """Algorithm 1 on the row's float32 probabilities, in exact integer arithmetic."""
    p = torch.softmax(z, dim=0)
    ints = _exact_ints(p)
    bound = top_p * SCALE
    chosen, above = [], 0
    for i in _order(z):
        if above >= bound:  # mass ranked above is not < P: out, and so is every later token
            break
        chosen.append(i)
        above += ints[i]
    return chosen


def ref_value(z: torch.Tensor, idx: list[int]) -> float:
    """log V / log |TR| * H(softmax(z[TR])) in float64 (0 for |TR| <= 1)."""
    if len(idx) <= 1:
        return 0.0
    q = torch.log_softmax(z[idx].double(), 0)
    return math.log(z.numel()) / math.log(len(idx)) * float(-(q.exp() * q).sum())


def _gauss(rows: int, vocab: int, sigma: float, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * sigma


def ref_grad(z: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """d ref_value / d z (float64 autograd over the region's logits; 0 elsewhere)."""
    zz = z.double().requires_grad_(True)
    q = torch.log_softmax(zz[idx], 0)
    (math.log(z.numel()) / math.log(len(idx)) * -(q.exp() * q).sum()).backward()
    return zz.grad


def _check_rows(z: torch.Tensor, top_p: float | list[Fraction], grad: bool = False) -> list[int]:
    """Region sizes and values (and with ``grad`` the gradients) of the kernel equal
    the exact reference's, row by row."""
    tps = top_p if isinstance(top_p, list) else [Fraction(top_p)] * z.shape[0]
    sizes = []
    for r in range(z.shape[0]):
        idx = ref_region(z[r], tps[r])
        leaf = z[r : r + 1].clone().requires_grad_(grad)
        out = F.trust_region_entropy(leaf, top_p=float(tps[r]))
        assert int(out.region_size) == len(idx), f"row {r}"
        assert math.isclose(float(out.value.detach()), ref_value(z[r], idx), rel_tol=2e-5, abs_tol=1e-6), f"row {r}"
        if grad:
            out.value.sum().backward()
            g_ref = ref_grad(z[r], idx)
            torch.testing.assert_close(leaf.grad[0].double(), g_ref, rtol=1e-3, atol=1e-5 * float(g_ref.abs().max()))
        sizes.append(len(idx))
    return sizes


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
def test_flat_gaussian_rows_match_the_exact_reference(sigma):
    """N(0, sigma^2) float32 rows at V = 32,000, P = 0.99: nuclei of 7,000-29,000 tokens,
    found exactly (the band prediction, the exact sums above it and the value-bin select)."""
    z = _gauss(3, 32000, sigma, seed=int(sigma))
    sizes = _check_rows(z, 0.99)
    assert min(sizes) > 5000  # the premise: wide rows, far beyond any top-k stage


def test_flat_rows_in_one_chunk_match_the_exact_reference():
    """The same rows batched (one chunk, several rows per scan) give the same regions."""
    z = torch.cat([_gauss(2, 32000, s, seed=10 + int(s)) for s in (1.0, 2.0, 3.0)])
    out = F.trust_region_entropy(z, top_p=0.99)
    sizes = torch.tensor([len(ref_region(z[r], Fraction(0.99))) for r in range(z.shape[0])])
    assert torch.equal(out.region_size, sizes)


def test_mass_ranked_above_equal_to_p_excludes_the_token_on_flat_rows():
    """P equal to the exact mass of the first m tokens of a flat row: exactly m are in.

    m is in the thousands (dense path); P is the exact float32-probability prefix
    mass as a float64 (exact: every term is >= 2**-29, see _nucleus). With
    untied logits tokens m and m + 1 usually fall in different value bins of
    ``_nucleus._select``, where the boundary-bin rule ``base + suf >= P`` is what
    keeps token m + 1 out and token m the boundary: checked against the mutant
    ``>= top_p`` -> ``> top_p`` there, which loses the boundary logit (tau) and
    fails this test's gradient check. (The in-bin mutant ``incl ... < top_p`` ->
    ``<=`` is caught by the tie test below, not here.)
    """
    z = _gauss(3, 32000, 2.0, seed=7)
    tps, ms = [], [4000, 9000, 15000]
    for r, m in enumerate(ms):
        ints = _exact_ints(torch.softmax(z[r], 0))
        mass = Fraction(sum(ints[i] for i in _order(z[r])[:m]), SCALE)
        assert Fraction(float(mass)) == mass  # the premise: representable exactly in float64
        tps.append(mass)
    assert _check_rows(z, tps, grad=True) == ms


def test_exact_ties_at_the_threshold_on_flat_rows():
    """Logits on a grid of 1/8 (V = 32,000, sigma 2): thousands of exactly equal
    probabilities, the threshold falls inside a tie group; only the needed tied
    tokens (lowest ids) are in, for P = 0.99 and for P at a tie group's exact
    partial mass. Checked against the mutant ``incl = ... < top_p`` -> ``<= top_p``
    in ``_nucleus._select``: it takes one tied token too many and this test fails."""
    z = torch.round(_gauss(2, 32000, 2.0, seed=8) * 8) / 8
    _check_rows(z, 0.99)
    # P = mass of everything above a tie group + half of that group: the boundary inside it
    tps = []
    for r in range(2):
        p, zr = torch.softmax(z[r], 0), z[r]
        ints = _exact_ints(p)
        order = _order(zr)
        k = 6000
        tau = float(zr[order[k]])
        group = [i for i in order if float(zr[i]) == tau]
        above = sum(ints[i] for i in order if float(zr[i]) > tau)
        half = len(group) // 2
        tps.append(Fraction(above + half * ints[group[0]], SCALE))
        assert len(group) > 100 and Fraction(float(tps[-1])) == tps[-1]
    sizes = _check_rows(z, tps, grad=True)
    for r in range(2):  # exactly "above + half the group"
        zr = z[r]
        tau = float(zr[_order(zr)[6000]])
        assert sizes[r] == int((zr > tau).sum()) + int((zr == tau).sum()) // 2
