"""Where the quickstart's time goes: ``tre-train`` with a phase timer, in CPU seconds and wall seconds.

    python benchmarks/quickstart_phases.py --workdir outputs/qs_phases     # cached warm start if present
    python benchmarks/quickstart_phases.py --json phases.json seed=1

Runs ``tre-train`` (the quickstart defaults) in a subprocess with one extra
callback, :class:`PhaseTimer` (``+callbacks.phase_timer``), that reads the
process's CPU time (``time.process_time``: every thread of the process; the
reward guard's worker process is not counted) and the wall clock at the
boundaries of: interpreter start-up + imports + config (until the callback is
built), model build (the warm start: trained, or loaded from its cache) until
the first validation, each validation, each PPO iteration (split into rollout
and update by the module's ``perf/rollout_s`` and ``perf/train_s``), the rest
of the fit (checkpoints, logging), and the end (report, plots, export) until the
process exits. On a loaded machine the CPU seconds are what one free core would
take; the wall seconds show the load. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_START_WALL = float(os.environ.get("TRE_PHASES_T0", time.time()))


def __getattr__(name: str) -> Any:
    """``PhaseTimer`` is built on first use, so that the launcher does not import Lightning."""
    if name == "PhaseTimer":
        return _phase_timer_class()
    raise AttributeError(name)


def _phase_timer_class() -> type:
    import lightning as L

    return type("PhaseTimer", (_PhaseTimerHooks, L.Callback), {})


class _PhaseTimerHooks:
    """Records (phase, cpu_s, wall_s) at Lightning hook boundaries; writes ``path`` at exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.marks: list[tuple[str, float, float]] = [("start", 0.0, _START_WALL)]
        self.iterations: list[dict[str, float]] = []
        self._mark("config")
        atexit.register(self._write)

    def _mark(self, name: str) -> None:
        self.marks.append((name, time.process_time(), time.time()))

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._mark("before_validation")

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._mark("validation")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._mark("between_iterations")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._mark("iteration")
        m = outputs["metrics"]
        self.iterations.append({"rollout_s": float(m["perf/rollout_s"]), "update_s": float(m["perf/train_s"])})

    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._mark("fit_end")

    def _write(self) -> None:
        self._mark("exit")
        Path(self.path).write_text(json.dumps({"marks": self.marks, "iterations": self.iterations}))


def _phases(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Sum the intervals between marks per phase name (the name of the mark that ends it)."""
    names = {"config": "start-up, imports, config", "before_validation": "model build (warm start) and setup",
             "validation": "validation (8 samples x eval prompts)", "between_iterations": "between iterations",
             "iteration": "PPO iterations", "fit_end": "end of fit (last checkpoint)",
             "exit": "report, plots, export, exit"}
    out: dict[str, dict[str, float]] = {}
    marks = raw["marks"]
    seen_validation = False
    for (_, c0, w0), (name, c1, w1) in zip(marks, marks[1:]):
        label = names[name]
        if name == "before_validation" and seen_validation:
            label = names["between_iterations"]
        seen_validation |= name == "validation"
        row = out.setdefault(label, {"cpu_s": 0.0, "wall_s": 0.0, "count": 0})
        row["cpu_s"] += c1 - c0
        row["wall_s"] += w1 - w0
        row["count"] += 1
    it = raw["iterations"]
    if it:
        out["  of which rollout (perf/rollout_s, wall)"] = {"cpu_s": float("nan"), "wall_s": sum(i["rollout_s"] for i in it), "count": len(it)}
        out["  of which update (perf/train_s, wall)"] = {"cpu_s": float("nan"), "wall_s": sum(i["update_s"] for i in it), "count": len(it)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("outputs/quickstart_phases"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    raw_path = work / "phases_raw.json"
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "TRE_LIGHTNING_CACHE": os.environ.get("TRE_LIGHTNING_CACHE", str(work / "cache")),
           "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", ""), "TRE_PHASES_T0": repr(time.time())}
    cmd = [sys.executable, "-m", "tre_lightning.cli.train", f"hydra.run.dir={run_dir}",
           "trainer.enable_progress_bar=false", "+callbacks.phase_timer._target_=quickstart_phases.PhaseTimer",
           f"+callbacks.phase_timer.path={raw_path}", *args.overrides]
    load0 = os.getloadavg()
    with open(work / "run.log", "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0 or not raw_path.is_file():
        print(f"tre-train failed (exit {rc}); see {work / 'run.log'}")
        return 1
    phases = _phases(json.loads(raw_path.read_text()))
    total = {"cpu_s": sum(v["cpu_s"] for k, v in phases.items() if not k.startswith(" ")),
             "wall_s": sum(v["wall_s"] for k, v in phases.items() if not k.startswith(" "))}
    print(f"\ntre-train phases (load average {load0[0]:.1f} -> {os.getloadavg()[0]:.1f})\n")
    print("| phase | count | CPU s | share of CPU | wall s |")
    print("|---|---|---|---|---|")
    for k, v in phases.items():
        share = f"{100 * v['cpu_s'] / total['cpu_s']:.0f} %" if v["cpu_s"] == v["cpu_s"] else ""
        cpu = f"{v['cpu_s']:.1f}" if v["cpu_s"] == v["cpu_s"] else ""
        print(f"| {k} | {v['count']} | {cpu} | {share} | {v['wall_s']:.1f} |")
    print(f"| total | | {total['cpu_s']:.1f} | 100 % | {total['wall_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"phases": phases, "total": total, "load": [load0, os.getloadavg()]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
