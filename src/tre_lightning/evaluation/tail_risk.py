"""Figures, table and claim verdicts of the tail-risk sweep (``tre-plot --tail-risk``; docs/tail_risk.md).

Reads every ``tre-train`` run folder under the given paths (Lightning's
``csv/metrics.csv`` and the run's ``.hydra/config.yaml``), groups the runs into
cells (regularizer with its α, horizon) over seeds, and writes, in the
paper's style:

- ``delta_pass1.png``: Δ Pass@1 versus vanilla PPO against the horizon, one
  line per regularizer and α, standard-error bars (Figure 1);
- ``pmax.png``: P̄max against PPO iterations per regularizer at each horizon,
  EMA 0.8, mean ± standard error over seeds (Figure 3);
- ``tail_mass.png``: mass on invalid tokens per step against the horizon;
- ``tail_risk.md``: the table (mean ± standard error, n seeds) and the
  verdict of the four claims of the issue (a claim holds only where the gap
  exceeds two standard errors over at least 5 seeds).

Standard errors of a difference of two cells are unpaired:
``sqrt(se_a² + se_b²)`` (conservative; seeds are not assumed to pair); the claims use
them. The table adds, as a supplementary view, the paired per-seed difference
(:func:`paired`): runs of one seed share the warm start and the random numbers.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tre_lightning.evaluation.report import _float as _f  # one home: a finite float or None
from tre_lightning.evaluation.report import ema

__all__ = [
    "ENTROPY_TYPE",
    "Cell",
    "TailRun",
    "claims",
    "find_tail_runs",
    "format_table",
    "load_tail_run",
    "mean_se",
    "tail_risk_main",
    "write_tail_risk_report",
]

ENTROPY_TYPE = ("ent", "tre_k", "tre_p", "min_ent")
"""Regularizers whose coefficient is the α of an entropy-type bonus (shown in the labels)."""

TAIL_WINDOW = 5
"""Iterations averaged for the end-of-run training diagnostics (tail mass, P̄max, region size)."""

MIN_SEEDS = 5


def mean_se(xs: Sequence[float]) -> tuple[float, float, int]:
    """(mean, standard error of the mean, n); the SE of one value is nan."""
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(xs) / n
    if n == 1:
        return m, math.nan, 1
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n), n


@dataclass
class TailRun:
    """One run: its cell (label, horizon), seed, validation scores and training curves."""

    folder: Path
    label: str
    regularizer: str
    alpha: float | None
    horizon: int
    seed: int
    val: dict[int, float] = field(default_factory=dict)
    train: dict[str, dict[int, float]] = field(default_factory=dict)

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        points = self.train.get(key, {})
        steps = sorted(points)
        return steps, [points[s] for s in steps]

    def final(self, key: str) -> float | None:
        """Mean of ``key`` over the last :data:`TAIL_WINDOW` iterations that logged it."""
        _, values = self.curve(key)
        tail = values[-TAIL_WINDOW:]
        return sum(tail) / len(tail) if tail else None

    @property
    def pass_before(self) -> float | None:
        return self.val.get(0)

    @property
    def pass_after(self) -> float | None:
        return self.val[max(self.val)] if self.val and max(self.val) > 0 else None


TRAIN_KEYS = ("policy/p_max", "policy/invalid_mass", "policy/invalid_seq_mass", "train/invalid_seq_rate",
              "policy/tr_size", "train/response_length", "reward/mean")


def _label(config: Mapping[str, Any]) -> tuple[str, str, float | None]:
    regs = dict(config.get("regularizers") or {})
    if not regs:
        return "none", "none", None
    names = sorted(regs)
    if len(names) > 1:
        return "+".join(names), "+".join(names), None
    name = names[0]
    coef = _f((regs[name] or {}).get("coef"))
    if name in ENTROPY_TYPE and coef is not None:
        return f"{name} α={coef:g}", name, coef
    return name, name, coef


def load_tail_run(folder: str | Path) -> TailRun | None:
    """A tail-risk run folder (``csv/metrics.csv`` and ``.hydra/config.yaml`` with a repeat task), else None."""
    folder = Path(folder)
    metrics, cfg_path = folder / "csv" / "metrics.csv", folder / ".hydra" / "config.yaml"
    if not metrics.is_file() or not cfg_path.is_file():
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False)
    task = cfg.get("task") or {}
    if not isinstance(task, dict) or "horizon" not in task:
        return None
    label, reg, alpha = _label(cfg)
    run = TailRun(folder=folder, label=label, regularizer=reg, alpha=alpha, horizon=int(task["horizon"]),
                  seed=int(cfg.get("seed", 0)))
    with open(metrics, newline="") as fh:
        rows = list(csv.DictReader(fh))
    trained = False
    for row in rows:
        step = _f(row.get("step"))
        if step is None:
            continue
        if _f(row.get("reward/mean")) is not None:
            trained = True
            for key in TRAIN_KEYS:
                value = _f(row.get(key))
                if value is not None:
                    run.train.setdefault(key, {})[int(step) + 1] = value
        score = _f(row.get("val/pass@1"))
        if score is not None:
            run.val[int(step) + 1 if trained else 0] = score
    return run


def find_tail_runs(paths: Iterable[str | Path]) -> list[TailRun]:
    """Every finished tail-risk run at or below ``paths`` (validated after training), one per
    (label, horizon, seed): a cell run twice (two sweep invocations overlapping) counts once,
    the first folder in path order."""
    runs, seen, cells_seen = [], set(), set()
    for p in paths:
        for metrics in sorted(Path(p).glob("**/csv/metrics.csv")):
            folder = metrics.parent.parent.resolve()
            if folder in seen:
                continue
            seen.add(folder)
            run = load_tail_run(folder)
            if run is None or run.pass_after is None:
                continue
            key = (run.label, run.horizon, run.seed)
            if key not in cells_seen:
                cells_seen.add(key)
                runs.append(run)
    return runs


@dataclass
class Cell:
    """The runs of one (label, horizon) over seeds."""

    label: str
    horizon: int
    runs: list[TailRun]

    def stat(self, value: str) -> tuple[float, float, int]:
        """mean ± SE over seeds of ``pass_before``, ``pass_after`` or a training key's final value."""
        if value in ("pass_before", "pass_after"):
            xs = [getattr(r, value) for r in self.runs]
        else:
            xs = [r.final(value) for r in self.runs]
        return mean_se([x for x in xs if x is not None])


def cells(runs: Sequence[TailRun]) -> dict[tuple[str, int], Cell]:
    out: dict[tuple[str, int], Cell] = {}
    for r in runs:
        out.setdefault((r.label, r.horizon), Cell(r.label, r.horizon, [])).runs.append(r)
    return dict(sorted(out.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])))


def _order(label: str) -> tuple[int, str]:
    names = ["none", "ent", "tre_k", "tre_p", "min_ent", "kl_cov"]
    head = label.split(" ")[0]
    return (names.index(head) if head in names else len(names), label)


def diff(a: Cell | None, b: Cell | None, value: str = "pass_after") -> tuple[float, float, int] | None:
    """(mean(a) − mean(b), unpaired SE, min n) of ``value``; None when a cell is missing."""
    if a is None or b is None:
        return None
    ma, sa, na = a.stat(value)
    mb, sb, nb = b.stat(value)
    return ma - mb, math.sqrt(sa ** 2 + sb ** 2), min(na, nb)


def delta(cs: Mapping[tuple[str, int], Cell], label: str, horizon: int,
          value: str = "pass_after", base: str = "none") -> tuple[float, float, int] | None:
    """``diff`` of the cells (label, horizon) and (base, horizon)."""
    return diff(cs.get((label, horizon)), cs.get((base, horizon)), value)


def paired(cs: Mapping[tuple[str, int], Cell], label: str, horizon: int, value: str = "pass_after",
           base: str = "none") -> tuple[float, float, int] | None:
    """Mean and SE over the seeds both cells ran of the per-seed difference (label − base): the
    supplementary, paired view (runs of one seed share the warm start and the random numbers)."""
    a, b = cs.get((label, horizon)), cs.get((base, horizon))
    if a is None or b is None:
        return None
    by_seed = {r.seed: r for r in b.runs}
    xs = []
    for r in a.runs:
        other = by_seed.get(r.seed)
        if other is None:
            continue
        x, y = (getattr(r, value), getattr(other, value)) if value.startswith("pass_") else (
            r.final(value), other.final(value))
        if x is not None and y is not None:
            xs.append(x - y)
    return mean_se(xs) if xs else None


def _pm(m: float, se: float, pct: bool = True, signed: bool = False, digits: int = 1) -> str:
    if math.isnan(m):
        return "–"
    k = 100.0 if pct else 1.0
    sign = "+" if signed else ""
    body = f"{m * k:{sign}.{digits}f}" if pct else f"{m:{sign}.4g}"
    if math.isnan(se):
        return body
    return f"{body} ± {se * k:.{digits}f}" if pct else f"{body} ± {se:.2g}"


def format_table(cs: Mapping[tuple[str, int], Cell]) -> str:
    """Markdown: one row per cell, mean ± SE over seeds (percent points where marked %)."""
    head = ("| regularizer | L | n | Pass@1 before % | Pass@1 after % | Δ vs vanilla % | paired Δ % (n) | P̄max "
            "| invalid mass / step % | P(invalid in seq) % | sampled seqs with invalid % | TRE-P region size "
            "| response length |")
    lines = [head, "|" + "---|" * 13]
    for (label, horizon), cell in cs.items():
        d = delta(cs, label, horizon)
        pd = paired(cs, label, horizon)
        lines.append("| " + " | ".join([
            label, str(horizon), str(len(cell.runs)),
            _pm(*cell.stat("pass_before")[:2]), _pm(*cell.stat("pass_after")[:2]),
            "–" if d is None or label == "none" else _pm(d[0], d[1], signed=True),
            "–" if pd is None or label == "none" else f"{_pm(pd[0], pd[1], signed=True, digits=2)} ({pd[2]})",
            _pm(*cell.stat("policy/p_max")[:2], pct=False),
            _pm(*cell.stat("policy/invalid_mass")[:2], digits=3),
            _pm(*cell.stat("policy/invalid_seq_mass")[:2], digits=2),
            _pm(*cell.stat("train/invalid_seq_rate")[:2], digits=2),
            _pm(*cell.stat("policy/tr_size")[:2], pct=False),
            _pm(*cell.stat("train/response_length")[:2], pct=False),
        ]) + " |")
    return "\n".join(lines)


def _gap(m: float, se: float, n: int) -> str:
    return f"{m * 100:+.2f} ± {se * 100:.2f} points (n = {n})"


def _beyond(m: float, se: float, n: int, sign: int) -> bool:
    """True when sign·m exceeds two standard errors over at least MIN_SEEDS seeds."""
    return n >= MIN_SEEDS and not math.isnan(se) and sign * m > 2 * se


def claims(cs: Mapping[tuple[str, int], Cell], ent: str, tre: str, tre_k: str | None = None) -> list[str]:
    """The verdicts of the issue's four claims (Markdown bullet lines), for the labels ``ent`` and ``tre``."""
    horizons = sorted({h for (_, h) in cs})
    short, long_ = horizons[0], horizons[-1]
    out: list[str] = []
    # (1) tail mass under Ent grows with the horizon and exceeds vanilla's and TRE's
    key = "policy/invalid_mass"
    parts, ok = [], True
    grow = diff(cs.get((ent, long_)), cs.get((ent, short)), key)
    if grow is None:
        ok = False
    else:
        ok &= _beyond(*grow, 1)
        parts.append(f"Ent(L={long_}) − Ent(L={short}) = {_gap(*grow)}")
    for base in [b for b in ("none", tre, tre_k) if b]:
        d = delta(cs, ent, long_, key, base=base)
        if d is None:
            ok = False
            continue
        ok &= _beyond(*d, 1)
        parts.append(f"Ent − {base} at L={long_} = {_gap(*d)}")
    out.append(f"1. Tail mass under {ent} grows with the horizon and exceeds vanilla's and TRE's: "
               f"**{'reproduced' if ok else 'not reproduced'}** ({'; '.join(parts) or 'cells missing'}).")
    # (2) Ent's Δ Pass@1: >= 0 at the shortest horizon, negative at the longest
    d_s, d_l = delta(cs, ent, short), delta(cs, ent, long_)
    if d_s is None or d_l is None:
        out.append(f"2. {ent}: cells missing.")
    else:
        ok2 = not _beyond(*d_s, -1) and _beyond(*d_l, -1)
        out.append(f"2. {ent}'s Δ Pass@1 vs vanilla goes from ≥ 0 at L={short} to negative at L={long_}: "
                   f"**{'reproduced' if ok2 else 'not reproduced'}** (L={short}: {_gap(*d_s)}; "
                   f"L={long_}: {_gap(*d_l)}; '≥ 0' = not below −2 SE, 'negative' = below −2 SE).")
    # (3) TRE-P's Δ stays >= 0
    ds = [(h, delta(cs, tre, h)) for h in horizons]
    ds = [(h, d) for h, d in ds if d is not None]
    ok3 = bool(ds) and all(not _beyond(*d, -1) for _, d in ds)
    positive = [h for h, d in ds if _beyond(*d, 1)]
    out.append(f"3. {tre}'s Δ Pass@1 vs vanilla stays ≥ 0 (never below −2 SE): "
               f"**{'holds' if ok3 else 'fails'}**; significantly > 0 at L ∈ {positive or '∅'} ("
               + "; ".join(f"L={h}: {_gap(*d)}" for h, d in ds) + ").")
    # (4) P̄max(vanilla) ends above P̄max(TRE-P)
    ps = [(h, delta(cs, "none", h, "policy/p_max", base=tre)) for h in horizons]
    ps = [(h, d) for h, d in ps if d is not None]
    ok4 = bool(ps) and all(_beyond(*d, 1) for _, d in ps)
    out.append(f"4. P̄max(vanilla) ends above P̄max({tre}): **{'reproduced' if ok4 else 'not reproduced'}** ("
               + "; ".join(f"L={h}: {d[0]:+.4f} ± {d[1]:.4f} (n = {d[2]})" for h, d in ps) + ").")
    return out


def _errorbar(ax: Any, pts: Sequence[tuple[int, tuple[float, float, int]]], label: str) -> None:
    """Mean ± SE (in %) against the horizon; a nan SE (one seed) draws no bar."""
    ax.errorbar([h for h, _ in pts], [100 * d[0] for _, d in pts],
                yerr=[0.0 if math.isnan(d[1]) else 100 * d[1] for _, d in pts], marker="o", capsize=3, label=label)


def _finish_horizon_plot(fig: Any, ax: Any, horizons: Sequence[int], path: Path) -> Path:
    """Log-scaled horizon ticks, legend, write ``path`` and close the figure."""
    ax.set_xticks(horizons, [str(h) for h in horizons])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plots(cs: Mapping[tuple[str, int], Cell], folder: Path, smoothing: float) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for label, _ in cs))
    horizons = sorted({h for _, h in cs})
    files: dict[str, Path] = {}
    # Figure 1: Δ Pass@1 vs horizon
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label in labels:
        if label == "none":
            continue
        pts = [(h, delta(cs, label, h)) for h in horizons]
        pts = [(h, d) for h, d in pts if d is not None and d[2] >= 2]  # a one-seed cell has no error bar
        if pts:
            _errorbar(ax, pts, label)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set(xscale="log", xlabel="horizon L (answer tokens)", ylabel="Δ Pass@1 vs vanilla (points)",
           title="Δ Pass@1 vs vanilla PPO (mean ± SE over seeds)")
    files["delta"] = _finish_horizon_plot(fig, ax, horizons, folder / "delta_pass1.png")
    # Figure 3: P̄max curves per horizon
    fig, axes = plt.subplots(1, len(horizons), figsize=(4.2 * len(horizons), 3.4), squeeze=False)
    for ax, h in zip(axes[0], horizons, strict=True):
        for label in labels:
            cell = cs.get((label, h))
            if cell is None:
                continue
            curves = [r.curve("policy/p_max") for r in cell.runs]
            steps = sorted(set.intersection(*(set(s) for s, _ in curves))) if curves else []
            if not steps:
                continue
            smooth = [dict(zip(s, ema(v, smoothing), strict=True)) for s, v in curves]
            stats = [mean_se([c[s] for c in smooth]) for s in steps]
            m = [x[0] for x in stats]
            se = [0.0 if math.isnan(x[1]) else x[1] for x in stats]
            ax.plot(steps, m, label=label)
            ax.fill_between(steps, [a - b for a, b in zip(m, se, strict=True)],
                            [a + b for a, b in zip(m, se, strict=True)], alpha=0.2)
        ax.set(xlabel="PPO iteration", ylabel="P̄max", title=f"P̄max, L = {h} (EMA {smoothing})")
    axes[0][0].legend(fontsize=7)
    files["pmax"] = _save(fig, folder / "pmax.png")
    # tail mass vs horizon
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label in labels:
        pts = [(h, cs[(label, h)].stat("policy/invalid_mass")) for h in horizons if (label, h) in cs]
        if pts:
            _errorbar(ax, pts, label)
    ax.set(xscale="log", xlabel="horizon L (answer tokens)", ylabel="mass on invalid tokens per step (%)",
           title="Tail mass at the end of training (mean ± SE)")
    files["tail"] = _finish_horizon_plot(fig, ax, horizons, folder / "tail_mass.png")
    return files


def write_tail_risk_report(paths: Iterable[str | Path], folder: str | Path, smoothing: float = 0.8,
                           ent: str = "ent α=0.001", tre: str = "tre_p α=0.001",
                           tre_k: str | None = "tre_k α=0.001") -> tuple[str, dict[str, Path]]:
    """Write the three figures and ``tail_risk.md`` into ``folder``; return (the Markdown, the files).

    Raises:
        ValueError: no tail-risk run under ``paths``.
    """
    runs = find_tail_runs(paths)
    if not runs:
        raise ValueError(f"no tail-risk runs (repeat task) under {', '.join(map(str, paths))}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cs = cells(runs)
    files = _plots(cs, folder, smoothing)
    text = [f"{len(runs)} runs, {len(cs)} cells; mean ± standard error over seeds (n per row).", "",
            format_table(cs), "", "Claims (a claim holds only beyond 2 SE over ≥ 5 seeds):", ""]
    have = {label for label, _ in cs}
    for e in sorted(label for label in have if label.startswith("ent")):
        t = e.replace("ent", "tre_p", 1)
        if t in have:
            text += [f"With {e} and {t}:", "", *claims(cs, e, t, tre_k if e == ent and tre_k in have else None), ""]
    md = "\n".join(text)
    files["table"] = folder / "tail_risk.md"
    files["table"].write_text(md + "\n")
    return md, files


def tail_risk_main(paths: Sequence[Path], folder: Path, smoothing: float) -> int:
    """``tre-plot --tail-risk``: write the report, print it; 0, or 1 when no tail-risk run is found."""
    import sys

    try:
        md, files = write_tail_risk_report(paths, folder, smoothing)
    except ValueError as err:
        print(f"tre-plot: {err}", file=sys.stderr)
        return 1
    print(md)
    print("\n" + "\n".join(f"{k}: {v}" for k, v in files.items()))
    return 0
