"""Time per call of the graders: median and worst case, typical and hostile inputs, in one run.

    python benchmarks/graders.py                   # symbolic check too, when math-verify is installed
    python benchmarks/graders.py --time-limit 0.5 --repeats 3 --json OUT.json
    git archive fd03edf src | tar -x -C /tmp/old && python benchmarks/graders.py --baseline /tmp/old/src

The unit tests assert the mechanisms that bound these times (size limits, the symbolic
check's own time limit and its time-out counter), never the times themselves (issue 15);
the times are measured here. Corpora:

* ``typical``: the generated responses of ``benchmarks/grader_diff.py`` (one seed);
* ``hostile``: the hostile outputs of the unit tests (``tests/tasks/_task_hostile.py``:
  megabyte strings, 100,000 nested braces, ``9^{9^{9}}``, ``__import__``, ...).

For each grader and corpus: calls, median and 99th percentile (of each call's best of
``--repeats`` runs) and worst µs (of all timed runs), each call run once untimed first for
warm-up. The MATH normalisation caches are emptied before every timed run, so each call pays
for normalising both its prediction and its reference (in training the references repeat
and are cached). The symbolic
grader is timed twice on the hostile corpus: "helper ready" (before each call, untimed, the
grader waits until a helper is ready) and "back to back" (its three hangs in a row: the call
after a hang may wait for the replacement helper's start-up, which ``time_limit`` does not
cover; see ``tre_lightning.tasks.timeouts``). Ratios in the same run: the worst symbolic call
over ``time_limit`` in both modes, and the median symbolic call over the median rule-only call
on the same inputs; with ``--baseline``, the median rule-only call of this version over that
of another version, the two timed in alternating rounds. The load average is printed before
and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "tasks"))

from _task_hostile import HOSTILE  # noqa: E402
from grader_diff import MATH_FAMILIES, countdown_cases  # noqa: E402

from tre_lightning.tasks.countdown_grader import CountdownGrader  # noqa: E402
from tre_lightning.tasks import math_grader  # noqa: E402
from tre_lightning.tasks.math_grader import MathGrader, math_verify_available  # noqa: E402


def _times(call: Callable[[], object], repeats: int, before: Callable[[], object] | None) -> list[float]:
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1e6)
    return out


def measure(calls: list[Callable[[], object]], repeats: int,
            before: Callable[[], object] | None = None) -> dict[str, float]:
    """Median (of each call's best of ``repeats``) and worst µs (any timed run) per call.

    Every call runs once untimed first (warm-up: caches, the helper's first request);
    ``before`` runs untimed before each timed run.
    """
    for call in calls:
        call()
    runs = [_times(call, repeats, before) for call in calls]
    best = sorted(min(t) for t in runs)
    return {"calls": len(calls), "median_us": statistics.median(best), "p99_us": best[int(0.99 * (len(best) - 1))],
            "worst_us": max(max(t) for t in runs)}


def _uncached() -> None:
    """Empty the MATH grader's normalisation caches (a version without them: nothing to do)."""
    for name in ("answer_items", "rewrite_items"):
        getattr(getattr(math_grader, name, None), "cache_clear", lambda: None)()


def _load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_with_baseline(src: Path, typical_math: list, typical_countdown: list, repeats: int) -> dict[str, float]:
    """Median µs per rule-only call, this version over the baseline's: at least 5 rounds that
    alternate the two (each round: every call once, uncached); the best round of each."""
    tasks = src / "tre_lightning" / "tasks"
    old_math = _load(tasks / "math_grader.py", "baseline_math_grader").MathGrader(use_math_verify=False)
    old_countdown = _load(tasks / "countdown_grader.py", "baseline_countdown_grader").CountdownGrader()
    new_math, new_countdown = MathGrader(use_math_verify=False), CountdownGrader()
    pairs = {
        "math rules": ([lambda g=g, c=c: g.grade(c[0], c[1]) for c in typical_math] for g in (new_math, old_math)),
        "countdown": ([lambda g=g, c=c: g.grade(c[0], c[1], c[2]) for c in typical_countdown]
                      for g in (new_countdown, old_countdown)),
    }
    out = {}
    for name, (new_calls, old_calls) in pairs.items():
        medians: dict[str, list[float]] = {"new": [], "old": []}
        for _ in range(max(repeats, 5)):
            for key, calls in (("new", new_calls), ("old", old_calls)):
                medians[key].append(measure(calls, 1, _uncached)["median_us"])
        out[f"{name} median, this version / baseline (interleaved)"] = min(medians["new"]) / min(medians["old"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, default=5.0, help="symbolic time limit (s); 5 = the default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-family", type=int, default=10, help="typical responses per family")
    parser.add_argument("--no-symbolic", action="store_true")
    parser.add_argument("--baseline", help="a src folder of another version (e.g. git archive OLD src | tar -x): "
                        "its two grader modules are timed in the same run, interleaved, for ratios")
    parser.add_argument("--json")
    args = parser.parse_args()
    rng = random.Random(0)
    typical_math = [case for make in MATH_FAMILIES.values() for _ in range(args.per_family) for case in make(rng)]
    typical_countdown = [case for _ in range(args.per_family) for cases in countdown_cases(rng).values()
                         for case in cases]
    load_before = os.getloadavg()
    rules = MathGrader(use_math_verify=False)
    countdown = CountdownGrader()
    rows: dict[str, dict[str, float]] = {}
    rows["math rules / typical"] = measure([lambda c=c: rules.grade(c[0], c[1]) for c in typical_math],
                                           args.repeats, _uncached)
    rows["math rules / hostile"] = measure([lambda r=r: rules.grade(r, "42") for r in HOSTILE], args.repeats,
                                           _uncached)
    rows["countdown / typical"] = measure(
        [lambda c=c: countdown.grade(c[0], c[1], c[2]) for c in typical_countdown], args.repeats
    )
    rows["countdown / hostile"] = measure([lambda r=r: countdown.grade(r, [44, 19, 35], 98) for r in HOSTILE],
                                          args.repeats)
    ratios: dict[str, float] = {}
    if args.baseline:
        ratios.update(compare_with_baseline(Path(args.baseline), typical_math, typical_countdown, args.repeats))
    if not args.no_symbolic and math_verify_available():
        symbolic = MathGrader(use_math_verify=True, time_limit=args.time_limit)
        symbolic.start()
        def ready() -> None:  # untimed: wait until a helper is ready (after a hang, its replacement)
            _uncached()
            symbolic.start()

        reaching = [c for c in typical_math if rules.grade(c[0], c[1]) == 0.0]  # these go on to the symbolic step
        runs = {
            "math symbolic / typical (rules said 0), helper ready": (
                [lambda c=c: symbolic.grade(c[0], c[1]) for c in reaching], ready),
            "math symbolic / hostile, helper ready": ([lambda r=r: symbolic.grade(r, "42") for r in HOSTILE], ready),
            "math symbolic / hostile, back to back": ([lambda r=r: symbolic.grade(r, "42") for r in HOSTILE],
                                                      _uncached),
        }
        for name, (calls, before) in runs.items():
            timeouts = symbolic.stats.as_dict()["timeouts"]
            rows[name] = measure(calls, 1, before)
            rows[name]["timeouts"] = symbolic.stats.as_dict()["timeouts"] - timeouts
        rows["math rules / same inputs"] = measure([lambda c=c: rules.grade(c[0], c[1]) for c in reaching],
                                                   args.repeats, _uncached)
        limit_us = args.time_limit * 1e6
        ratios["symbolic worst / time_limit, helper ready"] = max(
            rows["math symbolic / typical (rules said 0), helper ready"]["worst_us"],
            rows["math symbolic / hostile, helper ready"]["worst_us"]) / limit_us
        ratios["symbolic worst / time_limit, back to back (waits for helper start-ups)"] = (
            rows["math symbolic / hostile, back to back"]["worst_us"] / limit_us)
        ratios["symbolic median / rules median (same inputs)"] = (
            rows["math symbolic / typical (rules said 0), helper ready"]["median_us"]
            / rows["math rules / same inputs"]["median_us"])
        symbolic.close()
    out = {
        "rows": rows,
        "ratios": ratios,
        "meta": {"python": sys.version.split()[0], "machine": platform.platform(), "cpus": os.cpu_count(),
                 "load_before": load_before, "load_after": os.getloadavg(), "time_limit": args.time_limit},
    }
    print(f"load average before {load_before[0]:.1f}, after {out['meta']['load_after'][0]:.1f} "
          f"({os.cpu_count()} CPUs)")
    print(f"{'grader / corpus':56} {'calls':>6} {'median µs':>11} {'p99 µs':>11} {'worst µs':>11} {'time-outs':>9}")
    for name, row in rows.items():
        print(f"{name:56} {row['calls']:>6} {row['median_us']:>11.1f} {row['p99_us']:>11.1f} "
              f"{row['worst_us']:>11.1f} {row.get('timeouts', ''):>9}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
