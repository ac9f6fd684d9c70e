"""The exact next-token sampler (rollout/sampling.py) against independent float64 references.

Frequency tests use a distribution-free finite-sample bound on the L1 distance
between the empirical frequencies p̂ of N i.i.d. draws and the true p over K
categories (:func:`l1_bound`):

    E ||p̂ - p||_1 <= sum_i sqrt(p_i (1 - p_i) / N)            (Jensen, per category)
    P(||p̂ - p||_1 >= E + t) <= exp(-N t^2 / 2)                (McDiarmid: one draw moves L1 by <= 2/N)

so ``||p̂ - p||_1 <= sum_i sqrt(p_i (1 - p_i) / N) + sqrt(2 ln(1/delta) / N)``
with probability >= 1 - delta; delta = 1e-9 here. The seeds are fixed, so a
test cannot flake; a correct sampler would fail for at most a 1e-9 share of
seeds. A test cannot pass by chance either: with the same draws it also checks
that the plausible wrong distributions (temperature ignored, transformers'
default top-50, top-p before temperature, top-p not applied) are rejected by
the same bound (``assert_sampled_from(..., wrong=...)``), so the sample is
large enough to tell them apart.

Sizes: N = 50,000 draws over V = 300 tokens; the bound is then 0.075 (T = 0.6),
0.071 (top-p 0.7, 98 tokens in the nucleus) and 0.051 (top-k 40 + top-p 0.9);
measured distances were 0.3-0.5 of the bound, the wrong distributions 3.6-18x
the bound.
"""

from __future__ import annotations

import math

import pytest
import torch

from tre_lightning.rollout.base import SamplingParams
from tre_lightning.rollout.sampling import (
    block_size,
    block_sums,
    inverse_cdf,
    nucleus_weights,
    sample_categorical,
    sample_next_tokens,
)

DELTA = 1e-9


def l1_bound(p: torch.Tensor, n: int, delta: float = DELTA) -> float:
    """Upper bound on ||p̂ - p||_1 for n draws from p, holding with probability >= 1 - delta (module docstring)."""
    p = p.double()
    return float(torch.sqrt(p * (1 - p) / n).sum()) + math.sqrt(2 * math.log(1 / delta) / n)


def assert_sampled_from(tokens: torch.Tensor, p: torch.Tensor, wrong: dict[str, torch.Tensor]) -> None:
    """The draws fit p within the bound, and each wrong distribution is rejected by the same bound."""
    n, k = tokens.numel(), p.numel()
    freq = torch.bincount(tokens.flatten(), minlength=k).double() / n
    assert freq.numel() == k, "a token outside the vocabulary was drawn"
    assert bool((freq[p == 0] == 0).all()), "a token of probability 0 was drawn"
    dist, bound = float((freq - p.double()).abs().sum()), l1_bound(p, n)
    assert dist <= bound, f"||p̂ - p||_1 = {dist:.4f} > bound {bound:.4f} (n = {n})"
    for name, q in wrong.items():
        qd, qb = float((freq - q.double()).abs().sum()), l1_bound(q, n)
        assert qd > qb, f"the test cannot tell p from '{name}': ||p̂ - q||_1 = {qd:.4f} <= {qb:.4f}"


def reference_probs(z: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Slow float64 reference: softmax(z / T), top-k (ties kept), top-p nucleus (ties at the boundary kept)."""
    p = torch.softmax(z.double() / temperature, dim=0)
    if top_k:
        kth = sorted(z.tolist(), reverse=True)[top_k - 1]
        p = torch.where(z >= kth, p, 0.0)
        p = p / p.sum()
    if top_p < 1:
        values = p.tolist()
        kept = [i for i, v in enumerate(values) if sum(x for x in values if x > v) < top_p]
        mask = torch.zeros_like(p, dtype=torch.bool)
        mask[kept] = True
        p = torch.where(mask, p, 0.0)
        p = p / p.sum()
    return p


def draw_many(z: torch.Tensor, sampling: SamplingParams, n: int, seed: int = 0, chunk: int = 50_000,
              **kwargs: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = [sample_next_tokens(z.expand(min(chunk, n - i), -1).contiguous(), sampling, generator=gen, **kwargs)
           for i in range(0, n, chunk)]
    return torch.cat(out)


# V = 300: the two-level sampler's block is 64, so 4 full blocks and a short one of 44 tokens
LOGITS = torch.randn(300, generator=torch.Generator().manual_seed(3)) * 1.2
N = 50_000


def test_temperature_draws_follow_softmax_z_over_t() -> None:
    """T = 0.6, no top-k / top-p. Checked to fail when the temperature is ignored (``w.div_`` removed)."""
    sampling = SamplingParams(temperature=0.6)
    tokens = draw_many(LOGITS, sampling, N)
    assert_sampled_from(tokens, reference_probs(LOGITS, 0.6), wrong={
        "temperature ignored": reference_probs(LOGITS),
        "default top-50": reference_probs(LOGITS, 0.6, top_k=50),
    })


@pytest.mark.parametrize("max_rejections", [4, 0])
def test_top_p_draws_follow_the_renormalised_nucleus(max_rejections: int) -> None:
    """T = 1.3, top-p 0.7, by rejection (4 tries, then the sort fallback) and by the sort fallback alone.

    Checked to fail (rejection variant) when every draw is accepted (top-p not applied).
    """
    sampling = SamplingParams(temperature=1.3, top_p=0.7)
    tokens = draw_many(LOGITS, sampling, N, seed=1, max_rejections=max_rejections)
    assert_sampled_from(tokens, reference_probs(LOGITS, 1.3, top_p=0.7), wrong={
        "top-p not applied": reference_probs(LOGITS, 1.3),
        "top-p before temperature": _nucleus_then_temperature(LOGITS, 1.3, 0.7),
        "default top-50 then top-p": reference_probs(LOGITS, 1.3, top_k=50, top_p=0.7),
    })


def _nucleus_then_temperature(z: torch.Tensor, t: float, top_p: float) -> torch.Tensor:
    keep = reference_probs(z, 1.0, top_p=top_p) > 0
    p = torch.where(keep, torch.softmax(z.double() / t, 0), 0.0)
    return p / p.sum()


def test_top_k_then_top_p() -> None:
    """top-k 40, top-p 0.9 at T = 0.8: top-p on the renormalised top-k distribution (HF's and vLLM's order)."""
    sampling = SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
    tokens = draw_many(LOGITS, sampling, N, seed=2)
    assert_sampled_from(tokens, reference_probs(LOGITS, 0.8, top_k=40, top_p=0.9), wrong={
        "top-k ignored": reference_probs(LOGITS, 0.8, top_p=0.9),
        "top-p ignored": reference_probs(LOGITS, 0.8, top_k=40),
    })


def test_small_top_p_is_argmax_and_greedy_is_argmax() -> None:
    z = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_tokens(z, SamplingParams(top_p=1e-6)), z.argmax(1))
    assert torch.equal(sample_next_tokens(z, SamplingParams(greedy=True, temperature=5.0, top_k=3)), z.argmax(1))


def test_nucleus_weights_match_the_slow_reference_with_ties() -> None:
    """Integer and bf16-rounded logits have many ties; the nucleus keeps every token tied with its boundary."""
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(-3, 4, (40,), generator=gen).float() for _ in range(20)]
    rows += [(torch.randn(200, generator=gen) * 2).bfloat16().float() for _ in range(20)]
    for z in rows:
        for top_p in (0.1, 0.5, 0.7, 0.95):
            got = nucleus_weights(torch.softmax(z, 0).unsqueeze(0), top_p)[0] > 0
            want = reference_probs(z, top_p=top_p) > 0
            assert torch.equal(got, want), (z, top_p)


def test_tail_tokens_keep_their_probability_at_a_151936_vocabulary() -> None:
    """Inverse CDF at the centre of each tiny token's interval returns that token.

    One token of weight 1 and 384 tokens of weight 2^-30 (probability ~1e-9
    each) in the last, short block of a 151,936-token row; all other weights 0.
    Every sum involved is exact in float32, so the expected index is computed
    independently in float64. A float32 cumulative sum over the whole row (the
    obvious cumsum + searchsorted sampler) loses them: 1 + 2^-30 rounds to 1,
    and every such u lands on the last index; the test checks that too.
    """
    v = 151_936
    block = block_size(v)
    tail = v % block
    assert (block, tail) == (512, 384)
    w = torch.zeros(1, v)
    w[0, 0] = 1.0
    w[0, v - tail :] = 2.0**-30
    total = 1.0 + tail * 2.0**-30
    sums = block_sums(w, block)
    for j in (0, 1, 100, 383):
        u = torch.tensor([[(1.0 + (j + 0.5) * 2.0**-30) / total]], dtype=torch.float64)
        assert int(inverse_cdf(w, sums, block, u)) == v - tail + j
        naive = torch.searchsorted(w.cumsum(1), (u * total).float(), right=True).clamp(max=v - 1)
        assert int(naive) != v - tail + j or j == tail - 1
    assert int(inverse_cdf(w, sums, block, torch.tensor([[0.5]], dtype=torch.float64))) == 0


def test_categorical_never_draws_zero_weight_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(512, 700, generator=gen)
    w[w < 0.9] = 0.0
    w[:, :5] = 0.0
    tokens = sample_categorical(w, generator=gen)
    assert bool((w.gather(1, tokens.unsqueeze(1)) > 0).all())


def test_u_at_the_edges_of_zero() -> None:
    w = torch.tensor([[0.0, 0.0, 2.0, 0.0, 1.0] + [0.0] * 200])
    sums = block_sums(w, block_size(w.shape[1]))
    assert int(inverse_cdf(w, sums, block_size(w.shape[1]), torch.zeros(1, 1, dtype=torch.float64))) == 2
    almost_one = torch.tensor([[1.0 - 2.0**-53]], dtype=torch.float64)
    assert int(inverse_cdf(w, sums, block_size(w.shape[1]), almost_one)) == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_refused(bad: float) -> None:
    z = torch.randn(3, 100)
    z[1, 7] = bad
    with pytest.raises(ValueError, match="cannot sample row 1"):
        sample_next_tokens(z, SamplingParams())
    with pytest.raises(ValueError, match="cannot sample row 0"):
        sample_next_tokens(torch.full((1, 10), float("-inf")), SamplingParams(top_p=0.5))


def test_block_size() -> None:
    assert block_size(1) == 64 and block_size(4096) == 64 and block_size(151_936) == 512
    assert block_size(300) == 64 and block_size(10_000) == 128
