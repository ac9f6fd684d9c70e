"""Exact top-p nucleus (TRE-P's trust region) of many rows, without sorting them.

The region of one row of logits z with probabilities p = softmax(z) (computed
in float32 for float32 / bfloat16 / float16 logits, float64 for float64):
order the tokens by logit, highest first, equal logits by lower id; a token is
in when the probability mass ranked above it is below P (Algorithm 1 with the
ties rule of the slow reference). Masses are sums of the computed
probabilities, accumulated in float64: for float32 probabilities that is exact
(order-free) for every sum of tokens at or above the boundary as long as the
boundary probability is >= 2**-29, which holds for any P <= 1 - V * 2**-29
(P <= 0.9997 at V = 151,936), since the tokens below the boundary hold more
than 1 - P of the mass.

Per chunk of rows, :func:`nucleus_chunk`

1. predicts a band of logits (lo, hi] that holds the boundary token, from a
   subsample of each row (~8,192 logits in blocks of 64 spread over the
   row): a histogram of probability mass over bins of 1/32 nat, with a
   2.5-sigma margin for the sampling error of the estimated tail mass;
   sampled tokens with p >= (1 - P) / 8 are left out of the estimate and the
   band starts below them (they are above every lighter token);
2. takes, in one pass over the rows, the exact mass, the count and sum(p z)
   of the tokens above the band (z > hi) and lists the band's tokens
   (a compare and a nonzero over 8-byte words of the mask). Rows with
   nothing above the band that reaches into few blocks of 64 logits (peaked
   rows) read their band tokens off per-block maxima instead;
3. checks exactly that the boundary is in the band; where it is not, the
   band is extended past the side that missed (by 2, 4, 8, ... nats, then to
   the end) and step 2 redone for those rows only;
4. finds the boundary inside the band: float64 mass histograms over 2,048
   value bins spanning each row's band give the bin of the boundary, whose
   few tokens are sorted (logit descending, id ascending) and accumulated
   exactly.

So the work per row is a fixed number of passes whatever the distribution:
the band holds about 2 % of a flat row's tokens (V = 151,936) and a handful of
a peaked row's. All operations are dtype- and device-generic torch ops (no
host loop over rows; a few host syncs per chunk). On CPU, step 2's sums and
band mask run as one compiled pass (:mod:`~tre_lightning.regularizers._fuse`)
for large chunks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from tre_lightning.regularizers import _fuse
from tre_lightning.regularizers._rows import Scratch

#: prediction histogram: bins of 1/32 nat below the row maximum, 64 nats deep
#: (lower logits share the last bin; they hold < e^-64 of the mass each).
BINS_PER_NAT = 32
NUM_BINS = 64 * BINS_PER_NAT
#: subsample of each row used by the prediction: about SAMPLES logits, in
#: blocks of BLOCK consecutive ones spread evenly over the row (a strided
#: sample would read every cache line of the row).
SAMPLES = 8192
BLOCK = 64
#: rows with nothing above the band and at most this many blocks of BLOCK
#: logits reaching into it get their band tokens from the block maxima.
BLOCK_LIMIT = 64
#: sampling margin of the predicted band, in standard deviations of the
#: estimated tail mass, plus an absolute slack (softmax sums to 1 +- 1e-6).
SIGMAS = 2.5
SLACK = 1e-5
#: sampled tokens with p >= (1 - P) * HEAVY are left out of the estimate:
#: every such token is above every lighter one, so the band starts below them.
HEAVY = 0.125
#: bins of the exact select inside the band.
SELECT_BINS = 2048
#: a band that misses the boundary is extended by WIDEN * 2**attempt nats.
WIDEN = 2.0
MAX_ATTEMPTS = 8


class ChunkRegions(NamedTuple):
    """Nucleus of every row of a chunk (r rows), see :func:`nucleus_chunk`.

    Per row (r,): ``size`` (int64; 1 where the top token alone reaches P),
    ``mass`` (float64, exact), ``pz`` (sum of p * z over the region),
    ``tau`` (logit of the boundary token), ``all_ties`` (every token with logit
    tau is in), ``inside`` (no token above the band: the region is the band's
    listed tokens), ``support`` (the mass of all tokens stays below P: the
    region is every finite logit; ``size`` is then 0 and must be filled in),
    ``pmax``, ``zmax``.

    Flat lists: ``tie_rows, tie_ids`` the tokens tied at tau that are in, for
    rows where only some are; ``small_rows, small_ids`` the region's tokens of
    rows with ``inside`` and ``size <= small``.
    """

    size: Tensor
    mass: Tensor
    pz: Tensor
    tau: Tensor
    all_ties: Tensor
    inside: Tensor
    support: Tensor
    pmax: Tensor
    zmax: Tensor
    tie_rows: Tensor
    tie_ids: Tensor
    small_rows: Tensor
    small_ids: Tensor


class _Scan(NamedTuple):
    n_a: Tensor  # (r,) tokens above the band
    m_a: Tensor  # (r,) their exact mass (float64)
    s_a: Tensor  # (r,) their sum of p * z
    rows: Tensor  # band tokens: local row
    ids: Tensor  # band tokens: token id (ascending within a row)
    zb: Tensor  # band tokens: logit
    pb: Tensor  # band tokens: probability


def sort_key(z: Tensor) -> Tensor:
    """int64 keys ordered like the float values of ``z`` (-0 counts as +0).

    Shape: any -> same. float32 keys lie in [-2**31, 2**31). float32 or
    float64 only.
    """
    z = z + 0.0  # -0.0 -> +0.0
    if z.dtype == torch.float64:
        b = z.view(torch.int64)
        return b ^ ((b >> 63) & 0x7FFFFFFFFFFFFFFF)
    if z.dtype != torch.float32:
        raise TypeError(f"sort_key takes float32 or float64, got {z.dtype}")
    b = z.view(torch.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).long()


def predict_band(
    z: Tensor, p: Tensor, zmax: Tensor, top_p: float, active: Tensor, work: Tensor
) -> tuple[Tensor, Tensor]:
    """Logit band (lo, hi] per row that holds the nucleus boundary with high probability.

    Args:
        z, p: (r, V) logits and probabilities (compute dtype).
        zmax: (r,) row maxima of z.
        active: (r,) rows to predict for; the others get lo = hi = +inf.
        work: contiguous (r, V) buffer of the compute dtype for the
            subsample's temporaries.

    Returns:
        lo, hi (r,): the band; lo = -inf means "down to the lowest logit",
        hi = +inf means "no token above the band".
    """
    r, v = z.shape
    dev, dt = z.device, z.dtype
    nblk = v // BLOCK
    step = max(5, (nblk * BLOCK) // SAMPLES)
    if nblk >= 4 * step:  # blocks of BLOCK logits, every step-th block
        zs = z[:, : nblk * BLOCK].reshape(r, nblk, BLOCK)[:, ::step]
        ps = p[:, : nblk * BLOCK].reshape(r, nblk, BLOCK)[:, ::step]
        zs, ps = zs.reshape(r, -1), ps.reshape(r, -1)
    else:  # short rows: every step-th logit
        zs, ps = z[:, ::step], p[:, ::step]
    ns = zs.shape[1]
    stride = v / ns  # one logit in `stride` is sampled
    slot, k = r * ns, 8 // dt.itemsize  # k: slots of an int64 array
    flat = work.reshape(-1)
    if (k + 2) * slot > flat.numel():  # short rows: no room in the buffer
        flat = torch.empty((k + 2) * slot, dtype=dt, device=dev)
    bins = flat[: k * slot].view(torch.int64).view(r, ns)  # first: aligned for the int64 view
    u, light = (flat[(k + i) * slot : (k + i + 1) * slot].view(r, ns) for i in range(2))
    # bins of 1/BINS_PER_NAT nat counted from the bottom: bin b holds
    # zmax - (NUM_BINS - b) / BINS_PER_NAT <= z < ... - 1 / BINS_PER_NAT (lower logits in bin 0)
    base = zmax - NUM_BINS / BINS_PER_NAT
    torch.sub(zs, base[:, None], out=u).mul_(BINS_PER_NAT).clamp_(0, NUM_BINS - 1).nan_to_num_(0)
    bins.copy_(u)  # truncation = floor for u >= 0
    torch.mul(ps, ps < (1.0 - top_p) * HEAVY, out=light)
    sq = torch.mul(light, light, out=u)
    mass = torch.zeros(r, NUM_BINS, dtype=dt, device=dev).scatter_add_(1, bins, light)
    sqh = torch.zeros(r, NUM_BINS, dtype=dt, device=dev).scatter_add_(1, bins, sq)
    # tail[b]: estimated mass of the light tokens below the upper edge of bin b,
    # sd[b]: its sampling standard deviation (one logit in `stride` sampled)
    tail = mass.cumsum(1).mul_(stride)
    margin = sqh.cumsum(1).mul_(stride * max(stride - 1.0, 0.0)).sqrt_().mul_(SIGMAS).add_(SLACK)
    t_star = 1.0 - top_p
    idx = torch.arange(NUM_BINS, device=dev)
    # lo: upper edge of the last bin whose tail is surely <= 1 - P, and not above
    # the lower edge of the highest bin with a light sampled logit (the sample
    # says nothing about the logits above it, heavy ones included)
    b_top = torch.where(mass > 0, idx, -1).amax(1)
    b_lo = torch.minimum(((tail + margin) <= t_star).sum(1) - 1, b_top - 1)
    # hi: upper edge of the first bin whose tail surely exceeds 1 - P
    b_hi = torch.where((tail - margin) > t_star, idx, NUM_BINS).amin(1)
    inf = torch.full_like(zmax, math.inf)
    edge = lambda b: base + (b + 1).to(dt) / BINS_PER_NAT  # noqa: E731
    lo = torch.where(b_lo >= 0, edge(b_lo), -inf)
    hi = torch.where(b_hi < NUM_BINS, edge(b_hi), inf)
    return torch.where(active, lo, inf), torch.where(active, hi, inf)


def _sum_f64(x: Tensor, spare: Tensor) -> Tensor:
    """Row sums of ``x`` (r, V) accumulated in float64.

    ``spare`` is a contiguous (r, V) buffer of x's dtype whose bytes hold the
    float64 copies, half a row at a time (no extra (r, V) float64 buffer).
    """
    if x.dtype == torch.float64:
        return x.sum(1)
    r, v = x.shape
    width = max(1, v // 2)
    buf = spare.reshape(-1)[: r * width * 2].view(torch.float64).view(r, width)
    out = torch.zeros(r, dtype=torch.float64, device=x.device)
    for a in range(0, v, width):
        w = min(width, v - a)
        out += buf[:, :w].copy_(x[:, a : a + w]).sum(1)
    return out


def _nonzero_rows(padded: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the True entries of a (r, V8) bool buffer (V8 % 8 == 0), row-major.

    Its 8-byte words are scanned first, so the cost is that of a nonzero over
    V8 / 8 entries plus the words that hold a True.
    """
    v8 = padded.shape[1]
    w = padded.view(torch.int64).view(-1).nonzero().squeeze(1)
    lanes = padded.view(torch.uint8).view(-1, 8).index_select(0, w)
    k = lanes.nonzero()
    pos = w.index_select(0, k[:, 0]) * 8 + k[:, 1]
    rows = torch.div(pos, v8, rounding_mode="floor")
    return rows, pos - rows * v8


def _take(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """x[rows, cols] for a 2-D x (a 1-D gather when x is contiguous)."""
    if x.is_contiguous():
        return x.view(-1).index_select(0, rows * x.shape[1] + cols)
    return x[rows, cols]


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b, 1) for (r, V) a, b without an (r, V) temporary: BLAS on
    groups of 8 rows (the diagonal of an 8 x 8 product). Rows where it gives
    NaN (0 * -inf from masked logits) are redone with nansum."""
    out = torch.cat([torch.mm(a[i : i + 8], b[i : i + 8].T).diagonal() for i in range(0, a.shape[0], 8)])
    bad = torch.isnan(out)
    if bool(bad.any()):
        out[bad] = (a[bad] * b[bad]).nansum(1)
    return out


def _scan(z: Tensor, p: Tensor, lo: Tensor, hi: Tensor, scratch: Scratch) -> _Scan:
    """Step 2: the band's tokens and the exact sums of the tokens above it.

    Uses the scratch buffer "w" and the padded mask; the eager path
    **overwrites p** (its buffer then holds temporaries).
    """
    r = z.shape[0]
    dev = z.device
    band, padded = scratch.padded_mask(r)
    if not bool(torch.isfinite(hi).any()):
        torch.gt(z, lo[:, None], out=band)
        rows, ids = _nonzero_rows(padded)
        zero = torch.zeros(r, dtype=torch.float64, device=dev)
        return _Scan(zero.long(), zero, zero.to(z.dtype), rows, ids, _take(z, rows, ids), _take(p, rows, ids))
    w = scratch.get("w", r)
    fused = _fuse.above_sums(z, p, lo, hi, w)
    if fused is not None:
        band.copy_(w)
        rows, ids = _nonzero_rows(padded)
        n_a, m_a, s_a = fused
        return _Scan(n_a, m_a, s_a, rows, ids, _take(z, rows, ids), _take(p, rows, ids))
    torch.gt(z, lo[:, None], out=band)
    m = torch.gt(z, hi[:, None], out=w)
    band.bitwise_xor_(m.bool())  # the tokens above hi are above lo too
    rows, ids = _nonzero_rows(padded)
    zb, pb = _take(z, rows, ids), _take(p, rows, ids)
    n_a = m.sum(1).long()  # 0/1 sums: exact below 2**24
    pm = m.mul_(p)
    s_a = _row_dots(pm, z)
    m_a = _sum_f64(pm, p)
    return _Scan(n_a, m_a, s_a, rows, ids, zb, pb)


def _block_max(z: Tensor) -> Tensor:
    """(r, ceil(V / BLOCK)) maxima of consecutive blocks of BLOCK logits."""
    r, v = z.shape
    nf = v // BLOCK
    parts = [z[:, : nf * BLOCK].reshape(r, nf, BLOCK).amax(-1)] if nf else []
    if v % BLOCK:
        parts.append(z[:, nf * BLOCK :].amax(-1, keepdim=True))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def _block_band(z: Tensor, p: Tensor, lo: Tensor, sel: Tensor, bm: Tensor) -> tuple[Tensor, ...]:
    """Band tokens {z > lo} of the rows ``sel`` from their blocks whose maximum exceeds lo.

    Returns rows, ids, zb, pb (row-major, ids ascending).
    """
    v = z.shape[1]
    br, bc = (bm.index_select(0, sel) > lo.index_select(0, sel)[:, None]).nonzero(as_tuple=True)
    rr = sel.index_select(0, br)
    tok = bc[:, None] * BLOCK + torch.arange(BLOCK, device=z.device)
    rr2 = rr[:, None].expand_as(tok)
    valid = tok < v
    tok = tok.clamp(max=v - 1)
    zt = _take(z, rr2.reshape(-1), tok.reshape(-1)).view(tok.shape)
    keep = valid & (zt > lo.index_select(0, rr)[:, None])
    rows, ids = rr2[keep], tok[keep]
    return rows, ids, zt[keep], _take(p, rows, ids)


def _seg_sum(values: Tensor, seg: Tensor, n: int) -> Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, seg, values)


def _seg_positions(seg: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Per-segment counts (n,) and each entry's position in its segment (seg sorted)."""
    counts = torch.bincount(seg, minlength=n)
    return counts, torch.arange(seg.numel(), device=seg.device) - (counts.cumsum(0) - counts)[seg]


def _by_row_then_z_desc(rows: Tensor, zb: Tensor) -> Tensor:
    """Permutation ordering tokens by row, then logit descending, keeping the
    current (id ascending) order among equal logits."""
    key = sort_key(zb)
    if zb.dtype == torch.float32:  # one sort on (row, ~key)
        comp = rows * (1 << 32) + ((1 << 31) - 1 - key)
        return torch.sort(comp, stable=True).indices
    o = torch.sort(-key, stable=True).indices  # float64: two stable sorts
    return o[torch.sort(rows[o], stable=True).indices]


class _Boundary(NamedTuple):
    in_region: Tensor  # band tokens in the region (bool, band order)
    tau: Tensor  # (r,) boundary logit
    ties: Tensor  # (r,) tokens with logit tau
    m_tie: Tensor  # (r,) of which in the region
    tie_tokens: Tensor  # band indices of the tied tokens in the region


def _select(rows: Tensor, zb: Tensor, p64: Tensor, base: Tensor, live: Tensor, top_p: float) -> _Boundary:
    """Step 4: the boundary inside the band, exactly.

    One pass of float64 mass histograms over SELECT_BINS value bins spanning
    each row's band locates the bin of the boundary; its few tokens are then
    sorted (logit descending, id ascending) and accumulated exactly.

    Args:
        rows, zb, p64: band tokens (row-major, ids ascending within a row).
        base: (r,) exact mass above the band; live: (r,) rows to resolve.
    """
    r, dev, nb = base.shape[0], zb.device, SELECT_BINS
    inf = torch.full((r,), math.inf, dtype=zb.dtype, device=dev)
    zmin = inf.scatter_reduce(0, rows, zb, "amin")
    zhi = (-inf).scatter_reduce(0, rows, zb, "amax")
    width = zhi - zmin
    scale = torch.where(width > 0, nb / width, 0.0).nan_to_num_(0.0, 0.0, 0.0)
    d = ((zb - zmin[rows]) * scale[rows]).clamp_(0, nb - 1).long()
    h = torch.zeros(r * nb, dtype=torch.float64, device=dev).index_add_(0, rows * nb + d, p64)
    suf = torch.cat([h.view(r, nb).flip(1).cumsum(1).flip(1), h.new_zeros(r, 1)], 1)
    # boundary bin: the last one whose suffix still brings the mass to P
    # (exact float64 sums compared with P as they are)
    dstar = ((base[:, None] + suf[:, :nb] >= top_p) & live[:, None]).sum(1) - 1
    above = suf.gather(1, (dstar + 1)[:, None]).squeeze(1)
    cand = (d == dstar[rows]).nonzero().squeeze(1)
    cand = cand[_by_row_then_z_desc(rows[cand], zb[cand])]
    cr, cp = rows[cand], p64[cand]
    counts, pos = _seg_positions(cr, r)
    grid = torch.zeros(r, max(int(counts.max()), 1) if cr.numel() else 1, dtype=torch.float64, device=dev)
    grid[cr, pos] = cp
    before = (grid.cumsum(1) - grid)[cr, pos]
    incl = (base + above)[cr] + before < top_p  # mass ranked above < P
    # the boundary token is the last one in; tau its logit
    last = torch.zeros(r, dtype=torch.long, device=dev).index_add_(0, cr, incl.long()) - 1
    has = last >= 0
    tau = inf.clone()
    tau[has] = zb[cand[(counts.cumsum(0) - counts + last)[has]]]
    tied = zb[cand] == tau[cr]
    in_region = d > dstar[rows]
    in_region[cand[incl]] = True
    in_region &= live[rows]
    ties = torch.bincount(cr[tied], minlength=r)
    m_tie = torch.bincount(cr[tied & incl], minlength=r)
    return _Boundary(in_region, tau, ties, m_tie, cand[tied & incl])


def _first_pass(
    z: Tensor, p: Tensor, active: Tensor, top_p: float, scratch: Scratch
) -> tuple[Tensor, Tensor, Tensor, _Scan]:
    """Steps 1-2 for the active rows of a chunk.

    Rows whose band has nothing above it and reaches into few blocks take
    their band tokens from the block maxima (a read-only pass); the others
    get the full :func:`_scan`. Works on a copy of the active rows when they
    are at most half of the chunk, and of the scanned ones when they are at
    most a quarter of those (so at most one chunk of copies). Overwrites p.

    Returns zmax, lo, hi (r,) and the scan result in chunk rows.
    """
    r, dev, dt = z.shape[0], z.device, z.dtype
    inf = torch.full((r,), math.inf, dtype=dt, device=dev)
    zmax, lo, hi = torch.zeros_like(inf), inf.clone(), inf.clone()
    zero = torch.zeros(r, dtype=torch.float64, device=dev)
    n_a, m_a, s_a = zero.long(), zero, zero.to(dt)
    e = torch.zeros(0, dtype=torch.long, device=dev)
    parts = [(e, e, z.new_zeros(0), p.new_zeros(0))]
    act = active.nonzero().squeeze(1)
    if act.numel():
        whole = 2 * act.numel() > r
        za, pa = (z, p) if whole else (z.index_select(0, act), p.index_select(0, act))
        rows_a = torch.arange(r, device=dev) if whole else act
        live = active if whole else torch.ones(act.numel(), dtype=torch.bool, device=dev)
        bm = _block_max(za)
        zmax_a = bm.amax(1)
        lo_a, hi_a = predict_band(za, pa, zmax_a, top_p, live, scratch.get("w", za.shape[0]))
        zmax[rows_a], lo[rows_a], hi[rows_a] = zmax_a, lo_a, hi_a
        blocky = live & torch.isinf(hi_a) & ((bm > lo_a[:, None]).sum(1) <= BLOCK_LIMIT)
        if bool(blocky.any()):
            br, bi, bz, bp = _block_band(za, pa, lo_a, blocky.nonzero().squeeze(1), bm)
            parts.append((rows_a[br], bi, bz, bp))
        rest = live & ~blocky
        n_rest = int(rest.sum())
        if n_rest:
            if 4 * n_rest <= za.shape[0]:  # few rows: on a copy of them
                j = rest.nonzero().squeeze(1)
                sel, zs, ps, lo_s, hi_s = rows_a[j], za.index_select(0, j), pa.index_select(0, j), lo_a[j], hi_a[j]
            else:  # in place, the other rows masked out (no band, nothing above)
                inf_a = torch.full_like(lo_a, math.inf)
                sel, zs, ps = rows_a, za, pa
                lo_s, hi_s = torch.where(rest, lo_a, inf_a), torch.where(rest, hi_a, inf_a)
            sc = _scan(zs, ps, lo_s, hi_s, scratch)
            n_a, m_a, s_a = n_a.index_copy(0, sel, sc.n_a), m_a.index_copy(0, sel, sc.m_a), s_a.index_copy(0, sel, sc.s_a)
            parts.append((sel[sc.rows], sc.ids, sc.zb, sc.pb))
    parts = [q for q in parts if q[0].numel()] or parts[:1]
    rows, ids, zb, pb = parts[0] if len(parts) == 1 else (torch.cat(t) for t in zip(*parts, strict=True))
    return zmax, lo, hi, _Scan(n_a, m_a, s_a, rows, ids, zb, pb)


def nucleus_chunk(z: Tensor, p: Tensor, top_p: float, scratch: Scratch, small: int) -> ChunkRegions:
    """Exact nucleus of each row of a chunk (0 < top_p < 1).

    Args:
        z: (r, V) logits, compute dtype (float32 / float64).
        p: (r, V) softmax(z) (the probabilities that define the masses);
            its buffer is overwritten (used for temporaries).
        top_p: P in (0, 1).
        scratch: its buffers "w" and "p" (>= r, V) and its padded mask are used.
        small: rows with at most this many tokens, all in the band, also
            return their tokens (``small_rows``, ``small_ids``).

    Returns:
        :class:`ChunkRegions`.
    """
    r, v = z.shape
    dev, dt = z.device, z.dtype
    pmax = p.amax(1)
    active = pmax < top_p  # else the top token alone reaches P
    zmax, lo, hi, sc = _first_pass(z, p, active, top_p, scratch)  # p is overwritten from here on
    n_a, m_a, s_a = sc.n_a, sc.m_a, sc.s_a
    rows, ids, zb, pb = sc.rows, sc.ids, sc.zb, sc.pb
    resort = rows.numel() > 1 and bool((rows[1:] < rows[:-1]).any())  # block and scan rows interleave
    support = torch.zeros(r, dtype=torch.bool, device=dev)
    for attempt in range(MAX_ATTEMPTS + 1):
        mb = _seg_sum(pb.double(), rows, r)
        fail_above = m_a >= top_p  # the boundary is above the band
        fail_below = (m_a + mb < top_p) & active & ~support  # ... or below it
        gone = fail_below & torch.isneginf(lo)  # all the mass is below P
        support |= gone
        redo = (fail_above | fail_below) & ~gone
        if bool(gone.any()) or bool(redo.any()):
            keep = ~(redo | gone)[rows]
            rows, ids, zb, pb = rows[keep], ids[keep], zb[keep], pb[keep]
        if not bool(redo.any()):
            break
        if attempt == MAX_ATTEMPTS:
            raise AssertionError("nucleus search did not converge")  # pragma: no cover
        # widen past the side that missed; after a few doublings, to the end
        step = WIDEN * 2.0**attempt if attempt < MAX_ATTEMPTS - 1 else math.inf
        up, down = fail_above & redo, fail_below & redo
        lo, hi = torch.where(up, hi, torch.where(down, lo - step, lo)), torch.where(up, hi + step, torch.where(down, lo, hi))
        todo = redo.nonzero().squeeze(1)
        zt = z.index_select(0, todo)  # their probabilities again (same kernel, same values)
        pt = torch.ops.aten._softmax.out(zt, -1, False, out=scratch.get("p", todo.numel()))
        st = _scan(zt, pt, lo[todo], hi[todo], scratch)
        n_a, m_a, s_a = n_a.index_copy(0, todo, st.n_a), m_a.index_copy(0, todo, st.m_a), s_a.index_copy(0, todo, st.s_a)
        rows, ids = torch.cat([rows, todo[st.rows]]), torch.cat([ids, st.ids])
        zb, pb = torch.cat([zb, st.zb]), torch.cat([pb, st.pb])
        resort = True
    if resort:  # back to row-major order
        order = torch.argsort(rows * v + ids)
        rows, ids, zb, pb = rows[order], ids[order], zb[order], pb[order]

    live = active & ~support
    p64 = pb.double()
    b = _select(rows, zb, p64, m_a, live, top_p)
    inr = b.in_region
    size = n_a + torch.zeros(r, dtype=torch.long, device=dev).index_add_(0, rows, inr.long())
    mass = m_a + _seg_sum(torch.where(inr, p64, 0.0), rows, r)
    pz = s_a + _seg_sum(torch.where(inr, pb * zb, 0.0), rows, r)
    size = torch.where(support, 0, torch.where(active, size, 1))
    mass = torch.where(active, mass, pmax.double())
    inside = (n_a == 0) & live
    partial = (b.m_tie < b.ties)[rows[b.tie_tokens]]
    tt = b.tie_tokens[partial]
    sm = inr & (inside & (size <= small))[rows]
    return ChunkRegions(
        size, mass, pz, b.tau, b.m_tie == b.ties, inside, support, pmax, zmax, rows[tt], ids[tt], rows[sm], ids[sm]
    )
