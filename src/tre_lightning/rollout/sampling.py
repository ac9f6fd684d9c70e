"""Exact next-token sampling from softmax(z / T) with optional top-k / top-p, few vocabulary passes.

HF ``generate`` samples with ``torch.multinomial`` on the full softmax, which
on CPU draws one exponential variate per vocabulary entry (measured: 10-20x
the cost of the softmax itself at V = 151,936). Here one uniform (float64)
per row picks the token by inverse CDF in two levels: blocks of ``B`` tokens
(B ~ sqrt(V)) first, from the block sums, then the token inside the chosen
block, from a float64 cumulative sum of that block only. Passes over the
vocabulary: max, exp, block sums (plus one for top-k, and about 1/top_p for
top-p); no sort.

Exactness: the probability of token i is ``w_i / sum(w)`` with
``w = exp((z - max z) / T)`` in float32, except that the block sums are
float32 reductions (relative error ~ sqrt(B) * 2^-24, about 1e-6 of that
block's probability). No token with a positive float32 weight is ever given
probability 0, which a float32 cumulative sum over the whole vocabulary would
do to the tail (its rounding step at a CDF near 1 is ~6e-8 per token).

Semantics (the same as HF's warpers and vLLM's sampler, in that order):
temperature, then top-k (the k largest logits and every token tied with the
k-th), then top-p on the renormalised top-k distribution: token x is kept iff
the mass of the tokens strictly more probable than x is below ``top_p``
(HF keeps a sort-order prefix, so among tokens tied with the boundary token
it keeps an arbitrary subset; here all of them are kept). Top-p is sampled
exactly by rejection: draw from the full distribution, accept if the token
is in the nucleus (acceptance probability >= top_p); rows still rejected
after ``max_rejections`` draws get the nucleus by one sort of their row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tre_lightning.rollout.base import SamplingParams

__all__ = ["block_size", "block_sums", "inverse_cdf", "nucleus_weights", "sample_categorical", "sample_next_tokens"]

MAX_REJECTIONS = 4


def block_size(vocab: int) -> int:
    """The two-level sampler's block: the power of two >= sqrt(vocab), at least 64."""
    return max(64, 1 << math.ceil(math.log2(math.sqrt(max(vocab, 1)))))


def block_sums(weights: Tensor, block: int) -> Tensor:
    """(N, V) -> (N, ceil(V / block)) float32 sums of consecutive blocks (the last one may be short)."""
    n, v = weights.shape
    full = v // block
    parts = []
    if full:
        parts.append(weights[:, : full * block].unflatten(-1, (full, block)).sum(-1))
    if v % block:
        parts.append(weights[:, full * block :].sum(-1, keepdim=True))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _uniform(n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    return torch.rand((n, 1), dtype=torch.float64, device=device, generator=generator)


def inverse_cdf(weights: Tensor, sums: Tensor, block: int, u: Tensor) -> Tensor:
    """The index whose CDF interval holds ``u``: block by the block sums, token by a float64 cumsum of the block.

    weights: (N, V) float32 >= 0; sums: (N, nb) their block sums (:func:`block_sums`);
    u: (N, 1) float64 in [0, 1). Returns (N,) int64; never an index of weight 0.
    """
    n, v = weights.shape
    cum_blocks = sums.double().cumsum(dim=1)  # (N, nb)
    total = cum_blocks[:, -1:]
    target = u * total
    b = torch.searchsorted(cum_blocks, target, right=True)  # (N, 1): cum_blocks[b] > target >= cum_blocks[b-1]
    # u * total can round up to total (u = 1 - 2^-53): take the last block with mass
    last_positive = sums.shape[1] - 1 - (sums > 0).flip(1).int().argmax(dim=1, keepdim=True)
    b = torch.minimum(b, last_positive)
    before = torch.where(b > 0, cum_blocks.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    block_mass = cum_blocks.gather(1, b) - before
    frac = ((target - before) / block_mass).clamp_(0.0, 1.0)  # where inside the block, in [0, 1]
    idx = b * block + torch.arange(block, device=weights.device)  # (N, B)
    inside = idx < v
    w = torch.where(inside, weights.gather(1, idx.clamp(max=v - 1)), torch.zeros((), dtype=weights.dtype,
                                                                                    device=weights.device))
    cum = w.double().cumsum(dim=1)  # (N, B)
    goal = frac * cum[:, -1:]
    j = torch.searchsorted(cum, goal, right=False)  # first j with cum[j] >= goal (> 0 => w[j] > 0)
    first_positive = torch.searchsorted(cum, torch.zeros_like(goal), right=True)
    j = torch.where(goal > 0, j, first_positive).clamp_(max=block - 1)
    return (b * block + j).squeeze(1)


def sample_categorical(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of ``weights`` (N, V) >= 0, with P(i) proportional to ``weights[:, i]``.

    Rows need not sum to 1. Returns (N,) int64. Raises ValueError when a row's
    total is 0, infinite or NaN (e.g. NaN logits): there is nothing to sample.
    """
    w = weights.float()
    block = block_size(w.shape[1])
    sums = block_sums(w, block)
    _check_totals(sums)
    return inverse_cdf(w, sums, block, _uniform(w.shape[0], w.device, generator))


def _check_totals(sums: Tensor) -> None:
    total = sums.sum(dim=1)
    if not bool(torch.isfinite(total).all() & (total > 0).all()):
        bad = int((~(torch.isfinite(total) & (total > 0))).nonzero()[0, 0])
        raise ValueError(
            f"cannot sample row {bad}: its logits give no finite positive probability mass "
            "(NaN or infinite logits, or every token masked)"
        )


def nucleus_weights(weights: Tensor, top_p: float) -> Tensor:
    """(N, V) weights with everything outside each row's top-p nucleus set to 0 (one sort per row).

    Nucleus: tokens whose strictly-more-probable mass is below ``top_p`` of the
    row total (ties with the boundary token are all kept). The reference for
    the rejection sampler, and its fallback.
    """
    w = weights.float()
    sorted_w, _ = torch.sort(w, dim=1, descending=True)
    cum = sorted_w.double().cumsum(dim=1)
    before = cum - sorted_w.double()  # mass strictly before each sorted position
    keep = before < top_p * cum[:, -1:]
    last_kept = keep.sum(dim=1, keepdim=True) - 1  # >= 0: position 0 has nothing before it
    threshold = sorted_w.gather(1, last_kept)
    return torch.where(w >= threshold, w, torch.zeros((), dtype=w.dtype, device=w.device))


def _sample_nucleus(w: Tensor, top_p: float, generator: torch.Generator | None, max_rejections: int) -> Tensor:
    """Exact draw from the renormalised top-p nucleus of each row of ``w`` (N, V), by rejection."""
    n = w.shape[0]
    block = block_size(w.shape[1])
    sums = block_sums(w, block)
    _check_totals(sums)
    out = torch.empty(n, dtype=torch.long, device=w.device)
    rows = torch.arange(n, device=w.device)
    rw, rsums = w, sums
    for _ in range(max_rejections):
        tok = inverse_cdf(rw, rsums, block, _uniform(rw.shape[0], rw.device, generator))
        wx = rw.gather(1, tok.unsqueeze(1))
        above = torch.where(rw > wx, rw, torch.zeros((), dtype=rw.dtype, device=rw.device)).sum(1, dtype=torch.float64)
        accept = above < top_p * rsums.double().sum(1)
        out[rows[accept]] = tok[accept]
        if bool(accept.all()):
            return out
        keep = ~accept
        rows, rw, rsums = rows[keep], rw[keep], rsums[keep]
    out[rows] = sample_categorical(nucleus_weights(rw, top_p), generator)
    return out


def sample_next_tokens(
    logits: Tensor,
    sampling: SamplingParams,
    generator: torch.Generator | None = None,
    max_rejections: int = MAX_REJECTIONS,
) -> Tensor:
    """(N, V) next-token logits -> (N,) int64 tokens drawn as ``sampling`` says (argmax when greedy).

    Temperature, top-k and top-p only (see the module docstring); nothing else
    is applied, whatever the model's generation config says.
    """
    if sampling.greedy:
        return logits.argmax(dim=-1)
    z = logits.float()
    if 0 < sampling.top_k < z.shape[1]:
        kth = torch.topk(z, sampling.top_k, dim=1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    w = torch.sub(z, z.amax(dim=1, keepdim=True))
    if sampling.temperature != 1.0:
        w.div_(sampling.temperature)
    w.exp_()
    if sampling.top_p < 1.0:
        return _sample_nucleus(w, sampling.top_p, generator, max_rejections)
    return sample_categorical(w, generator)
