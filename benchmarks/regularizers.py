"""Speed and memory of the regularizers against the log-softmax PPO pays anyway.

    python benchmarks/regularizers.py --json OUT.json            # the default table
    python benchmarks/regularizers.py --cases llm --vocab 151936 --positions 2048
    python benchmarks/regularizers.py --device cuda --dtype bfloat16 --json OUT.json

The default run is a table: logits of positions x vocab for each case of
``--cases`` (``llm``: peaked, LLM-like; ``gauss1``/``gauss2``/``gauss3``: flat
N(0, s^2) logits, s = 1, 2, 3, whose P = 0.99 nucleus holds 25-90 % of the
vocabulary) and each vocabulary of ``--vocab`` (151,936 and 32,000). Within a
case every entry runs forward + backward ``--repeats`` times, interleaved
(entry 1, 2, ..., 1, 2, ...), after one untimed run; ``time_ratio`` is the
median time over the median time of the baseline in the same case, wall clock
(``cpu_time_ratio``: the same with the process's CPU time, steadier on a
shared machine with one thread). The baseline is ``log_softmax`` forward +
backward, taken through the gather of one sampled token per position (what
the PPO surrogate needs anyway).

Entries (the first case gets them all, the others the TRE-P ones, marked *;
``--full-table`` gives every case all of them):

* the seven strategy objects (``Ent``, ``TREK``, ``TREP`` *, ``MinEnt``,
  ``ForkingTokens``, ``KLCov``, ``ClipCov``) with coef 1, called on a
  PolicyContext over the logits; where the output has a loss, backward of
  its token mean (Forking-Tokens and Clip-Cov only re-weight the surrogate
  and have no backward of their own; KL-Cov's backward reaches the
  log-probs only);
* ``tre_p_eager`` *: ``TREP`` with the fused CPU passes turned off
  (``TRE_LIGHTNING_COMPILE=0``, see ``tre_lightning.regularizers._fuse``);
* ``tre_p_cap256`` *: our TRE-P with ``max_region=256``;
* ``log_probs_from_logits``: our chunked replacement for the baseline;
* ``ref_tre_p_capped256`` *: TRE-P as the authors' code computed it (full
  softmax, top-256 candidates, kept while the mass ranked above is < P,
  re-softmax, log V / log count, autograd backward), written here from the
  description in reference/anchor-notes.md;
* ``ref_tre_p_full_sort``: Algorithm 1 literally (softmax, full sort,
  cumulative sum, local softmax; autograd), in chunks of 64 rows to bound
  its memory; timed once (``--ref-repeats``);
* ``naive_entropy`` (only with ``--naive``): -(softmax * log_softmax).sum(-1)
  through autograd, unchunked; it holds several (N, V) tensors at once.

Memory is the peak of bytes held in tensors beyond the logits and their
gradient (the allocator's cache and the C library's heap are not counted):
on CUDA ``torch.cuda.max_memory_allocated``, on CPU the running total of the
allocations the profiler records (``profile_memory=True``, in a separate
untimed run, which is also the warm-up). Forward and backward are measured
separately; the backward's figure adds what the forward left alive (saved
tensors) and subtracts the gradient. ``peak_extra_bytes`` is the larger of the
two.

The LLM-like logits imitate an instruction-tuned LLM on a reasoning task: a
Gaussian tail (sigma 2) over the vocabulary plus a head of 1 + Poisson(1)
tokens with Gamma(0.25) weights, the tail holding a log-uniform share in
[1e-7, 1.5e-2] of the mass. The run prints each case's P-bar-max, entropy and
nucleus sizes (0.99) so that they can be compared with real models.
``--logits gaussian`` is the old name of the single case ``gauss2``.

The JSON report keeps the first case's entries at the top level
(``results``, ``logits_profile``, ``checks``, ...) and lists every case under
``table``, with the thread count and the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from tre_lightning.ppo import clipped_policy_loss
from tre_lightning.regularizers import (
    TREK,
    TREP,
    ClipCov,
    Ent,
    ForkingTokens,
    KLCov,
    MinEnt,
    PolicyContext,
)
from tre_lightning.regularizers import functional as F
from tre_lightning.regularizers._rows import resolve_chunk_size

# --------------------------------------------------------------------------
# logits
# --------------------------------------------------------------------------


def llm_like_logits(n: int, v: int, *, seed: int = 0, sigma: float = 2.0) -> torch.Tensor:
    """(n, v) float32 logits with an LLM-like head / tail structure (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * sigma
    hmax = min(32, v)
    h = (1 + torch.poisson(torch.full((n,), 1.0), generator=g)).clamp(max=hmax).long()
    w = torch._standard_gamma(torch.full((n, hmax), 0.25), generator=g)
    w = torch.where(torch.arange(hmax)[None] < h[:, None], w, 0.0) + 1e-30
    w = w / w.sum(1, keepdim=True)
    log_t = torch.empty(n).uniform_(math.log(1e-7), math.log(1.5e-2), generator=g)
    shift = math.log(v) + sigma**2 / 2 - log_t
    idx = torch.stack([torch.randperm(v, generator=g)[:hmax] for _ in range(n)])  # distinct head ids
    head = torch.log(w) + shift[:, None]
    z.scatter_(1, idx, torch.maximum(head, z.gather(1, idx)))
    return z


#: the cases of the default table: logits kind -> description
CASES = {
    "llm": "peaked, LLM-like (P-bar-max ~0.9)",
    "gauss1": "flat, N(0, 1) logits",
    "gauss2": "flat, N(0, 4) logits",
    "gauss3": "flat, N(0, 9) logits",
}


def make_logits(kind: str, n: int, v: int, seed: int) -> torch.Tensor:
    if kind == "llm":
        return llm_like_logits(n, v, seed=seed)
    if kind == "gaussian":
        kind = "gauss2"
    if kind.startswith("gauss"):
        sigma = float(kind[len("gauss") :])
        return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * sigma
    raise ValueError(kind)


# --------------------------------------------------------------------------
# references (written from the paper / the notes, autograd backward)
# --------------------------------------------------------------------------


def ref_tre_p_capped(z: torch.Tensor, top_p: float = 0.99, cap: int = 256) -> torch.Tensor:
    """TRE-P as the authors' code computed it: top-`cap` candidates of the full softmax."""
    vocab = z.shape[-1]
    probs = torch.softmax(z.float(), dim=-1)
    top_p_vals, idx = probs.topk(min(cap, vocab), dim=-1)
    above = top_p_vals.cumsum(-1) - top_p_vals
    keep = above < top_p
    keep[..., 0] = True
    count = keep.sum(-1)
    logits = z.float().gather(-1, idx).masked_fill(~keep, -math.inf)
    logq = torch.log_softmax(logits, dim=-1)
    h = -(logq.exp() * logq.masked_fill(~keep, 0.0)).sum(-1)
    scale = math.log(vocab) / torch.log(count.clamp(min=2).float())
    return torch.where(count > 1, scale * h, 0.0)


def ref_tre_p_full_sort_fwd_bwd(x: torch.Tensor, top_p: float = 0.99, rows: int = 64) -> None:
    """Algorithm 1 with a full sort of each row; backward per chunk into x.grad."""
    vocab = x.shape[-1]
    n = x.shape[0]
    for s in range(0, n, rows):
        xc = x.detach()[s : s + rows].float().requires_grad_(True)
        p = torch.softmax(xc, dim=-1)
        sp, order = torch.sort(p, dim=-1, descending=True)
        cs = sp.cumsum(-1)
        size = (cs < top_p).sum(-1) + 1
        keep = torch.arange(vocab)[None, :].to(size.device) < size[:, None]
        zs = xc.gather(-1, order).masked_fill(~keep, -math.inf)
        logq = torch.log_softmax(zs, dim=-1)
        h = -(logq.exp() * logq.masked_fill(~keep, 0.0)).sum(-1)
        val = torch.where(size > 1, math.log(vocab) / torch.log(size.clamp(min=2).float()) * h, 0.0)
        val.sum().backward()
        g = xc.grad.to(x.dtype)
        if x.grad is None:
            x.grad = torch.zeros_like(x)
        x.grad[s : s + rows] += g


# --------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------

def _cpu_allocated_trace(fn: Callable[[], object]) -> tuple[object, int, int]:
    """Run fn under the profiler's memory tracking.

    Returns ``(result, peak, final)``: the highest and the last number of
    bytes allocated through torch's CPU allocator during the call, relative
    to its start (tensors freed that were allocated before count negative).
    """
    from torch.profiler import ProfilerActivity, profile

    saved = os.dup(2)  # libkineto prints two lines per session on stderr
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
        key=lambda e: e["ts"],
    )
    if not mem:
        return out, 0, 0
    # "Total Allocated" is a running total that persists across sessions:
    # take it relative to its value just before the first event.
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    totals = [e["args"]["Total Allocated"] - start for e in mem]
    return out, max(0, max(totals)), totals[-1]


class Entry:
    """fwd(x) -> object to backprop (or None); bwd(obj) runs the backward."""

    def __init__(self, name: str, fwd: Callable, bwd: Callable | None, *, kind: str, repeats: int | None = None):
        self.name, self.fwd, self.bwd, self.kind, self.repeats = name, fwd, bwd, kind, repeats

    def run(self, x: torch.Tensor) -> None:
        out = self.fwd(x)
        if self.bwd is not None and out is not None:
            self.bwd(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_memory(entry: Entry, x: torch.Tensor, extra_leaves: list[torch.Tensor]) -> dict[str, int]:
    """Peak bytes beyond the logits and their gradient, forward and backward."""
    dev = x.device
    x.grad = None
    for t in extra_leaves:
        t.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = entry.fwd(x)
        torch.cuda.synchronize()
        fwd_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        if entry.bwd is not None and out is not None:
            entry.bwd(out)
        torch.cuda.synchronize()
        grad_bytes = 0 if x.grad is None else x.grad.numel() * x.grad.element_size()
        bwd_peak = torch.cuda.max_memory_allocated() - base - grad_bytes
    else:
        out, fwd_peak, fwd_final = _cpu_allocated_trace(lambda: entry.fwd(x))
        bwd_peak = 0
        if entry.bwd is not None and out is not None:
            _, peak, _ = _cpu_allocated_trace(lambda: entry.bwd(out))
            grad_bytes = 0 if x.grad is None else x.grad.numel() * x.grad.element_size()
            bwd_peak = fwd_final + peak - grad_bytes
    del out
    x.grad = None
    return {"fwd": max(0, int(fwd_peak)), "bwd": max(0, int(bwd_peak))}


def time_entries(
    entries: list[Entry], x: torch.Tensor, repeats: int, leaves: list[torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each entry over interleaved repeats."""
    wall: dict[str, list[float]] = {e.name: [] for e in entries}
    cpu: dict[str, list[float]] = {e.name: [] for e in entries}
    for r in range(repeats):
        for e in entries:
            if e.repeats is not None and r >= e.repeats:
                continue
            x.grad = None
            for t in leaves:
                t.grad = None
            _sync(x.device)
            t0, c0 = time.perf_counter(), time.process_time()
            e.run(x)
            _sync(x.device)
            wall[e.name].append(time.perf_counter() - t0)
            cpu[e.name].append(time.process_time() - c0)
    x.grad = None
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in wall}


class _Env:
    """Set an environment variable around a call (the fused-pass switch)."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value, self.old = name, value, None

    def __enter__(self) -> None:
        self.old = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc) -> None:
        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old


def build_entries(x, tokens, n: int, v: int, args, full: bool) -> tuple[list[Entry], list[torch.Tensor]]:
    """The entries of one case; ``full=False`` keeps the baseline and the TRE-P ones."""
    device = x.device
    gen = torch.Generator().manual_seed(args.seed + 1)
    log_probs = (-torch.rand(1, n, generator=gen) * 3).to(device).requires_grad_(True)
    old_log_probs = log_probs.detach() + 0.05 * torch.randn(1, n, generator=gen).to(device)
    advantages = torch.randn(1, n, generator=gen).to(device)
    mask = torch.ones(1, n, device=device)
    clipped = clipped_policy_loss(log_probs.detach(), old_log_probs, advantages, mask).clipped
    skip = {s for s in args.skip.split(",") if s}

    def ctx_of(z: torch.Tensor) -> PolicyContext:
        return PolicyContext(
            logits=z.view(1, n, v),
            log_probs=log_probs,
            old_log_probs=old_log_probs,
            advantages=advantages,
            mask=mask,
            clipped=clipped,
        )

    def strategy(reg, env: str | None = None) -> tuple[Callable, Callable]:
        def fwd(z):
            if env is None:
                out = reg(ctx_of(z))
            else:
                with _Env("TRE_LIGHTNING_COMPILE", env):
                    out = reg(ctx_of(z))
            if out.loss is None:
                return None
            return (out.loss * mask).sum() / mask.sum()

        def bwd(loss):
            if env is None:
                loss.backward()
            else:
                with _Env("TRE_LIGHTNING_COMPILE", env):
                    loss.backward()

        return fwd, bwd

    entries: list[Entry] = []

    def add(name, fwd, bwd, kind, repeats=None, tre_p=False):
        if name not in skip and (full or tre_p):
            entries.append(Entry(name, fwd, bwd, kind=kind, repeats=repeats))

    add(
        "log_softmax",
        lambda z: torch.log_softmax(z, dim=-1).gather(-1, tokens[:, None]).sum(),
        lambda y: y.backward(),
        "baseline",
        tre_p=True,
    )
    cs = args.chunk_size
    regs = {
        "ent": Ent(coef=1.0, chunk_size=cs),
        "tre_k": TREK(coef=1.0, top_k=args.top_k, chunk_size=cs),
        "tre_p": TREP(coef=1.0, top_p=args.top_p, chunk_size=cs),
        "min_ent": MinEnt(coef=1.0, chunk_size=cs),
        "forking": ForkingTokens(chunk_size=cs),
        "kl_cov": KLCov(coef=1.0),
        "clip_cov": ClipCov(seed=0),
    }
    for name, reg in regs.items():
        add(name, *strategy(reg), "ours", tre_p=name == "tre_p")
    add("tre_p_eager", *strategy(regs["tre_p"], "0"), "ours_extra", tre_p=True)
    add(
        "tre_p_cap256",
        *strategy(TREP(coef=1.0, top_p=args.top_p, max_region=256, chunk_size=cs)),
        "ours_extra",
        tre_p=True,
    )
    add(
        "log_probs_from_logits",
        lambda z: F.log_probs_from_logits(z, tokens, chunk_size=cs).sum(),
        lambda y: y.backward(),
        "ours_extra",
    )
    add(
        "ref_tre_p_capped256",
        lambda z: ref_tre_p_capped(z, args.top_p).sum(),
        lambda y: y.backward(),
        "reference",
        tre_p=True,
    )
    add(
        "ref_tre_p_full_sort",
        lambda z: ref_tre_p_full_sort_fwd_bwd(z, args.top_p),
        None,
        "reference",
        repeats=args.ref_repeats,
    )
    if args.naive:
        add(
            "naive_entropy",
            lambda z: -(torch.softmax(z.float(), -1) * torch.log_softmax(z.float(), -1)).sum(-1).sum(),
            lambda y: y.backward(),
            "reference",
        )
    return entries, [log_probs]


def run_case(kind: str, v: int, args, full: bool) -> dict:
    """Profile, memory and interleaved timings of every entry on one logits tensor."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n = args.positions
    chunk = resolve_chunk_size(args.chunk_size, v, device)
    x = make_logits(kind, n, v, args.seed).to(device=device, dtype=dtype).requires_grad_(True)
    with torch.no_grad():  # one sampled token per position, as in a rollout
        tokens = torch.cat(
            [torch.multinomial(torch.softmax(c.float(), -1), 1, generator=None).squeeze(1) for c in x.split(256)]
        )
    entries, leaves = build_entries(x, tokens, n, v, args, full)
    cs = args.chunk_size
    with torch.no_grad():
        pmax, ent = F.token_stats(x.detach(), chunk_size=cs)
        size = F.trust_region_entropy(x.detach(), top_p=args.top_p, chunk_size=cs).region_size.float()
    q = torch.tensor([0.5, 0.9, 0.99], device=size.device)
    profile = {
        "p_max_mean": float(pmax.mean()),
        "entropy_mean": float(ent.float().mean()),
        "entropy_q50_q80": [float(ent.float().quantile(0.5)), float(ent.float().quantile(0.8))],
        "nucleus_q50_q90_q99_max": [*map(float, size.quantile(q)), float(size.max())],
        "nucleus_frac_gt16": float((size > 16).float().mean()),
        "nucleus_frac_gt256": float((size > 256).float().mean()),
        "nucleus_frac_eq1": float((size == 1).float().mean()),
    }
    # memory: one dedicated run each (also the warm-up for the timing)
    mem = {e.name: measure_memory(e, x, leaves) for e in entries}
    times = time_entries(entries, x, args.repeats, leaves)
    base_t, base_c = times.get("log_softmax", (float("nan"), float("nan")))
    results = {}
    for e in entries:
        t, c = times[e.name]
        peak = max(mem[e.name].values())
        results[e.name] = {
            "kind": e.kind,
            "seconds": t,
            "cpu_seconds": c,
            "time_ratio": t / base_t,
            "cpu_time_ratio": c / base_c if base_c > 0 else float("nan"),
            "peak_extra_bytes": peak,
            "peak_extra_fwd_bytes": mem[e.name]["fwd"],
            "peak_extra_bwd_bytes": mem[e.name]["bwd"],
            "peak_extra_in_chunk_units": peak / (chunk * v * 4),
        }
    return {"case": kind, "vocab": v, "chunk_rows": chunk, "logits_profile": profile, "results": results}


def _ratio(results: dict, a: str, b: str) -> float:
    return results[a]["seconds"] / results[b]["seconds"] if a in results and b in results else float("nan")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--vocab", default="151936,32000", help="comma-separated vocabulary sizes")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated logits cases of {sorted(CASES)}")
    ap.add_argument("--logits", default=None, choices=["llm", "gaussian"], help="old form of --cases (one case)")
    ap.add_argument("--full-table", action="store_true", help="every entry in every case (default: the first)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: automatic)")
    ap.add_argument("--top-p", type=float, default=0.99)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-repeats", type=int, default=1, help="timed runs of the full-sort reference")
    ap.add_argument("--naive", action="store_true", help="also time the unchunked autograd entropy")
    ap.add_argument("--skip", default="", help="comma-separated entry names to leave out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    cases = [{"gaussian": "gauss2"}.get(args.logits, args.logits)] if args.logits else args.cases.split(",")
    for c in cases:
        if c not in CASES:
            ap.error(f"--cases: {c!r} is not one of {sorted(CASES)}")
    vocabs = [int(v) for v in args.vocab.split(",")]
    load_before = os.getloadavg()
    table = []
    for vi, v in enumerate(vocabs):
        for ci, kind in enumerate(cases):
            table.append(run_case(kind, v, args, full=args.full_table or (vi == 0 and ci == 0)))
    load_after = os.getloadavg()

    first = table[0]
    results, v, chunk = first["results"], first["vocab"], first["chunk_rows"]
    bound = 4 * chunk * v * 4
    ours = [k for k, r in results.items() if r["kind"] == "ours"]
    tre_p_rows = [c["results"] for c in table if "tre_p" in c["results"]]
    checks = {
        "every_regularizer_time_ratio<=2.0": all(results[k]["time_ratio"] <= 2.0 for k in ours),
        "tre_k,tre_p,min_ent_time_ratio<=1.3": all(
            results[k]["time_ratio"] <= 1.3 for k in ("tre_k", "tre_p", "min_ent") if k in results
        ),
        "tre_p_time_ratio<=1.3_every_case": all(r["tre_p"]["time_ratio"] <= 1.3 for r in tre_p_rows),
        "tre_p/ref_tre_p_capped256<=1.0_every_case": all(
            _ratio(r, "tre_p", "ref_tre_p_capped256") <= 1.0 for r in tre_p_rows if "ref_tre_p_capped256" in r
        ),
        "ref_tre_p_full_sort/tre_p>=10": _ratio(results, "ref_tre_p_full_sort", "tre_p") >= 10,
        "peak_extra_bytes<=4*chunk*V*4": all(results[k]["peak_extra_bytes"] <= bound for k in ours),
    }
    report = {
        "config": {
            **vars(args),
            "cases": cases,
            "vocabs": vocabs,
            "chunk_rows": chunk,
            "threads": torch.get_num_threads(),
            "load_average_before_after": [load_before, load_after],
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
        },
        "logits_profile": first["logits_profile"],
        "baseline": "log_softmax",
        "memory_bound_bytes": bound,
        "results": results,
        "speedups": {
            "tre_p_vs_ref_capped256": _ratio(results, "tre_p", "ref_tre_p_capped256"),
            "full_sort_over_tre_p": _ratio(results, "ref_tre_p_full_sort", "tre_p"),
        },
        "checks": checks,
        "table": table,
    }

    print(
        f"# {args.positions} positions, {args.dtype} on {args.device}, {torch.get_num_threads()} threads, "
        f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} ({os.cpu_count()} CPUs); "
        f"time ratios = median of {args.repeats} interleaved runs / median log_softmax fwd+bwd"
    )
    for case in table:
        pr = case["logits_profile"]
        print(
            f"\n## {case['case']} ({CASES[case['case']]}), V = {case['vocab']}, chunk {case['chunk_rows']} rows: "
            f"P-bar-max {pr['p_max_mean']:.3f}, mean H {pr['entropy_mean']:.2f} nats, "
            f"nucleus({args.top_p}) q50/q90/q99/max {[int(x) for x in pr['nucleus_q50_q90_q99_max']]}"
        )
        print(f"{'entry':24s} {'kind':10s} {'seconds':>9s} {'ratio':>7s} {'cpu ratio':>9s} {'peak extra MiB':>15s}")
        for name, r in case["results"].items():
            print(
                f"{name:24s} {r['kind']:10s} {r['seconds']:9.3f} {r['time_ratio']:7.2f} "
                f"{r['cpu_time_ratio']:9.2f} {r['peak_extra_bytes'] / 2**20:15.1f}"
            )
        cr = case["results"]
        if "tre_p" in cr and "ref_tre_p_capped256" in cr:
            print(f"tre_p / ref_tre_p_capped256 = {_ratio(cr, 'tre_p', 'ref_tre_p_capped256'):.2f}")
    print(f"\nref_tre_p_full_sort / tre_p = {report['speedups']['full_sort_over_tre_p']:.1f} (first case)")
    for k, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {k}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
