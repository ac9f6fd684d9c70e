"""Chunked, memory-bounded kernels over logits of shape (..., V).

Pure functions; the strategy objects in this package and the module's main
pass call them. Every kernel:

* treats its input as N = prod(shape[:-1]) rows of V logits and processes
  ``chunk_size`` rows at a time, in forward and in backward (the backward
  recomputes what it needs per chunk from the saved logits), so that the
  memory beyond the logits and their gradient stays O(chunk_size x V);
* computes in float32 for bfloat16 / float16 inputs (float64 stays float64)
  and returns float32 (or float64) values; gradients come back in the dtype
  of the logits;
* accepts ``-inf`` logits (masked vocabulary): such tokens have probability
  0 and are not part of any trust region. A row must have at least one
  finite logit; a row of only ``-inf`` gives NaN entropies.
* accepts non-contiguous inputs such as ``logits[:, P - 1 : -1]`` without
  copying them (see :class:`~tre_lightning.regularizers._rows.Rows`).

``chunk_size=None`` picks :func:`~tre_lightning.regularizers._rows.default_chunk_size`
(55 rows at V = 151,936 on CPU, 1,024 rows on accelerators).

The trust-region kernel (TRE-K, TRE-P; paper Eq. 7-9, Algorithm 1) never
sorts the vocabulary. TRE-K takes a top-k. TRE-P finds the exact nucleus
(the smallest set of tokens whose probability reaches P, ties and the "mass
ranked above < P" rule of Algorithm 1) with a fixed number of passes per row
whatever the distribution (:mod:`~tre_lightning.regularizers._nucleus`): a
band of logits predicted from a subsample, exact float64 sums above it, and
an exact select inside it. Rows with at most ``SMALL_REGION`` tokens keep a
sparse gradient; larger regions are recomputed densely in backward from the
saved logits (one fused pass on CPU, see
:mod:`~tre_lightning.regularizers._fuse`). The capped variant
(``max_region``) takes top-k's of 16, 256 and the cap.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F_nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from tre_lightning.regularizers import _fuse
from tre_lightning.regularizers._nucleus import nucleus_chunk
from tre_lightning.regularizers._rows import Rows, Scratch, compute_dtype, resolve_chunk_size

__all__ = [
    "TrustRegionEntropy",
    "entropy",
    "log_probs_from_logits",
    "min_entropy",
    "peak_probability",
    "token_stats",
    "trust_region_entropy",
]


def _finite_min(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def _setup(logits: Tensor, chunk_size: int | None) -> tuple[Rows, int, torch.dtype, Scratch]:
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating point tensor, got {logits.dtype}")
    rows = Rows(logits)
    chunk = resolve_chunk_size(chunk_size, rows.vocab, logits.device)
    cdt = compute_dtype(logits.dtype)
    return rows, chunk, cdt, Scratch(min(chunk, rows.n), rows.vocab, cdt, logits.device)


def _log_softmax_into(zf: Tensor, scratch: Scratch) -> Tensor:
    """log_softmax over the last dim (one fused kernel), into a reused buffer."""
    return torch.ops.aten._log_softmax.out(zf, -1, False, out=scratch.get("lp", zf.shape[0]))


def _softmax_into(zf: Tensor, out: Tensor) -> Tensor:
    """softmax over the last dim (one fused kernel), into ``out``."""
    return torch.ops.aten._softmax.out(zf, -1, False, out=out)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b, -1) per row without an (r, V) temporary on CPU."""
    if a.device.type == "cpu":
        return torch.stack([torch.dot(x, y) for x, y in zip(a, b, strict=True)])
    return torch.linalg.vecdot(a, b)


def _scaled_probs(zf: Tensor, scale: Tensor, dst: Tensor, scratch: Scratch) -> Tensor:
    """scale * softmax(z) per row, into ``dst`` when the dtypes allow."""
    out = dst if dst.dtype == zf.dtype else scratch.get("p", zf.shape[0])
    return _softmax_into(zf, out).mul_(scale[:, None])


def _entropy_rows(zf: Tensor, scratch: Scratch) -> tuple[Tensor, Tensor, Tensor]:
    """Entropy, peak probability and a has -inf flag per row of a chunk.

    H = -sum(p log p) with p and log p from the fused softmax / log-softmax
    kernels; rows with -inf logits (0 * -inf) are redone with a finite floor.
    """
    r = zf.shape[0]
    lp = _log_softmax_into(zf, scratch)
    p = _softmax_into(zf, scratch.get("p", r))
    h = _row_dot(p, lp).neg_()
    bad = ~torch.isfinite(h)
    if bool(bad.any()):
        lb = lp[bad].clamp(min=_finite_min(lp.dtype))
        h[bad] = -(p[bad] * lb).sum(-1)
    return h, lp.amax(dim=-1).exp_(), bad


# --------------------------------------------------------------------------
# Shannon entropy, analytic backward dH/dz = -p (log p + H)
# --------------------------------------------------------------------------


class _EntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, chunk_size: int | None) -> Tensor:  # type: ignore[override]
        rows, chunk, cdt, scratch = _setup(logits, chunk_size)
        h = logits.new_empty(rows.n, dtype=cdt)
        flagged = torch.zeros(rows.n, dtype=torch.bool, device=logits.device)  # rows with -inf
        for s, zc in rows.chunks(chunk):
            r = zc.shape[0]
            h[s : s + r], _, flagged[s : s + r] = _entropy_rows(scratch.as_compute(zc), scratch)
        ctx.save_for_backward(logits, flagged)
        ctx.chunk, ctx.cdt = chunk, cdt
        return h.view(rows.lead_shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, flagged = ctx.saved_tensors
        rows = Rows(logits)
        cdt = ctx.cdt
        scratch = Scratch(min(ctx.chunk, rows.n), rows.vocab, cdt, logits.device)
        gneg = grad_out.reshape(-1).to(cdt).neg()
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        g2 = grad.view(-1, rows.vocab)
        for s, zc in rows.chunks(ctx.chunk):
            r = zc.shape[0]
            dst = g2[s : s + r]
            gs = gneg[s : s + r]
            if not bool(gs.any()):
                dst.zero_()
                continue
            zf = scratch.as_compute(zc)
            p = _softmax_into(zf, scratch.get("p", r))
            if bool(flagged[s : s + r].any()):  # keep 0 * finite on masked tokens
                zf = torch.clamp(zf, min=_finite_min(cdt), out=scratch.get("t", r))
            # dH/dz = -p (log p + H) = -p (z - sum p z): the softmax backward
            # kernel with z as the incoming gradient, then the row scale.
            out = dst if dst.dtype == cdt else scratch.get("g", r)
            torch.ops.aten._softmax_backward_data.out(zf, p, -1, cdt, grad_input=out)
            out.mul_(gs[:, None])
            if out is not dst:
                dst.copy_(out)
        return grad, None


def entropy(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Shannon entropy H(softmax(z)) per position (paper Eq. 4).

    Args:
        logits: (..., V).
        chunk_size: rows per chunk (None: automatic).

    Returns:
        (...,) float32 (float64 for float64 input), differentiable; the
        backward is analytic, dH/dz = -p (log p + H), recomputed per chunk.
    """
    return _EntropyFn.apply(logits, chunk_size)


# --------------------------------------------------------------------------
# Min-entropy H_inf = -log max p, backward p - onehot(argmax)
# --------------------------------------------------------------------------


def _p_minus_onehot_grad(logits: Tensor, index: Tensor, grad_out: Tensor, chunk: int, cdt: torch.dtype) -> Tensor:
    """Chunked ``grad_out * (softmax(z) - onehot(index))``: the backward of both
    min-entropy (index = argmax) and log-probs (index = token, negated grad).

    Shapes: logits (..., V); index (N,) with N = prod(...); grad_out (...).
    """
    rows = Rows(logits)
    scratch = Scratch(min(chunk, rows.n), rows.vocab, cdt, logits.device)
    g = grad_out.reshape(-1).to(cdt)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    g2 = grad.view(-1, rows.vocab)
    for s, zc in rows.chunks(chunk):
        r = zc.shape[0]
        dst = g2[s : s + r]
        gs = g[s : s + r]
        if not bool(gs.any()):
            dst.zero_()
            continue
        p = _scaled_probs(scratch.as_compute(zc), gs, dst, scratch)
        p[torch.arange(r, device=p.device), index[s : s + r]] -= gs
        if p is not dst:
            dst.copy_(p)
    return grad


class _MinEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, chunk_size: int | None) -> Tensor:  # type: ignore[override]
        rows, chunk, cdt, scratch = _setup(logits, chunk_size)
        out = logits.new_empty(rows.n, dtype=cdt)
        arg = logits.new_empty(rows.n, dtype=torch.long)
        for s, zc in rows.chunks(chunk):
            r = zc.shape[0]
            mx, am = _log_softmax_into(scratch.as_compute(zc), scratch).max(dim=-1)
            out[s : s + r] = -mx
            arg[s : s + r] = am
        ctx.save_for_backward(logits, arg)
        ctx.chunk, ctx.cdt = chunk, cdt
        return out.view(rows.lead_shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, arg = ctx.saved_tensors
        # d H_inf / dz = p - onehot(argmax)
        return _p_minus_onehot_grad(logits, arg, grad_out, ctx.chunk, ctx.cdt), None


def min_entropy(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Min-entropy H_inf = -log max_a softmax(z)_a per position (paper section 7.3).

    Returns:
        (...,) float32, differentiable; the gradient is p - onehot(argmax)
        (at tied maxima it goes to the one maximum ``max`` returns).
    """
    return _MinEntropyFn.apply(logits, chunk_size)


# --------------------------------------------------------------------------
# Log-probs of given tokens: z_a - logsumexp(z), backward onehot - p
# --------------------------------------------------------------------------


class _LogProbsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, chunk_size: int | None) -> Tensor:  # type: ignore[override]
        rows, chunk, cdt, scratch = _setup(logits, chunk_size)
        tok = tokens.reshape(-1).to(device=logits.device, dtype=torch.long)
        if tok.numel() != rows.n:
            raise ValueError(f"tokens has {tok.numel()} entries, logits has {rows.n} positions")
        out = logits.new_empty(rows.n, dtype=cdt)
        for s, zc in rows.chunks(chunk):
            r = zc.shape[0]
            lp = _log_softmax_into(scratch.as_compute(zc), scratch)
            out[s : s + r] = lp.gather(1, tok[s : s + r, None]).squeeze(1)
        ctx.save_for_backward(logits, tok)
        ctx.chunk, ctx.cdt = chunk, cdt
        return out.view(rows.lead_shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, tok = ctx.saved_tensors
        # d log p_a / dz = onehot(a) - p = -(p - onehot(a))
        return _p_minus_onehot_grad(logits, tok, -grad_out, ctx.chunk, ctx.cdt), None, None


def log_probs_from_logits(logits: Tensor, tokens: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """log softmax(z)[token] per position, as gathered logit minus logsumexp.

    Args:
        logits: (..., V).
        tokens: (...) integer ids, same leading shape as ``logits``.
        chunk_size: rows per chunk (None: automatic).

    Returns:
        (...,) float32, differentiable (backward onehot - p per chunk; the
        full (N, V) log-softmax is never materialised).
    """
    return _LogProbsFn.apply(logits, tokens, chunk_size)


# --------------------------------------------------------------------------
# No-grad diagnostics
# --------------------------------------------------------------------------


@torch.no_grad()
def peak_probability(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """max_a softmax(z)_a per position (the input of P-bar-max, paper Eq. 11).

    Returns:
        (...,) float32, detached.
    """
    rows, chunk, cdt, scratch = _setup(logits, chunk_size)
    out = logits.new_empty(rows.n, dtype=cdt)
    for s, zc in rows.chunks(chunk):
        lp = _log_softmax_into(scratch.as_compute(zc), scratch)
        out[s : s + zc.shape[0]] = lp.amax(dim=-1).exp_()
    return out.view(rows.lead_shape)


@torch.no_grad()
def token_stats(logits: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Peak probability and Shannon entropy per position in one chunked pass.

    Returns:
        ``(p_max, entropy)``, each (...,) float32, detached.
    """
    rows, chunk, cdt, scratch = _setup(logits, chunk_size)
    pmax = logits.new_empty(rows.n, dtype=cdt)
    ent = logits.new_empty(rows.n, dtype=cdt)
    for s, zc in rows.chunks(chunk):
        r = zc.shape[0]
        ent[s : s + r], pmax[s : s + r], _ = _entropy_rows(scratch.as_compute(zc), scratch)
    return pmax.view(rows.lead_shape), ent.view(rows.lead_shape)


# --------------------------------------------------------------------------
# Trust-region entropy (TRE-K / TRE-P), paper Eq. 7-9 and Algorithm 1
# --------------------------------------------------------------------------


class TrustRegionEntropy(NamedTuple):
    """Result of :func:`trust_region_entropy`, each of shape (...,).

    Attributes:
        value: log|V| / log|TR| * H(softmax(z[TR])), 0 where |TR| <= 1
            (Eq. 9 without its sign); differentiable, float32.
        peak_prob: max_a softmax(z)_a (detached), the input of P-bar-max.
        region_size: |TR| (int64, detached).
    """

    value: Tensor
    peak_prob: Tensor
    region_size: Tensor


def _gamma(n: Tensor, log_v: float) -> Tensor:
    """log V / log n (float64) where n >= 2, else 0."""
    return torch.where(n >= 2, log_v / torch.log(n.clamp(min=2).double()), 0.0)


def _local_entropy(vals: Tensor, valid: Tensor, log_v: float) -> tuple[Tensor, Tensor]:
    """Scaled entropy of softmax over the valid entries of each row.

    Args:
        vals: (R, k) logits (compute dtype), any order.
        valid: (R, k) bool, the region's entries (finite logits only).

    Returns:
        value (R,) and d value / d vals (R, k); both 0 where |TR| <= 1, and
        the derivative is 0 off the region.
    """
    n = valid.sum(1)
    v = vals.masked_fill(~valid, -math.inf)
    lse = torch.logsumexp(v, dim=1, keepdim=True)
    logq = v - lse
    q = logq.exp()
    h = -torch.where(valid, q * logq, 0.0).sum(1)
    big = n >= 2
    gamma = _gamma(n, log_v).to(vals.dtype)
    value = torch.where(big, gamma * h, 0.0)
    dv = torch.where(valid & big[:, None], -q * (logq + h[:, None]) * gamma[:, None], 0.0)
    return value, dv


class _Sparse(NamedTuple):
    """Gradient of rows with small regions, as a list of entries."""

    rows: Tensor  # (E,) global rows
    cols: Tensor  # (E,) token ids
    dv: Tensor  # (E,) d value / d z at those entries


class _Dense(NamedTuple):
    """Rows with large regions: region = {z > tau} plus the listed tied tokens.

    The gradient is recomputed from the logits: for z > tau,
    d value / d z = scale * e^(z - tau) * (z - tau + delta) (local-softmax entropy).
    """

    ids: Tensor  # (W,) global rows
    tau: Tensor  # (W,) threshold (compute dtype)
    delta: Tensor  # (W,) float64
    scale: Tensor  # (W,) float64, -gamma * e^(tau - logsumexp over the region)
    tie_rows: Tensor  # global rows of tokens with z == tau that are in (partial ties)
    tie_cols: Tensor


class _Support(NamedTuple):
    """Rows whose region is every finite logit: value gamma * H(softmax(z))."""

    ids: Tensor  # (W,) global rows
    gamma: Tensor  # (W,) float64


#: rows whose nucleus has at most this many tokens (and lies in the predicted
#: band) get a sparse gradient; larger ones are recomputed densely in backward.
SMALL_REGION = 256
#: top-k widths tried in turn by the capped TRE-P (``max_region``).
TOPK_STAGES: tuple[int, ...] = (16, 256)


class _TREState:
    """Outputs and backward records of one :class:`_TREFn` call."""

    def __init__(self, logits: Tensor, chunk_size: int | None) -> None:
        self.rows, self.chunk, self.cdt, self.scratch = _setup(logits, chunk_size)
        n, dev = self.rows.n, logits.device
        self.vocab = self.rows.vocab
        self.log_v = math.log(self.vocab) if self.vocab > 1 else 0.0
        self.value = torch.zeros(n, dtype=self.cdt, device=dev)
        self.peak = torch.full((n,), math.nan, dtype=self.cdt, device=dev)
        self.size = torch.zeros(n, dtype=torch.long, device=dev)
        self.sparse: list[_Sparse] = []
        self.dense: list[_Dense] = []
        self.support: list[_Support] = []

    def add_sorted(self, ids: Tensor, vals: Tensor, idx: Tensor, n: Tensor) -> None:
        """Rows whose region is the first n of their sorted top-k (vals, idx: (R, k))."""
        kmax = max(int(n.max()), 1) if n.numel() else 1
        vals, idx = vals[:, :kmax], idx[:, :kmax]
        valid = torch.arange(kmax, device=vals.device)[None, :] < n[:, None]
        v, dv = _local_entropy(vals, valid, self.log_v)
        self.value[ids] = v
        self.size[ids] = n
        r, c = valid.nonzero(as_tuple=True)
        self.sparse.append(_Sparse(ids[r], idx[r, c], dv[r, c]))


def _tre_topk(st: _TREState, top_k: int, with_peak: bool) -> None:
    """TRE-K: the region is the top_k largest logits (fewer where fewer are finite)."""
    k = min(top_k, st.vocab)
    for s, zc in st.rows.chunks(st.chunk):
        r = zc.shape[0]
        vals, idx = zc.topk(k, dim=-1)  # in the input dtype: same order
        vals = vals.to(st.cdt)
        if with_peak:
            lp = _log_softmax_into(st.scratch.as_compute(zc), st.scratch)
            st.peak[s : s + r] = lp.gather(1, idx[:, :1]).squeeze(1).exp()
        st.add_sorted(torch.arange(s, s + r, device=zc.device), vals, idx, torch.isfinite(vals).sum(1))


def _tre_capped(st: _TREState, top_p: float, cap: int) -> None:
    """TRE-P with the region truncated to ``cap`` tokens (the authors' top-256)."""
    vocab, dev = st.vocab, st.value.device
    cap = min(cap, vocab)
    stages = sorted({s for s in TOPK_STAGES if s < cap} | {cap})
    support_mode = top_p >= 1.0
    for s, zc in st.rows.chunks(st.chunk):
        r = zc.shape[0]
        zf = st.scratch.as_compute(zc)
        lp_flat = _log_softmax_into(zf, st.scratch).view(-1)
        local = torch.arange(r, device=dev)  # rows of this chunk still undecided
        for si, k in enumerate(stages):
            sub = zf if si == 0 else zf.index_select(0, local)
            vals, idx = sub.topk(k, dim=-1)
            del sub
            plog = lp_flat[local[:, None] * vocab + idx]
            if si == 0:
                st.peak[s : s + r] = plog[:, 0].exp()
            fin = torch.isfinite(vals).sum(1)
            exhausted = (fin < k) | (k == vocab)
            if support_mode:
                n, covered = fin, exhausted
            else:
                cs = plog.exp().double().cumsum(1)
                n = (cs < top_p).sum(1) + 1
                covered = (n <= k) | exhausted
                n = torch.minimum(n, fin)
            if k >= cap:
                covered = torch.ones_like(covered)
                n = n.clamp(max=cap)
            if bool(covered.all()):
                st.add_sorted(local + s, vals, idx, n)
                break
            if bool(covered.any()):
                st.add_sorted(local[covered] + s, vals[covered], idx[covered], n[covered])
            local = local[~covered]


def _tre_support(st: _TREState, ids: Tensor | None) -> None:
    """Rows whose region is every finite logit (TRE-P with P = 1): gamma * H(softmax(z)).

    ``ids=None`` means all rows, chunk by chunk; else the listed global rows.
    """
    if ids is None:
        parts = [(torch.arange(s, s + zc.shape[0], device=zc.device), zc) for s, zc in st.rows.chunks(st.chunk)]
    else:
        parts = [(g, st.rows.take(g)) for g in ids.split(st.chunk)]
    for g, zc in parts:
        zf = st.scratch.as_compute(zc)
        h, pmax, bad = _entropy_rows(zf, st.scratch)
        n = torch.full_like(g, st.vocab)
        if bool(bad.any()):
            n[bad] = torch.isfinite(zf[bad]).sum(1)
        gamma = _gamma(n, st.log_v)
        st.value[g] = (gamma * h.double()).to(st.cdt)
        st.peak[g] = pmax
        st.size[g] = n
        st.support.append(_Support(g, gamma))


def _tre_nucleus(st: _TREState, top_p: float) -> None:
    """Exact TRE-P (0 < P < 1), see :mod:`tre_lightning.regularizers._nucleus`."""
    support: list[Tensor] = []
    for s, zc in st.rows.chunks(st.chunk):
        r = zc.shape[0]
        zf = st.scratch.as_compute(zc)
        p = _softmax_into(zf, st.scratch.get("p", r))
        reg = nucleus_chunk(zf, p, top_p, st.scratch, SMALL_REGION)
        st.peak[s : s + r] = reg.pmax
        st.size[s : s + r] = reg.size
        act = reg.size >= 2
        small = act & reg.inside & (reg.size <= SMALL_REGION)
        dense = act & ~small
        if bool(small.any()):
            sr, sc = reg.small_rows, reg.small_ids
            ns = int(small.sum())
            rr = (small.cumsum(0) - 1)[sr]
            counts = torch.bincount(rr, minlength=ns)
            pos = torch.arange(sr.numel(), device=sr.device) - (counts.cumsum(0) - counts)[rr]
            kmax = int(counts.max())
            vals = zf.new_full((ns, kmax), -math.inf)
            vals[rr, pos] = zf[sr, sc]
            valid = torch.zeros(ns, kmax, dtype=torch.bool, device=sr.device)
            valid[rr, pos] = True
            v, dv = _local_entropy(vals, valid, st.log_v)
            st.value[s + small.nonzero().squeeze(1)] = v
            st.sparse.append(_Sparse(s + sr, sc, dv[rr, pos]))
        if bool(dense.any()):
            d = dense.nonzero().squeeze(1)
            n, mass = reg.size[d], reg.mass[d]
            lse = reg.zmax[d].double() - reg.pmax[d].double().log()
            log_m = mass.log()
            h = log_m + lse - reg.pz[d].double() / mass
            gamma = _gamma(n, st.log_v)
            st.value[s + d] = (gamma * h).to(st.cdt)
            tau = reg.tau[d]
            thr = torch.where(reg.all_ties[d], torch.nextafter(tau, torch.full_like(tau, -math.inf)), tau)
            lse_r = lse + log_m
            tie = dense[reg.tie_rows]
            st.dense.append(
                _Dense(
                    s + d,
                    thr,
                    thr.double() - lse_r + h,
                    -gamma * torch.exp(thr.double() - lse_r),
                    s + reg.tie_rows[tie],
                    reg.tie_ids[tie],
                )
            )
        if bool(reg.support.any()):
            support.append(s + reg.support.nonzero().squeeze(1))
    if support:
        _tre_support(st, torch.cat(support))


def _dense_grad(zf: Tensor, rec: _Dense, g: Tensor, dst: Tensor | None, scratch: Scratch) -> Tensor:
    """g * d value / d z for the rows of ``rec`` (zf: their logits, compute dtype).

    Writes into ``dst`` (any dtype) when it can, else into a compute-dtype
    buffer; returns the tensor written. Fused on CPU (one pass, see
    :mod:`~tre_lightning.regularizers._fuse`); eager it is five passes:
    u = z - tau, masked to -80 where z <= tau (e^-80 > 0 keeps exp off its slow
    underflow path), e = e^u with the masked entries then set to exactly 0,
    u <- scale (u + delta), out = u e.
    """
    r, cdt = zf.shape[0], zf.dtype
    scale = rec.scale * g
    if dst is not None and _fuse.dense_grad(zf, rec.tau, rec.delta.to(cdt), scale.to(cdt), dst):
        return dst
    out = dst if dst is not None and dst.dtype == cdt else scratch.get("g", r)
    u = torch.sub(zf, rec.tau[:, None], out=scratch.get("u", r))
    F_nn.threshold_(u, 0.0, -80.0)
    e = torch.exp(u, out=scratch.get("e", r))
    F_nn.threshold_(e, 0.5, 0.0)  # e >= 1 on the region, e^-80 off it
    torch.addcmul((scale * rec.delta).to(cdt)[:, None], u, scale.to(cdt)[:, None], out=u)
    return torch.mul(u, e, out=out)


def _support_grad(zf: Tensor, gamma_g: Tensor, dst: Tensor | None, scratch: Scratch) -> Tensor:
    """g * d (gamma H) / d z for rows whose region is every finite logit (see _dense_grad)."""
    r = zf.shape[0]
    out = dst if dst is not None and dst.dtype == zf.dtype else scratch.get("g", r)
    p = _softmax_into(zf, scratch.get("p", r))
    if bool(torch.isneginf(zf).any()):  # keep 0 * finite on masked tokens
        zf = torch.clamp(zf, min=_finite_min(zf.dtype), out=scratch.get("t", r))
    torch.ops.aten._softmax_backward_data.out(zf, p, -1, zf.dtype, grad_input=out)
    return out.mul_((-gamma_g).to(zf.dtype)[:, None])


class _TREFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: Tensor,
        top_k: int | None,
        top_p: float | None,
        max_region: int | None,
        chunk_size: int | None,
        with_peak: bool,
    ):
        st = _TREState(logits, chunk_size)
        if top_k is not None:
            _tre_topk(st, top_k, with_peak)
        elif max_region is not None:
            _tre_capped(st, top_p, max_region)
        elif top_p >= 1.0:
            _tre_support(st, None)
        else:
            _tre_nucleus(st, top_p)
        ctx.save_for_backward(logits)
        ctx.sparse, ctx.dense, ctx.support = st.sparse, st.dense, st.support
        ctx.chunk, ctx.cdt = st.chunk, st.cdt
        ctx.mark_non_differentiable(st.peak, st.size)
        shape = st.rows.lead_shape
        return st.value.view(shape), st.peak.view(shape), st.size.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value: Tensor, _gp: Tensor | None, _gs: Tensor | None):  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        rows = Rows(logits)
        vocab, cdt, dev = rows.vocab, ctx.cdt, logits.device
        g = grad_value.reshape(-1).to(cdt)
        full = [rec.ids for rec in (*ctx.dense, *ctx.support)]
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=dev)
        g2 = grad.view(-1, vocab)
        if full:  # zero the chunks that the dense records do not cover entirely
            covered = torch.zeros(rows.n, dtype=torch.bool, device=dev)
            covered[torch.cat(full)] = True
            ok = covered.split(ctx.chunk)
            for k, c in enumerate(ok):
                if not bool(c.all()):
                    g2[k * ctx.chunk : k * ctx.chunk + c.numel()].zero_()
        else:
            grad.zero_()
        flat = grad.view(-1)
        for rec in ctx.sparse:
            flat[rec.rows * vocab + rec.cols] = (rec.dv * g[rec.rows]).to(logits.dtype)
        scratch = Scratch(min(ctx.chunk, rows.n), vocab, cdt, dev) if full else None
        for rec in (*ctx.dense, *ctx.support):
            dense = isinstance(rec, _Dense)
            for lo in range(0, rec.ids.numel(), ctx.chunk):
                sl = slice(lo, lo + ctx.chunk)
                ids = rec.ids[sl]
                gs = g[ids].double()
                r = ids.numel()
                first = int(ids[0])
                contiguous = int(ids[-1]) - first + 1 == r
                dst = g2[first : first + r] if contiguous else None
                if not bool(gs.any()):
                    g2[ids] = 0
                    continue
                zc = rows.take(ids) if not contiguous or len(rows.blocks) > 1 else rows.blocks[0][first : first + r]
                zf = scratch.as_compute(zc)
                if dense:
                    part = _Dense(ids, rec.tau[sl], rec.delta[sl], rec.scale[sl], rec.tie_rows, rec.tie_cols)
                    out = _dense_grad(zf, part, gs, dst, scratch)
                else:
                    out = _support_grad(zf, rec.gamma[sl] * gs, dst, scratch)
                if out is not dst:
                    if dst is not None:
                        dst.copy_(out)
                    else:
                        g2[ids] = out.to(logits.dtype)
            if dense and rec.tie_rows.numel():
                loc = torch.searchsorted(rec.ids, rec.tie_rows)
                val = (rec.scale[loc] * rec.delta[loc] * g[rec.tie_rows].double()).to(logits.dtype)
                g2[rec.tie_rows, rec.tie_cols] = val
        return grad, None, None, None, None, None


def trust_region_entropy(
    logits: Tensor,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    max_region: int | None = None,
    chunk_size: int | None = None,
    with_peak: bool = True,
) -> TrustRegionEntropy:
    """Trust-region entropy per position (paper Eq. 9 without its sign).

    Exactly one of ``top_k`` (TRE-K) or ``top_p`` (TRE-P) must be given.

    * TRE-K: the region is the ``top_k`` largest logits (fewer where fewer
      are finite, all V where V <= K); the gradient reaches only them.
    * TRE-P: the region is the smallest set of tokens whose probability
      reaches ``top_p`` (a token is in when the mass ranked above it is
      below P; the top token always is). ``top_p = 1`` means the whole
      support (every finite logit). The nucleus is exact: no cap unless
      ``max_region`` is given, which truncates the region to that many tokens
      as the authors' code did with 256.

    The value is ``log V / log |TR| * H(softmax(z[TR]))`` with V =
    ``logits.shape[-1]``, and exactly 0 where ``|TR| <= 1``.

    Args:
        logits: (..., V).
        top_k: K >= 1.
        top_p: P in (0, 1].
        max_region: optional cap on |TR| for TRE-P (>= 1).
        chunk_size: rows per chunk (None: automatic).
        with_peak: compute ``peak_prob``. TRE-P gets it for free; TRE-K needs
            an extra log-softmax pass for it, and with False returns NaN.

    Returns:
        :class:`TrustRegionEntropy` ``(value, peak_prob, region_size)``.
    """
    if (top_k is None) == (top_p is None):
        raise ValueError("give exactly one of top_k (TRE-K) or top_p (TRE-P)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if max_region is not None and (
        isinstance(max_region, bool) or not isinstance(max_region, int) or max_region < 1
    ):
        raise ValueError(f"max_region must be an int >= 1 or None, got {max_region!r}")
    if top_k is not None and max_region is not None:
        raise ValueError("max_region applies to TRE-P (top_p) only")
    value, peak, size = _TREFn.apply(
        logits, top_k, None if top_p is None else float(top_p), max_region, chunk_size, with_peak
    )
    return TrustRegionEntropy(value, peak, size)
