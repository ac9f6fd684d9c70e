"""Cost and effect of RewardGuard's isolation: worker process vs worker thread vs a plain call.

    python benchmarks/reward_guard.py --json OUT.json
    python benchmarks/reward_guard.py --batch 64 --chars 400 --rounds 30

One run, three guards side by side on the same task and inputs:

* ``direct``: ``timeout=None``, ``task.score`` called in the caller's thread;
* ``thread``: ``isolation="thread"`` (a worker thread per call);
* ``process``: ``isolation="process"`` (a persistent worker process).

Measured, in interleaved rounds (after one untimed warm-up call each):

* per-call time of a cheap reward (``len``-based, so the guard's own cost
  dominates) and of the Countdown grader, for ``--batch`` responses of
  ``--chars`` characters; the medians and the ratios ``process/thread``,
  ``thread/direct``, ``process/direct``;
* the worker process's start-up (``guard.start()``: a fresh interpreter that
  imports the task's module and loads the task), in seconds and as a multiple
  of one process-mode call;
* the effect (``--gil``): a regex that holds the GIL for about ``--gil-seconds``
  scored with ``timeout`` = a fifth of that. ``elapsed/timeout`` and the
  counters say whether the limit held: in the thread the call returns only
  when the regex ends and counts as a success; in the process it is cut at
  the limit and counts as a time-out.

State the machine and its load next to the numbers: they are ratios of one
run, not absolute guarantees.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any


class LenTask:
    """Reward = characters / 100: the cheapest possible reward, so what is measured is the guard."""

    name = "len"
    binary_reward = False

    def score(self, examples: Any, responses: Any) -> list[float]:
        return [len(r) / 100 for r in responses]


class RegexTask:
    """Runs a backtracking regex whose C matcher holds the GIL for ``2**n`` steps on every call."""

    name = "regex"
    binary_reward = False

    def __init__(self, n: int) -> None:
        self.n = n

    def score(self, examples: Any, responses: Any) -> list[float]:
        re.match(r"(a+)+$", "a" * self.n + "!")
        return [1.0] * len(responses)


def _this_module() -> Any:
    """This file as an importable module (a class of ``__main__`` cannot be loaded by a worker process)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return importlib.import_module(Path(__file__).stem)


def _guards(task: Any, timeout: float) -> dict[str, Any]:
    from tre_lightning.tasks.guard import RewardGuard

    return {
        "direct": RewardGuard(task, timeout=None, name="direct"),
        "thread": RewardGuard(task, timeout=timeout, name="thread", isolation="thread"),
        "process": RewardGuard(task, timeout=timeout, name="process", isolation="process"),
    }


def per_call(task: Any, examples: list[Any], responses: list[str], rounds: int) -> dict[str, Any]:
    guards = _guards(task, timeout=600.0)
    start = time.perf_counter()
    guards["process"].start()
    startup_s = time.perf_counter() - start
    times: dict[str, list[float]] = {k: [] for k in guards}
    for guard in guards.values():
        assert guard.score(examples, responses).failures == 0  # warm-up, untimed
    for _ in range(rounds):
        for key, guard in guards.items():
            t0 = time.perf_counter()
            report = guard.score(examples, responses)
            times[key].append(time.perf_counter() - t0)
            assert report.failures == 0, report.messages
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "median_s": med,
        "process_over_thread": med["process"] / med["thread"],
        "thread_over_direct": med["thread"] / med["direct"],
        "process_over_direct": med["process"] / med["direct"],
        "startup_s": startup_s,
        "startup_over_process_call": startup_s / med["process"],
        "worker_restarts": guards["process"].worker_restarts,
    }
    for guard in guards.values():
        guard.close()
    return out


def gil_effect(module: Any, seconds: float) -> dict[str, Any]:
    n = 10
    while True:  # calibrate in this process: the regex's duration doubles with each 'a'
        t0 = time.perf_counter()
        module.RegexTask(n).score([{}], ["x"])
        took = time.perf_counter() - t0
        if took >= seconds / 2 or n > 40:
            break
        n += 1
    task = module.RegexTask(n)
    timeout = took / 5
    out: dict[str, Any] = {"regex_seconds": took, "timeout_s": timeout}
    for key in ("thread", "process"):
        from tre_lightning.tasks.guard import RewardGuard

        with RewardGuard(task, timeout=timeout, isolation=key) as guard:
            guard.start()
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                report = guard.score([{}], ["x"])
                elapsed = time.perf_counter() - t0
            out[key] = {"elapsed_over_timeout": elapsed / timeout, "timeouts": report.timeouts,
                        "rewards": report.rewards}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chars", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--gil-seconds", type=float, default=2.0)
    parser.add_argument("--no-gil", action="store_true", help="skip the regex demonstration")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()

    from tre_lightning.tasks import CountdownTask

    module = _this_module()
    responses = [("<answer>(3 + 4) * 2</answer> " * 40)[: args.chars] for _ in range(args.batch)]
    countdown = CountdownTask(train_size=args.batch, val_size=4)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "python": sys.version.split()[0]},
        "batch": args.batch,
        "chars": args.chars,
        "len_reward": per_call(module.LenTask(), [{}] * args.batch, responses, args.rounds),
        "countdown_grader": per_call(countdown, list(countdown.train_examples())[: args.batch], responses,
                                     args.rounds),
    }
    if not args.no_gil:
        results["gil_holding_regex"] = gil_effect(module, args.gil_seconds)
    results["machine"]["loadavg_1m_after"] = os.getloadavg()[0]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
