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
sorts the vocabulary. TRE-P finds the exact nucleus (the smallest set of
tokens whose probability reaches P) from a top-16 of each row, widens to a
top-256 only for rows whose nucleus is larger, and for the rare rows whose
nucleus exceeds 256 tokens locates the nucleus threshold with a histogram of
probability mass over log-probability bins (1/16 nat wide) followed by a
sort of the one bin that contains the threshold. The result is exact (ties
included); only its cost depends on the logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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

#: top-k widths tried in turn by TRE-P before the histogram search.
TOPK_STAGES: tuple[int, ...] = (16, 256)
#: histogram used to locate wide nuclei: bins of 1/16 nat over 256 nats of
#: log-probability; everything below e^-256 (zero in float32) shares the last bin.
_BINS_PER_NAT = 16
_NUM_BINS = 4096


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


def _local_entropy(vals: Tensor, n: Tensor, log_v: float) -> tuple[Tensor, Tensor]:
    """Scaled entropy of softmax over the first n of each row of ``vals``.

    Args:
        vals: (R, k) logits sorted in descending order (compute dtype).
        n: (R,) region sizes, 0 <= n <= k, counting finite entries only.

    Returns:
        value (R,) and d value / d vals (R, k).
    """
    k = vals.shape[1]
    valid = torch.arange(k, device=vals.device)[None, :] < n[:, None]
    v = vals.masked_fill(~valid, -math.inf)
    lse = torch.logsumexp(v, dim=1, keepdim=True)
    logq = v - lse
    q = logq.exp()
    h = -torch.where(valid, q * logq, 0.0).sum(1)
    big = n >= 2
    gamma = torch.where(big, log_v / torch.log(n.clamp(min=2).to(vals.dtype)), 0.0)
    value = torch.where(big, gamma * h, 0.0)
    dv = torch.where(valid & big[:, None], -q * (logq + h[:, None]) * gamma[:, None], 0.0)
    return value, dv


class _Narrow(NamedTuple):
    ids: Tensor  # (R,) global rows
    idx: Tensor  # (R, k) token ids of the sorted top-k
    dv: Tensor  # (R, k) d value / d z at those ids


class _Wide(NamedTuple):
    ids: Tensor  # (W,) global rows
    tau: Tensor  # (W,) region = {z > tau} + m_tie tokens with z == tau (lowest ids first)
    m_tie: Tensor  # (W,) long
    partial: Tensor  # (W,) bool, True when only some of the tokens tied at tau are in
    log_m: Tensor  # (W,) log of the region's probability mass
    h: Tensor  # (W,) local entropy
    gamma: Tensor  # (W,) log|V| / log|TR|


def _seg_sum(values: Tensor, seg: Tensor, nseg: int) -> Tensor:
    return torch.zeros(nseg, dtype=values.dtype, device=values.device).index_add_(0, seg, values)


def _wide_threshold(zw: Tensor, lpw: Tensor, pw: Tensor, top_p: float) -> tuple[Tensor, ...]:
    """Exact nucleus threshold for rows whose nucleus is large, without a sort of V.

    Mass histogram over log-probability bins, then an exact sort of the one
    bin where the cumulative mass crosses ``top_p``.

    Returns:
        tau, m_tie, ties_total, n (region size), support (bool: the mass only
        reaches P in the float32-underflow bin, the region is the support).
    """
    w = zw.shape[0]
    dev = zw.device
    key = (lpw * -float(_BINS_PER_NAT)).clamp_(0, _NUM_BINS - 1).to(torch.int32)
    key += (torch.arange(w, device=dev, dtype=torch.int32) * _NUM_BINS)[:, None]
    flat = key.view(-1)
    mass = torch.bincount(flat, weights=pw.reshape(-1).double(), minlength=w * _NUM_BINS).view(w, _NUM_BINS)
    cnt = torch.bincount(flat, minlength=w * _NUM_BINS).view(w, _NUM_BINS)
    cm = mass.cumsum(1)
    b = (cm < top_p).sum(1)  # bin in which the cumulative mass reaches P
    support = b >= _NUM_BINS - 1
    b = b.clamp(max=_NUM_BINS - 1)
    prev = (b - 1).clamp(min=0)[:, None]
    mass_above = torch.where(b > 0, cm.gather(1, prev).squeeze(1), 0.0)
    n_above = torch.where(b > 0, cnt.cumsum(1).gather(1, prev).squeeze(1), 0)

    target = b.to(torch.int32) + torch.arange(w, device=dev, dtype=torch.int32) * _NUM_BINS
    target = torch.where(support, -1, target)  # support rows need no candidates
    rr, cc = (key == target[:, None]).nonzero(as_tuple=True)  # row-major
    del key
    n_fin = torch.isfinite(zw).sum(1)
    tau = zw.new_full((w,), -math.inf)
    m_tie = torch.zeros(w, dtype=torch.long, device=dev)
    ties = torch.zeros(w, dtype=torch.long, device=dev)
    n = n_fin.clone()
    if rr.numel():
        cv, cp = zw[rr, cc], pw[rr, cc].double()
        o1 = torch.argsort(cv, descending=True, stable=True)
        perm = o1[torch.argsort(rr[o1], stable=True)]  # by row, then z descending
        sv, sp, srow = cv[perm], cp[perm], rr[perm]
        counts = torch.bincount(srow, minlength=w)
        starts = counts.cumsum(0) - counts
        excl = sp.cumsum(0) - sp  # mass of earlier candidates, across rows
        first = excl[starts.clamp(max=sv.numel() - 1)]
        need = (mass_above[srow] + (excl - first[srow])) < top_p
        m = torch.minimum(_seg_sum(need.long(), srow, w).clamp(min=1), counts.clamp(min=1))
        pos = (starts + m - 1).clamp(max=sv.numel() - 1)
        t = sv[pos]
        gt = _seg_sum((sv > t[srow]).long(), srow, w)
        tie = _seg_sum((sv == t[srow]).long(), srow, w)
        ok = ~support
        tau = torch.where(ok, t, tau)
        m_tie = torch.where(ok, m - gt, m_tie)
        ties = torch.where(ok, tie, ties)
        n = torch.where(ok, n_above + m, n)
    return tau, m_tie, ties, n, support


def _region_mask(zw: Tensor, tau: Tensor, m_tie: Tensor, partial: Tensor) -> Tensor:
    sel = zw > tau[:, None]
    full_ties = (m_tie > 0) & ~partial
    if bool(full_ties.any()):
        sel |= (zw == tau[:, None]) & full_ties[:, None]
    if bool(partial.any()):
        for i in partial.nonzero().squeeze(1).tolist():
            tie = zw[i] == tau[i]
            sel[i] |= tie & (tie.cumsum(0) <= m_tie[i])
    return sel


def _wide_rows(zw: Tensor, lpw: Tensor, top_p: float | None, log_v: float) -> tuple[Tensor, ...]:
    """Region and scaled local entropy for rows handled without a top-k.

    ``top_p=None`` means the region is the support (all finite logits).
    """
    cdt = lpw.dtype
    pw = lpw.exp()
    w = zw.shape[0]
    if top_p is None:
        tau = zw.new_full((w,), -math.inf)
        m_tie = torch.zeros(w, dtype=torch.long, device=zw.device)
        ties = m_tie
        n = torch.isfinite(zw).sum(1)
    else:
        tau, m_tie, ties, n, _ = _wide_threshold(zw, lpw, pw, top_p)
    partial = m_tie < ties
    sel = _region_mask(zw, tau, m_tie, partial).to(cdt)
    lpc = lpw.clamp(min=_finite_min(cdt))
    mass = torch.linalg.vecdot(pw, sel).double()
    splp = torch.linalg.vecdot(pw, lpc.mul_(sel)).double()
    log_m = mass.log()
    h = log_m - splp / mass
    big = n >= 2
    gamma = torch.where(big, log_v / torch.log(n.clamp(min=2).double()), 0.0)
    value = torch.where(big, gamma * h, 0.0)
    return value.to(cdt), tau, m_tie, partial, log_m, h, gamma, n


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
        rows, chunk, cdt, scratch = _setup(logits, chunk_size)
        vocab, n_rows, dev = rows.vocab, rows.n, logits.device
        log_v = math.log(vocab) if vocab > 1 else 0.0
        value = torch.zeros(n_rows, dtype=cdt, device=dev)
        peak = torch.full((n_rows,), math.nan, dtype=cdt, device=dev)
        size = torch.zeros(n_rows, dtype=torch.long, device=dev)
        narrow: list[_Narrow] = []
        wide: list[_Wide] = []

        support_mode = top_p is not None and top_p >= 1.0
        cap = vocab if max_region is None else min(max_region, vocab)
        if top_k is not None:
            stages = [min(top_k, vocab)]
        elif max_region is not None:
            stages = sorted({s for s in TOPK_STAGES if s < cap} | {cap})
        else:
            stages = sorted({min(s, vocab) for s in TOPK_STAGES})

        def add_narrow(ids: Tensor, vals: Tensor, idx: Tensor, n: Tensor) -> None:
            kmax = max(int(n.max()), 1) if n.numel() else 1
            vals, idx = vals[:, :kmax], idx[:, :kmax]
            v, dv = _local_entropy(vals, n, log_v)
            value[ids] = v
            size[ids] = n
            narrow.append(_Narrow(ids, idx, dv))

        def process(s: int, zc: Tensor) -> None:
            r = zc.shape[0]
            if top_k is not None:
                vals, idx = zc.topk(stages[0], dim=-1)  # in the input dtype: same order
                vals = vals.to(cdt)
                if with_peak:
                    lp = _log_softmax_into(scratch.as_compute(zc), scratch)
                    peak[s : s + r] = lp.gather(1, idx[:, :1]).squeeze(1).exp()
                add_narrow(torch.arange(s, s + r, device=dev), vals, idx, torch.isfinite(vals).sum(1))
                return
            zf = scratch.as_compute(zc)
            lp = _log_softmax_into(zf, scratch)
            lp_flat = lp.view(-1)
            local = torch.arange(r, device=dev)  # rows of this chunk still undecided
            for si, k in enumerate(stages):
                sub = zf if si == 0 else zf.index_select(0, local)
                vals, idx = sub.topk(k, dim=-1)
                del sub
                plog = lp_flat[local[:, None] * vocab + idx]
                if si == 0:
                    peak[s : s + r] = plog[:, 0].exp()
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
                    add_narrow(local + s, vals, idx, n)
                    return
                if bool(covered.any()):
                    add_narrow(local[covered] + s, vals[covered], idx[covered], n[covered])
                local = local[~covered]
            # Rows whose region exceeds the last top-k: exact threshold search
            # in groups of rows, so that its temporaries stay ~1 chunk.
            for grp in local.split(max(1, r // 8)):
                zw, lpw = zf.index_select(0, grp), lp.index_select(0, grp)
                v, tau, m_tie, partial, log_m, h, gamma, n = _wide_rows(
                    zw, lpw, None if support_mode else top_p, log_v
                )
                del zw, lpw
                ids = grp + s
                value[ids] = v
                size[ids] = n
                wide.append(_Wide(ids, tau, m_tie, partial, log_m, h, gamma))

        for s, zc in rows.chunks(chunk):
            process(s, zc)

        ctx.save_for_backward(logits)
        ctx.narrow, ctx.wide = narrow, wide
        ctx.chunk, ctx.cdt = chunk, cdt
        ctx.mark_non_differentiable(peak, size)
        shape = rows.lead_shape
        return value.view(shape), peak.view(shape), size.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value: Tensor, _gp: Tensor | None, _gs: Tensor | None):  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        rows = Rows(logits)
        vocab, cdt = rows.vocab, ctx.cdt
        g = grad_value.reshape(-1).to(cdt)
        grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        flat = grad.view(-1)
        for rec in ctx.narrow:
            src = rec.dv * g[rec.ids][:, None]
            flat[rec.ids[:, None] * vocab + rec.idx] = src.to(logits.dtype)
        g2 = grad.view(-1, vocab)
        group = max(1, ctx.chunk // 8)
        for rec in ctx.wide:
            for lo in range(0, rec.ids.numel(), group):
                sl = slice(lo, lo + group)
                ids = rec.ids[sl]
                coef = (-g[ids].double() * rec.gamma[sl] / rec.log_m[sl].exp()).to(cdt)
                if not bool(coef.any()):
                    continue
                zw = rows.take(ids).to(cdt)
                lp = torch.log_softmax(zw, dim=-1)  # few rows, rare: no scratch
                p = lp.exp()
                sel = _region_mask(zw, rec.tau[sl], rec.m_tie[sl], rec.partial[sl]).to(cdt)
                shift = (rec.log_m[sl] - rec.h[sl]).to(cdt)
                t = lp.clamp_(min=_finite_min(cdt)).sub_(shift[:, None])
                t.mul_(p).mul_(sel).mul_(coef[:, None])
                g2.index_copy_(0, ids, t.to(logits.dtype))
                del zw, lp, p, sel, t
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
