"""Run reports: a tidy metrics CSV, a PNG of the curves, the before → after table,
and the sweep overlay / results table of ``tre-plot``.

A run's history has one row per PPO iteration (``step`` = iterations done,
so validation before training is step 0) with the training reward and P̄max,
and, on the iterations where validation ran, the validation score (Pass@1
for binary tasks, mean reward otherwise). The module writes nothing here: the
:class:`~tre_lightning.callbacks.RunReport` callback records the history
during ``fit`` and calls :func:`write_run_report`; ``tre-plot`` reads the
saved CSVs of many runs with :func:`load_run` and overlays them with
:func:`plot_sweep`.

Plots use matplotlib's object API with the Agg canvas: no pyplot, so
importing this module never changes the backend of a notebook.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COLUMNS",
    "RunHistory",
    "RunSummary",
    "ema",
    "format_run_table",
    "format_sweep_table",
    "load_run",
    "plot_run",
    "plot_sweep",
    "summarize",
    "write_run_report",
]

COLUMNS = ("step", "reward", "p_max", "entropy", "val_score")
"""Columns of the tidy CSV. ``val_score`` is Pass@1 (binary tasks) or the mean
validation reward; empty where no validation ran."""

REPORT_DIR = "report"
METRICS_FILE = "metrics.csv"
PLOT_FILE = "curves.png"
SUMMARY_FILE = "summary.json"

# Figure 3 of the paper uses an exponential smoothing factor of 0.8
PAPER_SMOOTHING = 0.8


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


@dataclass
class RunHistory:
    """What one run logged, step by step.

    Attributes:
        train: ``{step: {"reward": .., "p_max": .., "entropy": ..}}`` per PPO iteration.
        val: ``{step: score}``: Pass@1 (or mean reward) at each validation.
        val_metric: the name of the validation metric (``val/pass@1``, ``val/reward``).
        meta: free-form facts (task, regularizers, seed, evaluation protocol).
    """

    train: dict[int, dict[str, float]] = field(default_factory=dict)
    val: dict[int, float] = field(default_factory=dict)
    val_metric: str = "val/pass@1"
    meta: dict[str, Any] = field(default_factory=dict)

    def add_train(self, step: int, **values: float | None) -> None:
        row = self.train.setdefault(int(step), {})
        row.update({k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))})

    def add_val(self, step: int, score: float) -> None:
        self.val[int(step)] = float(score)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a training column, in step order."""
        steps = sorted(s for s, row in self.train.items() if key in row)
        return steps, [self.train[s][key] for s in steps]

    def val_series(self) -> tuple[list[int], list[float]]:
        steps = sorted(self.val)
        return steps, [self.val[s] for s in steps]

    def rows(self) -> list[dict[str, Any]]:
        """The tidy table: one row per step seen in training or validation."""
        out = []
        for step in sorted(set(self.train) | set(self.val)):
            row = self.train.get(step, {})
            out.append({
                "step": step,
                "reward": row.get("reward"),
                "p_max": row.get("p_max"),
                "entropy": row.get("entropy"),
                "val_score": self.val.get(step),
            })
        return out

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
            writer.writeheader()
            for row in self.rows():
                writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
        return path

    @classmethod
    def read_csv(cls, path: str | Path, val_metric: str = "val/pass@1") -> RunHistory:
        """Read a CSV written by :meth:`write_csv`."""
        hist = cls(val_metric=val_metric)
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                step = int(float(row["step"]))
                hist.add_train(step, reward=_float(row.get("reward")), p_max=_float(row.get("p_max")),
                               entropy=_float(row.get("entropy")))
                if not hist.train.get(step):
                    hist.train.pop(step, None)
                score = _float(row.get("val_score"))
                if score is not None:
                    hist.add_val(step, score)
        return hist

    @classmethod
    def from_lightning_csv(cls, path: str | Path) -> RunHistory:
        """Read the long-format ``metrics.csv`` of Lightning's CSVLogger (any run of
        ``tre-train``). Its ``step`` column is the logger's step: training rows of
        iteration k (1-based) carry k - 1, and so do validations after k
        iterations; validations logged before any training carry 0."""
        hist = cls()
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        val_key = "val/pass@1" if rows and "val/pass@1" in rows[0] else "val/reward"
        hist.val_metric = val_key
        trained = any(_float(r.get("reward/mean")) is not None for r in rows)
        first_train_seen = False
        for row in rows:
            step = _float(row.get("step"))
            if step is None:
                continue
            reward = _float(row.get("reward/mean"))
            if reward is not None:
                first_train_seen = True
                hist.add_train(int(step) + 1, reward=reward, p_max=_float(row.get("policy/p_max")),
                               entropy=_float(row.get("policy/entropy")))
            score = _float(row.get(val_key))
            if score is not None:
                before = not first_train_seen and trained
                hist.add_val(0 if before else int(step) + 1, score)
        return hist


@dataclass
class RunSummary:
    """The numbers of the before → after table of one run."""

    before: float | None
    after: float | None
    after_step: int | None
    final_p_max: float | None
    first_p_max: float | None
    final_reward: float | None
    first_reward: float | None
    steps: int

    @property
    def delta(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before,
            "after": self.after,
            "after_step": self.after_step,
            "delta": self.delta,
            "final_p_max": self.final_p_max,
            "first_p_max": self.first_p_max,
            "final_reward": self.final_reward,
            "first_reward": self.first_reward,
            "steps": self.steps,
        }


def _window_mean(values: Sequence[float], window: int, last: bool) -> float | None:
    if not values:
        return None
    chunk = values[-window:] if last else values[:window]
    return sum(chunk) / len(chunk)


def summarize(hist: RunHistory, window: int = 10) -> RunSummary:
    """Before = the validation at step 0 (None if there was none); after = the last
    validation; P̄max and reward = means over the first / last ``window`` iterations
    (single iterations are noisy)."""
    vsteps, vals = hist.val_series()
    before = hist.val[0] if 0 in hist.val else None
    after_step = vsteps[-1] if vsteps and vsteps[-1] > 0 else None
    after = hist.val[after_step] if after_step is not None else None
    _, p_max = hist.series("p_max")
    _, reward = hist.series("reward")
    return RunSummary(
        before=before,
        after=after,
        after_step=after_step,
        final_p_max=_window_mean(p_max, window, last=True),
        first_p_max=_window_mean(p_max, window, last=False),
        final_reward=_window_mean(reward, window, last=True),
        first_reward=_window_mean(reward, window, last=False),
        steps=max(hist.train) if hist.train else 0,
    )


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Exponential moving average as TensorBoard draws it (``smoothing`` in [0, 1))."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out: list[float] = []
    last: float | None = None
    for v in values:
        last = v if last is None else smoothing * last + (1 - smoothing) * v
        out.append(last)
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_run_table(summary: RunSummary, hist: RunHistory, files: Mapping[str, Path] | None = None) -> str:
    """The short table printed at the end of a run."""
    binary = hist.val_metric.endswith("pass@1")
    name = "Pass@1" if binary else "val reward"
    meta = hist.meta
    title = "run report"
    if meta:
        bits = [f"{k} {meta[k]}" for k in ("task", "regularizers", "seed") if k in meta]
        title += " (" + ", ".join(bits) + ")"
    protocol = f"  [{meta['eval']}]" if meta.get("eval") else ""

    def score(x: float | None) -> str:
        return _pct(x) if binary else ("n/a" if x is None else f"{x:.4f}")

    delta = summary.delta
    if delta is None:
        change = ""
    elif binary:
        change = f"   ({100 * delta:+.1f} points)"
    else:
        change = f"   ({delta:+.4f})"
    window = "last 10 iterations"
    lines = [
        f"[tre-train] {title}",
        f"  {name:<14} before {score(summary.before):>7}  ->  after {score(summary.after):>7}"
        f"  (step {summary.after_step}){change}{protocol}",
    ]
    if summary.final_p_max is not None:
        lines.append(f"  {'final P̄max':<14} {summary.final_p_max:.3f}  ({window}; first 10: "
                     f"{summary.first_p_max:.3f})")
    if summary.final_reward is not None:
        lines.append(f"  {'train reward':<14} {summary.first_reward:.3f}  ->  {summary.final_reward:.3f}"
                     f"  (first / last 10 iterations)")
    for label, path in (files or {}).items():
        lines.append(f"  {label + ':':<14} {path}")
    return "\n".join(lines)


def _new_figure(ncols: int, width: float = 4.2, height: float = 3.2) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def plot_run(hist: RunHistory, path: str | Path, smoothing: float = 0.6, title: str | None = None) -> Path:
    """PNG with three panels against PPO iterations: training reward, validation
    Pass@1 (or reward), P̄max. Raw curves faint, EMA-smoothed curves solid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_r, ax_v, ax_p) = _new_figure(3)
    for ax, key, label in ((ax_r, "reward", "train reward (mean)"), (ax_p, "p_max", "P̄max")):
        steps, values = hist.series(key)
        if steps:
            ax.plot(steps, values, color="C0", alpha=0.25, linewidth=1)
            ax.plot(steps, ema(values, smoothing), color="C0", linewidth=2)
        ax.set_title(label)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    vsteps, vals = hist.val_series()
    binary = hist.val_metric.endswith("pass@1")
    if vsteps:
        shown = [100 * v for v in vals] if binary else vals
        ax_v.plot(vsteps, shown, marker="o", color="C1", linewidth=2)
    ax_v.set_title("validation Pass@1 (%)" if binary else "validation reward")
    ax_v.set_xlabel("PPO iteration")
    ax_v.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def write_run_report(hist: RunHistory, folder: str | Path, print_table: bool = True) -> dict[str, Any]:
    """Write ``metrics.csv``, ``curves.png`` and ``summary.json`` into ``folder``;
    print the before → after table; return the summary (with the file paths)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(hist)
    csv_path = hist.write_csv(folder / METRICS_FILE)
    title = None
    if hist.meta:
        title = ", ".join(f"{k} {hist.meta[k]}" for k in ("task", "regularizers", "seed") if k in hist.meta)
    png_path = plot_run(hist, folder / PLOT_FILE, title=title)
    out = {**summary.to_dict(), "val_metric": hist.val_metric, "meta": hist.meta,
           "files": {"metrics": str(csv_path), "plot": str(png_path)}}
    (folder / SUMMARY_FILE).write_text(json.dumps(out, indent=2, sort_keys=True, default=str))
    if print_table:
        print(format_run_table(summary, hist, {"metrics CSV": csv_path, "plot": png_path}), flush=True)
    return out


# ------------------------------------------------------------------ sweeps


@dataclass
class LoadedRun:
    """One run folder read back: its history, label (regularizers) and seed."""

    folder: Path
    history: RunHistory
    label: str
    seed: int | None


def _hydra_facts(folder: Path) -> tuple[str | None, int | None]:
    """(regularizer label, seed) from the run's ``.hydra/config.yaml``, if any."""
    cfg_path = folder / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        return None, None
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(cfg_path)
    except Exception:  # noqa: BLE001 - an unreadable config just gives no label
        return None, None
    regs = cfg.get("regularizers") or {}
    label = "+".join(sorted(str(k) for k in regs.keys())) or "none"
    seed = cfg.get("seed")
    return label, (int(seed) if seed is not None else None)


def load_run(folder: str | Path) -> LoadedRun | None:
    """Read a run folder written by ``tre-train``: ``report/metrics.csv`` (RunReport)
    or else ``csv/metrics.csv`` (CSVLogger). None when neither exists."""
    folder = Path(folder)
    tidy = folder / REPORT_DIR / METRICS_FILE
    summary_path = folder / REPORT_DIR / SUMMARY_FILE
    meta: dict[str, Any] = {}
    val_metric = "val/pass@1"
    if summary_path.is_file():
        try:
            saved = json.loads(summary_path.read_text())
            meta = dict(saved.get("meta") or {})
            val_metric = saved.get("val_metric", val_metric)
        except (OSError, ValueError):
            pass
    if tidy.is_file():
        hist = RunHistory.read_csv(tidy, val_metric=val_metric)
    else:
        raw = folder / "csv" / "metrics.csv"
        if not raw.is_file():
            return None
        hist = RunHistory.from_lightning_csv(raw)
    hist.meta = meta
    label, seed = _hydra_facts(folder)
    if label is None:
        label = str(meta.get("regularizers", folder.name))
    if seed is None and meta.get("seed") is not None:
        seed = int(meta["seed"])
    return LoadedRun(folder=folder, history=hist, label=label, seed=seed)


def find_runs(paths: Iterable[str | Path]) -> list[LoadedRun]:
    """Every run folder at or below ``paths`` (a run, a sweep folder, or a parent)."""
    seen: set[Path] = set()
    runs: list[LoadedRun] = []
    for p in paths:
        p = Path(p)
        candidates = [p] if (p / REPORT_DIR).is_dir() or (p / "csv").is_dir() else []
        if not candidates:
            candidates = sorted({m.parent.parent for m in p.glob("**/csv/metrics.csv")}
                                | {m.parent.parent for m in p.glob(f"**/{REPORT_DIR}/{METRICS_FILE}")})
        for c in candidates:
            c = c.resolve()
            if c in seen:
                continue
            seen.add(c)
            run = load_run(c)
            if run is not None:
                runs.append(run)
    return runs


def _mean_std(xs: Sequence[float]) -> tuple[float, float] | None:
    if not xs:
        return None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# the paper's order (Table 1): baselines first, then TRE
LABEL_ORDER = ("none", "ent", "forking", "kl_cov", "clip_cov", "min_ent", "tre_k", "tre_p")


def _order(labels: Iterable[str]) -> list[str]:
    rank = {k: i for i, k in enumerate(LABEL_ORDER)}
    return sorted(set(labels), key=lambda s: (rank.get(s, len(rank)), s))


def group_runs(runs: Sequence[LoadedRun]) -> dict[str, list[LoadedRun]]:
    groups: dict[str, list[LoadedRun]] = {}
    for label in _order(r.label for r in runs):
        groups[label] = sorted((r for r in runs if r.label == label), key=lambda r: (r.seed is None, r.seed))
    return groups


def sweep_rows(runs: Sequence[LoadedRun]) -> list[dict[str, Any]]:
    """One row per regularizer: mean and std over its runs (seeds)."""
    rows = []
    for label, group in group_runs(runs).items():
        sums = [summarize(r.history) for r in group]

        def col(attr: str, sums: list[RunSummary] = sums) -> tuple[float, float] | None:
            return _mean_std([getattr(s, attr) for s in sums if getattr(s, attr) is not None])

        rows.append({
            "regularizer": label,
            "runs": len(group),
            "seeds": [r.seed for r in group],
            "before": col("before"),
            "after": col("after"),
            "delta": _mean_std([s.delta for s in sums if s.delta is not None]),
            "final_p_max": col("final_p_max"),
            "final_reward": col("final_reward"),
            "binary": all(r.history.val_metric.endswith("pass@1") for r in group),
        })
    return rows


def format_sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`sweep_rows` (mean ± std over seeds)."""

    def ms(v: tuple[float, float] | None, pct: bool, signed: bool = False) -> str:
        if v is None:
            return "n/a"
        m, s = v
        if pct:
            return f"{100 * m:{'+' if signed else ''}.1f} ± {100 * s:.1f}"
        return f"{m:{'+' if signed else ''}.3f} ± {s:.3f}"

    binary = all(r["binary"] for r in rows)
    unit = "Pass@1 (%)" if binary else "val reward"
    header = (f"| regularizer | runs | {unit} before | {unit} after | Δ | final P̄max | final train reward |\n"
              "|---|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r['regularizer']} | {r['runs']} | {ms(r['before'], binary)} | {ms(r['after'], binary)} | "
            f"{ms(r['delta'], binary, signed=True)} | {ms(r['final_p_max'], False)} | "
            f"{ms(r['final_reward'], False)} |"
        )
    return "\n".join(lines)


def _mean_curve(series: Sequence[tuple[list[int], list[float]]]) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over runs at the steps every run has."""
    if not series:
        return [], [], []
    common = set(series[0][0])
    for steps, _ in series[1:]:
        common &= set(steps)
    steps = sorted(common)
    lookups = [dict(zip(s, v, strict=True)) for s, v in series]
    mean, std = [], []
    for st in steps:
        xs = [lk[st] for lk in lookups]
        mean.append(statistics.fmean(xs))
        std.append(statistics.stdev(xs) if len(xs) > 1 else 0.0)
    return steps, mean, std


def plot_sweep(
    runs: Sequence[LoadedRun],
    path: str | Path,
    smoothing: float = PAPER_SMOOTHING,
    title: str | None = None,
    show_reward: bool = True,
) -> Path:
    """Overlay the runs, one colour per regularizer (mean over seeds, ± std band):
    P̄max (EMA-smoothed as in the paper's Figure 3), validation Pass@1 and,
    optionally, the training reward."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncols = 3 if show_reward else 2
    fig, axes = _new_figure(ncols, width=4.6, height=3.6)
    ax_p, ax_v = axes[0], axes[1]
    groups = group_runs(runs)
    binary = all(r.history.val_metric.endswith("pass@1") for r in runs)
    for i, (label, group) in enumerate(groups.items()):
        color = f"C{i % 10}"
        n = len(group)
        # P̄max: smooth each run, then mean ± std
        sm = []
        for r in group:
            st, v = r.history.series("p_max")
            sm.append((st, ema(v, smoothing)) if st else (st, v))
        steps, mean, std = _mean_curve(sm)
        if steps:
            ax_p.plot(steps, mean, color=color, linewidth=2, label=f"{label} (n={n})")
            ax_p.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                              [m + s for m, s in zip(mean, std, strict=True)], color=color, alpha=0.15)
        steps, mean, std = _mean_curve([r.history.val_series() for r in group])
        if steps:
            scale = 100.0 if binary else 1.0
            ax_v.errorbar(steps, [scale * m for m in mean], yerr=[scale * s for s in std], color=color,
                          marker="o", markersize=3, linewidth=2, capsize=2, label=label)
        if show_reward:
            sm = []
            for r in group:
                st, v = r.history.series("reward")
                sm.append((st, ema(v, smoothing)) if st else (st, v))
            steps, mean, _ = _mean_curve(sm)
            if steps:
                axes[2].plot(steps, mean, color=color, linewidth=2, label=label)
    ax_p.set_title(f"P̄max (EMA {smoothing:g}; mean ± std over seeds)")
    ax_v.set_title("validation Pass@1 (%)" if binary else "validation reward")
    if show_reward:
        axes[2].set_title(f"train reward (EMA {smoothing:g})")
    for ax in axes:
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    ax_p.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path
