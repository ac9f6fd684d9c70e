"""Time ``tre-train`` (the embedded quickstart, defaults) and check that it learns.

    python benchmarks/quickstart.py                       # 3 seeds, cold cache for the first
    python benchmarks/quickstart.py --seeds 0 1 2 --json OUT.json
    python benchmarks/quickstart.py --sweep               # + the 7 x 3 sweep and tre-plot

Runs the console command ``tre-train seed=S`` once per seed, one after another,
each in its own run folder under ``--workdir``. The first run starts from an
empty warm-start cache (``TRE_LIGHTNING_CACHE`` points into the work folder), so
its time includes the supervised warm start; the others reuse the cache, as
a user's second run would. For every run it records the wall time, the CPU
time of the process tree (``getrusage`` of the children: on an otherwise idle
machine with one busy core this is what the wall time would be), the load
average when it ended, and Pass@1 before and after PPO from the run's
``report/summary.json``.

Targets (issue 4): the cold run finishes in <= 300 s on a 2-core CPU machine;
on every seed, validation Pass@1 after PPO >= Pass@1 before + 10 points; the
sweep (``--sweep``) finishes in <= 45 min. The script prints PASS / MISS for
each and exits with 1 when a target is missed. On a shared machine the wall
times are pessimistic: the load average is printed next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

QUICKSTART_WALL_S = 300.0
SWEEP_WALL_S = 45 * 60.0
MIN_GAIN = 0.10


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def _run(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    cpu0, t0 = _children_cpu(), time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    return {
        "cmd": " ".join(cmd),
        "returncode": proc.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(_children_cpu() - cpu0, 1),
        "load_after": _loadavg(),
        "log": str(log),
    }


def _tre_train() -> list[str]:
    exe = shutil.which("tre-train")
    return [exe] if exe else [sys.executable, "-m", "tre_lightning.cli.train"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("outputs/benchmark_quickstart"),
                        help="run folders, logs and the warm-start cache (default: outputs/benchmark_quickstart)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep an existing warm-start cache in the work folder (default: start cold)")
    parser.add_argument("--sweep", action="store_true", help="also time `tre-train -m experiment=quickstart_sweep`")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)

    work = args.workdir.resolve()
    cache = work / "cache"
    if cache.exists() and not args.warm_cache:
        shutil.rmtree(cache)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TRE_LIGHTNING_CACHE": str(cache)}
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_before": _loadavg()},
        "runs": [],
    }
    ok = True
    for i, seed in enumerate(args.seeds):
        run_dir = work / f"seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [*_tre_train(), f"seed={seed}", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
               *args.overrides]
        rec = _run(cmd, env, work / f"seed{seed}.log")
        rec["seed"] = seed
        rec["cold_cache"] = i == 0 and not args.warm_cache
        summary_path = run_dir / "report" / "summary.json"
        if rec["returncode"] == 0 and summary_path.is_file():
            s = json.loads(summary_path.read_text())
            rec.update(before=s["before"], after=s["after"], final_p_max=s["final_p_max"])
        results["runs"].append(rec)
        gain = (rec["after"] - rec["before"]) if rec.get("after") is not None else None
        print(f"seed {seed}: {'cold' if rec['cold_cache'] else 'warm'} cache  wall {rec['wall_s']:6.1f}s  "
              f"cpu {rec['cpu_s']:6.1f}s  load {rec['load_after']}  "
              + (f"Pass@1 {100 * rec['before']:.1f}% -> {100 * rec['after']:.1f}% ({100 * gain:+.1f})"
                 if gain is not None else f"FAILED (exit {rec['returncode']}, see {rec['log']})"), flush=True)

    print("\ntargets")
    cold = [r for r in results["runs"] if r["cold_cache"]]
    if cold:
        r = cold[0]
        hit = r["returncode"] == 0 and r["wall_s"] <= QUICKSTART_WALL_S
        ok &= hit
        print(f"  {'PASS' if hit else 'MISS'}  tre-train (cold cache) <= {QUICKSTART_WALL_S:.0f}s: wall {r['wall_s']}s "
              f"(cpu {r['cpu_s']}s, load {r['load_after']})")
    for r in results["runs"]:
        hit = r.get("after") is not None and r["after"] - r["before"] >= MIN_GAIN - 1e-12
        ok &= hit
        gain = "n/a" if r.get("after") is None else f"{100 * (r['after'] - r['before']):+.1f} points"
        print(f"  {'PASS' if hit else 'MISS'}  seed {r['seed']}: Pass@1 gain >= +{100 * MIN_GAIN:.0f} points: {gain}")

    if args.sweep:
        sweep_dir = work / "sweep"
        shutil.rmtree(sweep_dir, ignore_errors=True)
        cmd = [*_tre_train(), "-m", "experiment=quickstart_sweep", f"hydra.sweep.dir={sweep_dir}",
               "trainer.enable_progress_bar=false", *args.overrides]
        rec = _run(cmd, env, work / "sweep.log")
        hit = rec["returncode"] == 0 and rec["wall_s"] <= SWEEP_WALL_S
        ok &= hit
        plot = subprocess.run([sys.executable, "-m", "tre_lightning.cli.plot", str(sweep_dir), "--out",
                               str(sweep_dir / "sweep.png")], capture_output=True, text=True, check=False)
        rec["table"] = plot.stdout
        results["sweep"] = rec
        print(f"  {'PASS' if hit else 'MISS'}  sweep <= {SWEEP_WALL_S / 60:.0f} min: wall {rec['wall_s'] / 60:.1f} min "
              f"(cpu {rec['cpu_s'] / 60:.1f} min, load {rec['load_after']})")
        print(plot.stdout)

    results["machine"]["load_after"] = _loadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"results: {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
