"""Tasks for the reward-guard tests (no tests here).

They are picklable and this module imports only the standard library, so a
guard's worker process loads them in a fraction of a second. Each task's
``score`` misbehaves on demand (``mode``); the modes that act only on some
responses let one call fail and the next one, in the same worker, succeed.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LETTERS = "abcdefgh"

EVIL = "evil"
"""A response containing this makes ``regex_on_evil`` run a catastrophic-backtracking regex."""


def catastrophic_regex() -> None:
    """``(a+)+$`` against 40 a's and a '!': ~2**40 backtracking steps inside ``re``'s C matcher, which
    holds the GIL the whole time (no other Python thread runs until it ends, in days)."""
    re.match(r"(a+)+$", "a" * 40 + "!")


class Scripted:
    """A task whose ``score`` misbehaves on demand.

    ``calls`` and ``grad_enabled`` record the calls made in *this* process
    (a worker process keeps its own copy of the task); ``release`` ends a
    ``hang`` early (it is not pickled: a worker gets its own).
    """

    name = "scripted"
    binary_reward = False

    def __init__(self, mode: str, marker: str | None = None) -> None:
        self.mode = mode
        self.marker = marker
        self.release = threading.Event()
        self.calls = 0
        self.grad_enabled: list[bool] = []
        self._counts = {"checks": 0, "timeouts": 0, "errors": 0}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["release"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.release = threading.Event()
        if self.mode == "grad":  # as a task whose module imports torch
            import torch  # noqa: F401

    def score(self, examples: Sequence[Any], responses: Sequence[str]) -> Any:
        self.calls += 1
        if "torch" in sys.modules:
            self.grad_enabled.append(sys.modules["torch"].is_grad_enabled())
        boom = any("boom" in r for r in responses)
        if self.mode == "raise_on_boom" and boom:
            raise RuntimeError("grader crashed")
        if self.mode == "exit_on_boom" and boom:
            sys.exit(3)
        if self.mode == "interrupt_on_boom" and boom:
            raise KeyboardInterrupt
        if self.mode == "die_on_boom" and boom:
            os._exit(1)  # the interpreter ends here: no exception, no cleanup
        if self.mode == "raise":
            raise ValueError("always")
        if self.mode == "hang":
            self.release.wait(60)
            return [1.0] * len(responses)
        if self.mode == "regex_on_evil" and any(EVIL in r for r in responses):
            catastrophic_regex()
        if self.mode == "mark_then_sleep" and any("sleep" in r for r in responses):
            assert self.marker is not None
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(600)
        if self.mode == "short":
            return [1.0] * (len(responses) - 1)
        if self.mode == "none":
            return None
        if self.mode == "odd_values":
            import torch

            values = [math.nan, math.inf, -math.inf, None, "abc", torch.tensor(0.5), True, 2]
            return values[: len(responses)]
        if self.mode == "grader_counters":
            self._counts["timeouts"] += 2
            self._counts["errors"] += 1
        if self.mode == "cuda_visible":
            return [float(os.environ.get("CUDA_VISIBLE_DEVICES", "-1"))] * len(responses)
        if self.mode == "pid":
            return [float(os.getpid())] * len(responses)
        if self.mode == "grad":
            import torch

            return [float(torch.is_grad_enabled())] * len(responses)
        return [float(len(r)) for r in responses]

    def failure_counts(self) -> dict[str, int]:
        return {**self._counts, "failures": self._counts["timeouts"] + self._counts["errors"]}


class DeclaresThread(Scripted):
    score_isolation = "thread"


class DeclaresBogus(Scripted):
    score_isolation = "subinterpreter"


class Unpicklable(Scripted):
    """Pickling raises (it holds a lock, as a task holding a live client or a lambda would)."""

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)  # the Event (and its lock) included


class FailsToLoad(Scripted):
    """Pickles, but loading it raises: its worker process cannot start. Each attempt appends a line to
    ``marker`` (when given), so a test can count the start attempts."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("marker"):
            with open(state["marker"], "a") as fh:
                fh.write("attempt\n")
        raise RuntimeError("this task cannot be loaded in another process")


class MiniCharTask:
    """A task for PPOModule, light enough for a worker process, whose every ``score`` call fails as ``mode``
    says: ``regex`` (holds the GIL for days) or ``exit`` (``sys.exit``)."""

    name = "minichar"
    binary_reward = False

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.rows = [{"q": f"say {c}"} for c in LETTERS]

    def train_examples(self) -> Sequence[dict[str, str]]:
        return self.rows

    def val_examples(self) -> Sequence[dict[str, str]]:
        return self.rows[:4]

    def messages(self, example: dict[str, str]) -> list[dict[str, str]]:
        return [{"role": "user", "content": example["q"]}]

    def score(self, examples: Sequence[dict[str, str]], responses: Sequence[str]) -> list[float]:
        if self.mode == "regex":
            catastrophic_regex()
        sys.exit(f"reward function called sys.exit (mode {self.mode!r})")


def descendants(pid: int) -> set[int]:
    """Process ids of every live descendant of ``pid`` (from /proc; zombies excluded)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"
