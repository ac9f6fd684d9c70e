"""``tre-plot``: overlay the runs of a sweep and print their results table.

Reads every run folder of ``tre-train`` found under the given paths (a sweep
folder ``multirun/<date>/<time>``, a single run, or a parent of many),
groups the runs by their setting — every override Hydra recorded in the run's
``.hydra/overrides.yaml`` except the seed, so a coefficient or learning-rate sweep
gives one group per value — labels each group by the overrides that differ
between groups, and writes one PNG with, per group, the mean over seeds (± std) of

- P̄max against PPO iterations, smoothed with an EMA of 0.8 as in the paper's Figure 3,
- validation Pass@1 (or mean reward for non-binary tasks),
- the training reward (unless ``--no-reward``),

then prints a Markdown table of Pass@1 before → after, its change and the
final P̄max, as mean ± std over seeds ("(n = 1)" for a single run), and saves it
next to the PNG.

Examples::

    tre-train -m experiment=quickstart_sweep      # 7 regularizers x 3 seeds
    tre-plot                                      # the latest folder under multirun/
    tre-plot multirun/2026-01-01/12-00-00 --out docs/img/sweep.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _latest_sweep(root: Path) -> Path | None:
    """The most recently modified ``<root>/<date>/<time>`` folder, if any."""
    if not root.is_dir():
        return None
    candidates = [p for p in root.glob("*/*") if p.is_dir()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tre-plot",
        description=(
            "Overlay the runs of a tre-train sweep (one colour per setting: every recorded override but the "
            "seed; mean ± std over seeds): "
            "P̄max (EMA-smoothed as in the paper's Figure 3), validation Pass@1 and training reward "
            "against PPO iterations; print and save a results table (Pass@1 before -> after, change, "
            "final P̄max; mean ± std over seeds)."
        ),
        epilog=(
            "Run folders are found at or below PATHS by their report/metrics.csv (RunReport callback) or "
            "csv/metrics.csv (CSV logger); the setting comes from .hydra/overrides.yaml (without it: the "
            "regularizers of .hydra/config.yaml), the seed from .hydra/config.yaml. "
            "Example: tre-train -m experiment=quickstart_sweep && tre-plot"
        ),
    )
    parser.add_argument("paths", nargs="*", type=Path,
                        help="sweep or run folders (default: the latest folder under ./multirun)")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default: <first path>/sweep.png)")
    parser.add_argument("--table", type=Path, default=None,
                        help="Markdown table to write (default: next to the PNG, .md)")
    parser.add_argument("--smoothing", type=float, default=0.8,
                        help="EMA factor for the P̄max and reward curves, in [0, 1) (paper: 0.8)")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--no-reward", action="store_true", help="only the P̄max and Pass@1 panels")
    parser.add_argument("--tail-risk", action="store_true",
                        help="the tail-risk sweep's figures, table and claims instead (docs/tail_risk.md); "
                             "written into --out's folder (default: the first path)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 no runs found)."""
    from tre_lightning.evaluation.report import find_runs, format_sweep_table, plot_sweep, sweep_rows

    args = build_parser().parse_args(argv)
    if not 0.0 <= args.smoothing < 1.0:
        print(f"tre-plot: --smoothing must be in [0, 1), got {args.smoothing}", file=sys.stderr)
        return 2
    paths = list(args.paths)
    if not paths:
        latest = _latest_sweep(Path("multirun"))
        if latest is None:
            print("tre-plot: no paths given and no ./multirun/<date>/<time> folder found", file=sys.stderr)
            return 1
        paths = [latest]
    if args.tail_risk:
        from tre_lightning.evaluation.tail_risk import tail_risk_main

        return tail_risk_main(paths, args.out.parent if args.out is not None else paths[0], args.smoothing)
    runs = find_runs(paths)
    if not runs:
        print(f"tre-plot: no tre-train runs found under {', '.join(map(str, paths))}", file=sys.stderr)
        return 1
    out = args.out if args.out is not None else paths[0] / "sweep.png"
    table_path = args.table if args.table is not None else out.with_suffix(".md")
    rows = sweep_rows(runs)
    table = format_sweep_table(rows)
    plot_sweep(runs, out, smoothing=args.smoothing, title=args.title, show_reward=not args.no_reward)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table + "\n")
    print(f"{len(runs)} runs, {len(rows)} settings (mean ± std over seeds)\n")
    print(table)
    print(f"\nplot:  {out}\ntable: {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
