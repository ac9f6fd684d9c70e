"""Slow literal references for the regularizer kernels (test-only, float64, autograd).

Each follows the paper's definitions row by row with Python loops and a full
sort, independently of the chunked kernels under test.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _rows(z: Tensor) -> list[Tensor]:
    return list(z.reshape(-1, z.shape[-1]).unbind(0))


def _stack(vals: list[Tensor], z: Tensor) -> Tensor:
    return torch.stack(vals).reshape(z.shape[:-1])


def ref_entropy(z: Tensor) -> Tensor:
    """-sum p log p over the finite logits (Eq. 4)."""
    out = []
    for row in _rows(z):
        fin = torch.isfinite(row)
        logp = torch.log_softmax(row[fin], dim=0)
        out.append(-(logp.exp() * logp).sum())
    return _stack(out, z)


def ref_min_entropy(z: Tensor) -> Tensor:
    """-log max p (section 7.3); at tied maxima the gradient goes to one of them."""
    return _stack([-torch.log_softmax(row, dim=0).max(dim=0).values for row in _rows(z)], z)


def ref_peak(z: Tensor) -> Tensor:
    return _stack([torch.softmax(row, dim=0).max() for row in _rows(z)], z)


def region(row: Tensor, top_k: int | None = None, top_p: float | None = None, cap: int | None = None) -> list[int]:
    """Algorithm 1 lines 3-8 literally: sort by probability (ties: lower id first)."""
    p = torch.softmax(row.detach().double(), dim=0).tolist()
    finite = torch.isfinite(row).tolist()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    order = [i for i in order if finite[i]]  # -inf: probability 0, not an action
    if top_k is not None:
        return order[:top_k]
    if top_p >= 1.0:
        chosen = order
    else:
        chosen, mass = [], 0.0
        for i in order:
            chosen.append(i)
            mass += p[i]
            if mass >= top_p:
                break
    return chosen if cap is None else chosen[:cap]


def ref_tre(z: Tensor, top_k: int | None = None, top_p: float | None = None, cap: int | None = None) -> tuple[Tensor, Tensor]:
    """Scaled local entropy (Eq. 9 without sign) and region size per row."""
    vocab = z.shape[-1]
    vals, sizes = [], []
    for row in _rows(z):
        idx = region(row, top_k, top_p, cap)
        sizes.append(len(idx))
        if len(idx) <= 1:
            vals.append(row.sum() * 0.0 if torch.isfinite(row).all() else row[idx].sum() * 0.0)
            continue
        q = torch.softmax(row[idx], dim=0)
        h = -(q * q.log()).sum()
        vals.append(math.log(vocab) / math.log(len(idx)) * h)
    return _stack(vals, z), torch.tensor(sizes).reshape(z.shape[:-1])


def ref_log_probs(z: Tensor, tokens: Tensor) -> Tensor:
    return torch.log_softmax(z, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
