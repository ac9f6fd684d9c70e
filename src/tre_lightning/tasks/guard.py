"""Reward scoring that never stops or hangs the run: model text in, finite rewards out.

The PPO module turns sampled token ids into text (:func:`decode_responses`)
and the text into rewards (:class:`RewardGuard`). Both take whatever the
model produced: ids outside the tokenizer's vocabulary, eos or pad anywhere,
empty or full-length responses. Neither executes model text (the graders
parse it with bounded, side-effect-free code, see ``tre_lightning.tasks``).

:class:`RewardGuard` isolates the task's ``score``:

* ``score`` raises (any exception, also ``SystemExit`` and
  ``KeyboardInterrupt`` raised by the reward code): the batch is scored again
  one response at a time (all of it within one more ``timeout``), so only the
  responses whose own call raises get 0 (``errors``);
* ``score`` overruns ``timeout`` seconds: every response of that call gets 0
  (``timeouts``) and the run goes on. How far that holds depends on the
  isolation (see :class:`RewardGuard`): in a worker *process* every kind of
  hang is cut off (the process is killed and a warm spare takes over); in a
  worker *thread* only hangs that let Python run other threads are;
* wrong number of rewards: every response of the call gets 0 (``invalid``);
  a reward that is not a finite real number: that response gets 0 (``invalid``).

Every such sample is counted (``failures``) and reported with a warning; the
tasks' own grader counters (``failure_counts()``: checks cut by a grader's
time limit, checks that raised) are read before and after each call where
the call ran (in the worker process, in process isolation) and reported as
deltas next to them.

A real Ctrl-C (SIGINT in the trainer's main thread) still stops the run: the
``KeyboardInterrupt`` it raises while the guard waits is not caught (a busy
worker process is killed first, so no stale answer is read later). Reward
code runs either in another thread (which Python never delivers SIGINT to) or
in a worker process in its own session, so a ``KeyboardInterrupt`` seen
there was raised by the reward code. Only with ``timeout=None`` (called in
the caller's thread) are the two indistinguishable; there it stops the run.

This module imports torch lazily so that a worker process whose task needs
no torch does not load it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tre_lightning.checks import ArgumentError, one_of, optional, real, text

__all__ = ["ISOLATIONS", "MAX_ABANDONED", "Isolation", "RewardGuard", "RewardReport", "decode_responses"]

MAX_ABANDONED = 2
"""Thread isolation: abandoned (timed-out) ``score`` calls that may still be running before new batches skip the task."""

Isolation = Literal["auto", "process", "thread"]
ISOLATIONS: tuple[str, ...] = ("auto", "process", "thread")


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
    """The call overran its time limit (or was skipped while earlier calls are stuck)."""


class _ScoreError(Exception):
    """``task.score`` raised, or its worker process died in the call: retry one response at a time."""


class _StartFailure(Exception):
    """No worker process could be started: the call scores 0 (errors) without a retry."""


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
    torch = sys.modules.get("torch")  # a tensor exists only where torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if math.isfinite(out) else None


def _no_grad() -> Any:
    torch = sys.modules.get("torch")
    return torch.no_grad() if torch is not None else contextlib.nullcontext()


def _describe(err: BaseException) -> str:
    """``Type: message (at file:line in function)`` of the innermost frame."""
    import traceback

    where = ""
    frames = traceback.extract_tb(err.__traceback__)
    if frames:
        last = frames[-1]
        where = f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return f"{type(err).__name__}: {str(err)[:200]}{where}"


class _ScoreCall:
    """``task.score`` as the guard runs it, in whichever thread or process: picklable, JSON result.

    Gradients are off (for a task that imports torch only inside ``score``,
    in a worker process from its second call on). The task's counters are
    read before and after the call, where the scoring runs. The rewards come
    back as floats, ``None`` for a value that is not a finite number, or
    ``None`` instead of the list when ``score`` did not return a sequence.
    Every exception, ``SystemExit`` and ``KeyboardInterrupt`` included,
    becomes ``{"error": ...}``, except a ``KeyboardInterrupt`` when
    ``in_caller_thread`` (where it may be a real Ctrl-C).
    """

    def __init__(self, task: Any, in_caller_thread: bool = False) -> None:
        self.task = task
        self.in_caller_thread = in_caller_thread

    def __call__(self, examples: Sequence[Any], responses: Sequence[str]) -> dict[str, Any]:
        before = _counts(self.task)
        out: dict[str, Any]
        try:
            with _no_grad():
                value = self.task.score(examples, responses)
                try:
                    items = list(value)
                except TypeError:
                    out = {"rewards": None}
                else:
                    out = {"rewards": [_as_reward(item) for item in items]}
        except KeyboardInterrupt as err:
            if self.in_caller_thread:
                raise
            out = {"error": _describe(err)}
        except BaseException as err:  # noqa: BLE001 - SystemExit and friends are scoring errors too
            out = {"error": _describe(err)}
        torch = sys.modules.get("torch")
        if not self.in_caller_thread and torch is not None and torch.is_grad_enabled():
            torch.set_grad_enabled(False)  # torch came with this call; off from now on in the guard's own thread
        after = _counts(self.task)
        out["grader_timeouts"] = max(0, after.get("timeouts", 0) - before.get("timeouts", 0))
        out["grader_errors"] = max(0, after.get("errors", 0) - before.get("errors", 0))
        return out


def _cuda_env() -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` naming the caller's current GPU (when CUDA is in use), for a worker process.

    A fresh process's default device is GPU 0: without this every rank's
    worker would score on the same GPU.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    index = torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible is not None else None
    return {"CUDA_VISIBLE_DEVICES": ids[index] if ids is not None and index < len(ids) else str(index)}


class RewardGuard:
    """Calls ``task.score`` so that no failure of it stops or hangs training.

    Args:
        task: the task (its ``score(examples, responses) -> list[float]``).
        timeout: seconds one call may take, > 0, or None (called in the
            caller's thread, unbounded, whatever the isolation).
        name: used in warnings.
        isolation: where ``score`` runs when ``timeout`` is set:

            * ``"process"``: in a worker process (a fresh interpreter, started
              once and kept across calls, with a warm spare). A call that
              overruns is cut off whatever it is doing (a regex or C extension
              that holds the GIL, a deadlock, a sleep): the process is killed
              and the spare takes over. A crash of the interpreter (``os._exit``,
              a segfault) is an error, not the end of the run. The task is
              pickled once, here (the worker scores this snapshot); output the
              reward code prints is discarded; the trainer's copy of the task
              does not see its counters move (the guard reports them).
            * ``"thread"``: in a worker thread of this process, with the
              caller's CUDA device. Cut off at the limit only while the call
              lets Python run other threads (sleeps, I/O, waiting, Python-level
              loops); C code that holds the GIL runs to its end and the call
              then counts as done, and a crash takes the trainer with it. A
              call cut off keeps running (Python cannot kill a thread); while
              ``MAX_ABANDONED`` are still running, later calls skip the task.
              For tasks that score on a GPU (a reward model) or cannot be pickled.
            * ``"auto"`` (default): the task's ``score_isolation`` attribute when
              it declares one (``"process"`` or ``"thread"``), else
              ``"process"``, falling back to ``"thread"`` with a warning when the
              task cannot be pickled or its worker cannot start.
        startup_timeout: seconds a worker process may take to start (imports,
            loading the task), > 0; not part of a call's ``timeout``.

    Raises:
        ArgumentError: a bad argument; ``isolation="process"`` (given or
            declared) for a task that cannot be pickled, or with ``timeout=None``.

    Totals over the guard's life are in :attr:`totals`. :meth:`close` (or
    garbage collection, or interpreter exit) stops the worker processes.
    """

    def __init__(
        self,
        task: Any,
        timeout: float | None = 600.0,
        name: str = "reward",
        isolation: Isolation = "auto",
        startup_timeout: float = 120.0,
    ) -> None:
        self.timeout = optional(real, "timeout", timeout, 0.0, low_open=True)
        self.startup_timeout = real("startup_timeout", startup_timeout, 0.0, low_open=True)
        given = one_of("isolation", isolation, ISOLATIONS)
        if given == "process" and self.timeout is None:
            raise ArgumentError("isolation", "'thread' or 'auto' when timeout is None (a worker process is there "
                                "to enforce a time limit)", given)
        self.task = task
        self.name = text("name", name)
        self._abandoned: list[threading.Thread] = []
        self._worker: Any = None
        self.totals = {"calls": 0, "errors": 0, "timeouts": 0, "invalid": 0, "grader_timeouts": 0,
                       "grader_errors": 0}
        declared = getattr(task, "score_isolation", None)
        param, mode = "isolation", given
        if given == "auto" and declared is not None:
            param = f"{type(task).__name__}.score_isolation"
            mode = one_of(param, declared, ("process", "thread"))
        self._fallback = mode == "auto"  # the process was not asked for: a thread may stand in
        self.isolation: Literal["process", "thread"] = "thread" if mode == "thread" else "process"
        if self.isolation == "process" and self.timeout is not None:
            self._start_worker(param, mode)

    def _start_worker(self, param: str, requested: str) -> None:
        from tre_lightning.tasks.worker_process import CallableWorker

        assert self.timeout is not None
        try:
            self._worker = CallableWorker(
                _ScoreCall(self.task), startup_timeout=self.startup_timeout, env=_cuda_env(),
                cpu_seconds=self.timeout * (os.cpu_count() or 1) + 60.0,  # cannot fire before the deadline
            )
        except Exception as err:  # noqa: BLE001 - pickling can raise anything
            reason = f"{type(err).__name__}: {str(err)[:200]}"
            if not self._fallback:
                raise ArgumentError(param, f"'thread' for a task that cannot be pickled ({reason})", requested) from None
            self._to_thread(f"the task cannot be pickled ({reason})")

    def _to_thread(self, why: str) -> None:
        self.isolation = "thread"
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        warnings.warn(
            f"{self.name}: task.score cannot run in a worker process: {why}; scoring in a worker thread instead, "
            "where a reward that holds the GIL (a long regex, a C extension) is not cut off at the time limit. "
            "Make the task picklable or declare score_isolation = 'thread'",
            RuntimeWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------ worker

    @property
    def worker_pid(self) -> int | None:
        """Process id of the worker process that serves the next call (None: none started, or thread isolation)."""
        return None if self._worker is None else self._worker.pid

    @property
    def worker_restarts(self) -> int:
        """Worker processes killed and replaced (after an overrun or a crash in a call)."""
        return 0 if self._worker is None else self._worker.restarts

    def start(self) -> None:
        """Start the worker process now (calls start it lazily); a task that cannot start there is found here.

        Raises:
            RuntimeError: the worker could not start and the process was asked
                for (given or declared); with ``"auto"`` the guard switches to a
                thread with a warning instead.
        """
        from tre_lightning.tasks.timeouts import WorkerStartError

        if self._worker is None:
            return
        try:
            self._worker.start()
        except WorkerStartError as err:
            if not self._fallback:
                raise RuntimeError(f"{self.name}: the reward worker process could not start: {err}") from None
            self._to_thread(str(err))

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        if self._worker is not None:
            self._worker.close()

    def __enter__(self) -> RewardGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_abandoned"] = []  # threads stay behind; the worker travels as its pickled task
        return state

    # ------------------------------------------------------------------ calling

    def _stuck(self) -> int:
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        return len(self._abandoned)

    def _call(self, examples: Sequence[Any], responses: Sequence[str], timeout: float | None,
              report: RewardReport) -> Any:
        """One bounded ``score`` call: its rewards (normalised by :class:`_ScoreCall`), counters added to ``report``.

        Raises ``_Timeout``, ``_ScoreError`` or ``_StartFailure``.
        """
        timeout = self.timeout if timeout is None else timeout
        if timeout is None:
            out = _ScoreCall(self.task, in_caller_thread=True)(examples, responses)
        elif self.isolation == "process":
            out = self._in_process(examples, responses, timeout)
        else:
            out = self._in_thread(examples, responses, timeout)
        report.grader_timeouts += int(out.get("grader_timeouts", 0))
        report.grader_errors += int(out.get("grader_errors", 0))
        if "error" in out:
            raise _ScoreError(f"task.score raised {out['error']}")
        return out.get("rewards")

    def _in_process(self, examples: Sequence[Any], responses: Sequence[str], timeout: float) -> dict[str, Any]:
        from tre_lightning.tasks.timeouts import WorkerError, WorkerStartError, WorkerTimeout
        from tre_lightning.tasks.worker_process import TargetError

        try:
            return dict(self._worker.call((list(examples), list(responses)), timeout))
        except WorkerTimeout:
            raise _Timeout(f"task.score took longer than {self.timeout:g}s (worker process killed and replaced)") \
                from None
        except WorkerStartError as err:
            if not self._fallback:
                raise _StartFailure(f"the reward worker process could not start: {err}") from None
            self._to_thread(str(err))
            return self._in_thread(examples, responses, timeout)
        except WorkerError as err:
            raise _ScoreError(f"the reward worker process died in task.score ({err}); replaced") from None
        except TargetError as err:
            raise _ScoreError(f"task.score could not run in the worker process: {err}") from None
        except Exception as err:  # noqa: BLE001 - e.g. examples that cannot be pickled
            raise _ScoreError(f"the call could not be sent to the worker process: {_describe(err)}") from None
        except BaseException:  # a real Ctrl-C while waiting: the worker is busy, drop it before stopping
            self._worker.close()
            raise

    def _in_thread(self, examples: Sequence[Any], responses: Sequence[str], timeout: float) -> dict[str, Any]:
        if self._stuck() >= MAX_ABANDONED:
            raise _Timeout(f"skipped: {MAX_ABANDONED} earlier score calls are still running past the time limit")
        box: dict[str, Any] = {}
        done = threading.Event()
        torch = sys.modules.get("torch")
        device = torch.cuda.current_device() if torch is not None and torch.cuda.is_initialized() else None
        call = _ScoreCall(self.task)

        def target() -> None:
            try:
                if device is not None:  # the current CUDA device is per thread: keep the caller's (its rank's)
                    torch.cuda.set_device(device)
                box["value"] = call(examples, responses)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                box["value"] = {"error": _describe(err)}
            finally:
                done.set()

        thread = threading.Thread(target=target, name="tre-reward-score", daemon=True)
        thread.start()
        if not done.wait(max(timeout, 0.0)):
            self._abandoned.append(thread)
            raise _Timeout(f"task.score took longer than {self.timeout:g}s")
        return box["value"]

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
        try:
            report.rewards = self._checked(self._call(examples, responses, None, report), n, report)
        except _Timeout as err:
            report.timeouts += n
            report.messages.append(str(err))
        except _StartFailure as err:
            report.errors += n
            report.messages.append(str(err))
        except _ScoreError as err:  # isolate the responses that fail
            report.messages.append(str(err))
            report.rewards = self._one_by_one(examples, responses, report)
        self._account(report)
        return report

    def _one_by_one(self, examples: Sequence[Any], responses: Sequence[str], report: RewardReport) -> list[float]:
        """Score each response alone (after the batch call raised); all of it within one more ``timeout``."""
        out: list[float] = []
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        for i in range(len(responses)):
            try:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise _Timeout(f"scoring the responses one by one took longer than {self.timeout:g}s")
                out.extend(self._checked(self._call([examples[i]], [responses[i]], remaining, report), 1, report))
            except (_Timeout, _StartFailure) as err:  # the rest cannot be scored either
                left = len(responses) - i
                if isinstance(err, _Timeout):
                    report.timeouts += left
                else:
                    report.errors += left
                report.messages.append(str(err))
                out.extend([0.0] * left)
                break
            except _ScoreError:
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
