"""Reward scoring that never stops or hangs the run: model text in, finite rewards out.

The PPO module turns sampled token ids into text (:func:`decode_responses`)
and the text into rewards (:class:`RewardGuard`). Both take whatever the
model produced: ids outside the tokenizer's vocabulary, eos or pad anywhere,
empty or full-length responses. Neither executes model text (the graders
parse it with bounded, side-effect-free code, see ``tre_lightning.tasks``).

:class:`RewardGuard` isolates the task's ``score``:

* ``score`` raises: the batch is scored again one response at a time (all of
  it within one more ``timeout``), so only the responses whose own call
  raises get 0 (``errors``);
* ``score`` overruns ``timeout`` seconds (it runs in a worker thread, with
  the caller's CUDA device and gradients off): every
  response of that call gets 0 (``timeouts``); the call is abandoned, the
  run goes on. While ``MAX_ABANDONED`` abandoned calls are still running,
  later batches are not handed to the task at all and score 0 (also
  ``timeouts``), so a task that hangs for good costs one time-out, not a
  growing pile of stuck threads;
* wrong number of rewards: every response of the call gets 0 (``invalid``);
  a reward that is not a finite real number: that response gets 0 (``invalid``).

Every such sample is counted (``failures``) and reported with a warning; the
tasks' own grader counters (``failure_counts()``: checks cut by a grader's
time limit, checks that raised) are reported as deltas next to them.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["MAX_ABANDONED", "RewardGuard", "RewardReport", "decode_responses"]

MAX_ABANDONED = 2
"""Abandoned (timed-out) ``score`` calls that may still be running before new batches skip the task."""


def decode_responses(tokenizer: Any, response_ids: Any, lengths: Any) -> tuple[list[str], int]:
    """Texts of the valid response tokens (special tokens dropped), never raising.

    Ids the tokenizer does not know decode to nothing; a row the tokenizer
    cannot decode at all (e.g. a negative id) becomes ``""``.

    Returns:
        (texts, number of rows that could not be decoded).
    """
    rows = []
    for ids, n in zip(response_ids, lengths, strict=True):
        n = max(0, min(int(n), int(ids.shape[0])))
        rows.append(ids[:n])
    try:
        return list(tokenizer.batch_decode(rows, skip_special_tokens=True)), 0
    except Exception:  # noqa: BLE001 - fall back to row by row
        pass
    texts, failed = [], 0
    for row in rows:
        try:
            texts.append(str(tokenizer.decode(row, skip_special_tokens=True)))
        except Exception:  # noqa: BLE001
            kept = [int(t) for t in row.tolist() if 0 <= int(t) < 2**31 - 1]
            try:
                texts.append(str(tokenizer.decode(kept, skip_special_tokens=True)))
            except Exception:  # noqa: BLE001
                texts.append("")
                failed += 1
    return texts, failed


@dataclass
class RewardReport:
    """Rewards of one ``score`` call and what went wrong in it.

    Attributes:
        rewards: one finite float per response.
        errors: responses scored 0 because ``score`` raised on them.
        timeouts: responses scored 0 because ``score`` overran the time limit
            (or was skipped while earlier calls are still stuck).
        invalid: responses scored 0 because ``score`` returned the wrong
            number of rewards or a non-finite / non-numeric reward.
        grader_timeouts: the task's own checks cut by their time limit (delta
            of ``task.failure_counts()["timeouts"]`` over the call).
        grader_errors: the task's own checks that raised (delta of ``"errors"``).
        messages: short descriptions of the failures (for the warning).
    """

    rewards: list[float]
    errors: int = 0
    timeouts: int = 0
    invalid: int = 0
    grader_timeouts: int = 0
    grader_errors: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        """Responses that got reward 0 because of a failure in the call (not the grader's own 0s)."""
        return self.errors + self.timeouts + self.invalid

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        return {
            f"{prefix}failures": float(self.failures),
            f"{prefix}score_errors": float(self.errors),
            f"{prefix}score_timeouts": float(self.timeouts),
            f"{prefix}invalid": float(self.invalid),
            f"{prefix}grader_timeouts": float(self.grader_timeouts),
            f"{prefix}grader_errors": float(self.grader_errors),
        }


class _Timeout(Exception):
    pass


def _counts(task: Any) -> dict[str, int]:
    fn = getattr(task, "failure_counts", None)
    if not callable(fn):
        return {}
    try:
        return {k: int(v) for k, v in dict(fn()).items()}
    except Exception:  # noqa: BLE001 - a broken counter must not break scoring
        return {}


def _as_reward(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if math.isfinite(out) else None


class RewardGuard:
    """Calls ``task.score`` so that no failure of it stops or hangs training.

    Args:
        task: the task (its ``score(examples, responses) -> list[float]``).
        timeout: seconds one call may take, > 0, or None (called in the
            caller's thread, unbounded).
        name: used in warnings.

    Totals over the guard's life are in :attr:`totals`.
    """

    def __init__(self, task: Any, timeout: float | None = 600.0, name: str = "reward") -> None:
        if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a finite number > 0 or None, got {timeout!r}")
        self.task = task
        self.timeout = None if timeout is None else float(timeout)
        self.name = name
        self._abandoned: list[threading.Thread] = []
        self.totals = {"calls": 0, "errors": 0, "timeouts": 0, "invalid": 0, "grader_timeouts": 0,
                       "grader_errors": 0}

    # ------------------------------------------------------------------ calling

    def _stuck(self) -> int:
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        return len(self._abandoned)

    def _call(self, examples: Sequence[Any], responses: Sequence[str], timeout: float | None = None) -> Any:
        """``task.score`` in a worker thread bounded by ``timeout`` (default: the guard's; raises ``_Timeout``)."""
        timeout = self.timeout if timeout is None else timeout
        if timeout is None:
            with torch.no_grad():
                return self.task.score(examples, responses)
        if self._stuck() >= MAX_ABANDONED:
            raise _Timeout(f"skipped: {MAX_ABANDONED} earlier score calls are still running past the time limit")
        box: dict[str, Any] = {}
        done = threading.Event()
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

        def target() -> None:
            try:
                if device is not None:  # the current CUDA device is per thread: keep the caller's (its rank's)
                    torch.cuda.set_device(device)
                with torch.no_grad():
                    box["value"] = self.task.score(examples, responses)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                box["error"] = err
            finally:
                done.set()

        thread = threading.Thread(target=target, name="tre-reward-score", daemon=True)
        thread.start()
        if not done.wait(max(timeout, 0.0)):
            self._abandoned.append(thread)
            raise _Timeout(f"task.score took longer than {self.timeout:g}s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _checked(self, value: Any, n: int, report: RewardReport) -> list[float]:
        """Rewards from ``score``'s return value; problems are zeros counted as ``invalid``."""
        try:
            items = list(value)
        except TypeError:
            items = None
        if items is None or len(items) != n:
            got = "a non-sequence" if items is None else f"{len(items)} rewards"
            report.invalid += n
            report.messages.append(f"task.score returned {got} for {n} responses")
            return [0.0] * n
        out = []
        bad = 0
        for item in items:
            reward = _as_reward(item)
            if reward is None:
                bad += 1
                reward = 0.0
            out.append(reward)
        if bad:
            report.invalid += bad
            report.messages.append(f"{bad} rewards were not finite numbers")
        return out

    def score(self, examples: Sequence[Any], responses: Sequence[str]) -> RewardReport:
        """Rewards for ``responses`` (one per response, all finite) and what failed."""
        n = len(responses)
        report = RewardReport(rewards=[0.0] * n)
        if n == 0:
            return report
        before = _counts(self.task)
        try:
            report.rewards = self._checked(self._call(examples, responses), n, report)
        except _Timeout as err:
            report.timeouts += n
            report.messages.append(str(err))
        except Exception as err:  # noqa: BLE001 - isolate the responses that fail
            report.messages.append(f"task.score raised {type(err).__name__}: {str(err)[:200]}")
            report.rewards = self._one_by_one(examples, responses, report)
        after = _counts(self.task)
        report.grader_timeouts = max(0, after.get("timeouts", 0) - before.get("timeouts", 0))
        report.grader_errors = max(0, after.get("errors", 0) - before.get("errors", 0))
        self._account(report)
        return report

    def _one_by_one(self, examples: Sequence[Any], responses: Sequence[str], report: RewardReport) -> list[float]:
        """Score each response alone (after the batch call raised); all of it within one more ``timeout``."""
        out = []
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        for i in range(len(responses)):
            try:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise _Timeout(f"scoring the responses one by one took longer than {self.timeout:g}s")
                out.extend(self._checked(self._call([examples[i]], [responses[i]], remaining), 1, report))
            except _Timeout as err:
                remaining = len(responses) - i
                report.timeouts += remaining
                report.messages.append(str(err))
                out.extend([0.0] * remaining)
                break
            except Exception:  # noqa: BLE001
                report.errors += 1
                out.append(0.0)
        return out

    def _account(self, report: RewardReport) -> None:
        t = self.totals
        t["calls"] += 1
        for key in ("errors", "timeouts", "invalid", "grader_timeouts", "grader_errors"):
            t[key] += getattr(report, key)
        if report.failures:
            warnings.warn(
                f"{self.name}: {report.failures} of {len(report.rewards)} responses scored 0 because the reward "
                f"function failed ({report.errors} errors, {report.timeouts} time-outs, {report.invalid} invalid: "
                f"{'; '.join(report.messages[:3])}); {t['errors'] + t['timeouts'] + t['invalid']} so far; "
                "training goes on",
                RuntimeWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ task view

    def as_task(self) -> _GuardedTask:
        """The task with its ``score`` guarded (for code that takes a task, e.g. ``evaluate.score_batch``)."""
        return _GuardedTask(self)


class _GuardedTask:
    """A task whose ``score`` goes through a :class:`RewardGuard`; everything else is the task's."""

    def __init__(self, guard: RewardGuard) -> None:
        self._guard = guard

    def score(self, examples: Sequence[Any], responses: Sequence[str]) -> list[float]:
        return self._guard.score(examples, responses).rewards

    def __getattr__(self, name: str) -> Any:
        return getattr(self._guard.task, name)
