"""RewardGuard's isolation: reward code in a worker process (cut off whatever it does) or a thread.

Every check asserts the mechanism (the time-out counter moved, the worker was
replaced, the process is gone), never elapsed seconds; the time limits that
must *not* fire are far above what the calls need. Timings are in
``benchmarks/reward_guard.py``.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from test_reward_guard_support import (
    EVIL,
    DeclaresBogus,
    DeclaresThread,
    FailsToLoad,
    Scripted,
    Unpicklable,
    alive,
    catastrophic_regex,
    descendants,
)

from tre_lightning.checks import ArgumentError
from tre_lightning.tasks.guard import RewardGuard
from tre_lightning.tasks.timeouts import WorkerError
from tre_lightning.tasks.worker_process import CallableWorker

LONG = 600.0
"""A limit no healthy call comes near, even on a loaded machine."""


def _wait_gone(pid: int, limit_s: float = 120.0) -> bool:
    """Block until ``pid`` exits (pidfd, no polling); False if it is still alive after ``limit_s``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        select.select([fd], [], [], limit_s)
    finally:
        os.close(fd)
    return not alive(pid)


def _wait_for_file(path: Path, limit_s: float = 120.0) -> str:
    deadline = time.monotonic() + limit_s
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


# --------------------------------------------------------------------------- cut off, whatever it does


def test_a_reward_that_holds_the_gil_is_cut_off_and_counted_as_a_timeout() -> None:
    """A catastrophic-backtracking regex (C code holding the GIL for days) overruns the limit: the call scores
    0 as time-outs, the worker is killed and replaced, and the next call scores normally in the new worker.

    Checked against: the guard running process mode in a thread (the test hangs: the caller cannot even get
    the GIL back to notice the time-out), and the old scoring.py (the same hang)."""
    guard = RewardGuard(Scripted("regex_on_evil"), timeout=5.0, isolation="process")
    guard.start()
    first = guard.worker_pid
    with pytest.warns(RuntimeWarning, match=r"3 time-outs.*worker process killed and replaced"):
        report = guard.score([{}] * 3, ["x", EVIL, "yy"])
    assert report.rewards == [0.0, 0.0, 0.0]
    assert (report.timeouts, report.errors, report.invalid) == (3, 0, 0)
    assert guard.worker_restarts == 1 and guard.worker_pid not in (None, first)
    assert _wait_gone(first)
    after = guard.score([{}] * 2, ["x", "yy"])
    assert after.rewards == [1.0, 2.0] and after.failures == 0
    assert guard.totals["timeouts"] == 3
    guard.close()


def test_the_cpu_cap_ends_a_call_stuck_in_c_code_even_without_the_parent() -> None:
    """The orphan backstop: the helper's own CPU-time cap (ITIMER_PROF) ends a GIL-holding call although the
    caller waits far longer (as an orphaned helper, whose caller is gone, would be ended).

    Checked against: the helper not arming the timer (the call then overruns the caller's limit instead)."""
    worker = CallableWorker(catastrophic_regex, cpu_seconds=1.0, spare=False)
    try:
        with pytest.raises(WorkerError, match="exited"):
            worker.call((), timeout=60.0)  # 60 s of wall time for 1 s of CPU: cannot be reached first
    finally:
        worker.close()


# --------------------------------------------------------------------------- exits and interrupts


@pytest.mark.parametrize("isolation", ["process", "thread"])
@pytest.mark.parametrize("mode", ["exit_on_boom", "interrupt_on_boom"])
def test_sys_exit_and_keyboard_interrupt_inside_score_are_errors(isolation: str, mode: str) -> None:
    """``sys.exit()`` / ``raise KeyboardInterrupt`` in the reward code zero only the responses that raise them;
    the run goes on (the process worker survives: the same process serves the next call).

    Checked against: the old scoring.py (thread: SystemExit / KeyboardInterrupt re-raised in the caller, the
    test ends with it), catching ``Exception`` instead of ``BaseException`` in ``_ScoreCall`` with no backstop
    around it (same)."""
    guard = RewardGuard(Scripted(mode), timeout=LONG, isolation=isolation)
    with pytest.warns(RuntimeWarning, match=r"2 of 4 responses scored 0 .*\(2 errors"):
        report = guard.score([{}] * 4, ["ab", "boom", "abc", "xboom"])
    assert report.rewards == [2.0, 0.0, 3.0, 0.0]
    assert (report.errors, report.timeouts, report.invalid) == (2, 0, 0)
    assert any(("SystemExit" if mode == "exit_on_boom" else "KeyboardInterrupt") in m for m in report.messages)
    pid = guard.worker_pid
    assert guard.score([{}], ["abcd"]).rewards == [4.0]
    assert guard.worker_pid == pid and guard.worker_restarts == 0
    guard.close()


def test_without_a_time_limit_sys_exit_is_an_error_and_a_keyboard_interrupt_stops() -> None:
    """``timeout=None`` calls in the caller's thread, where a KeyboardInterrupt may be a real Ctrl-C: it stops
    the run; SystemExit is still an error."""
    with pytest.warns(RuntimeWarning, match=r"1 errors"):
        report = RewardGuard(Scripted("exit_on_boom"), timeout=None).score([{}] * 2, ["ab", "boom"])
    assert report.rewards == [2.0, 0.0] and report.errors == 1
    with pytest.raises(KeyboardInterrupt):
        RewardGuard(Scripted("interrupt_on_boom"), timeout=None).score([{}] * 2, ["ab", "boom"])


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_ctrl_c_in_the_trainer_stops_the_call_and_drops_the_busy_worker(isolation: str, tmp_path: Path) -> None:
    """A real SIGINT to the trainer while a call is running raises KeyboardInterrupt out of ``score`` (the run
    stops); in process mode the busy worker is killed first, and the next call gets a fresh answer.

    Checked against: converting the caller's KeyboardInterrupt into an error (pytest.raises fails), and not
    closing the worker on it (the busy worker is still alive)."""
    marker = tmp_path / "busy"
    guard = RewardGuard(Scripted("mark_then_sleep", marker=str(marker)), timeout=LONG, isolation=isolation)
    guard.start()

    def interrupt() -> None:
        _wait_for_file(marker)  # the reward code is running (in the worker)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        guard.score([{}], ["sleep"])
    busy = int(marker.read_text())
    if isolation == "process":
        assert busy != os.getpid() and not alive(busy)
    else:
        assert busy == os.getpid()
    assert guard.score([{}], ["ab"]).rewards == [2.0]
    guard.close()


# --------------------------------------------------------------------------- one worker, reused and replaced


def test_the_worker_is_reused_across_calls_and_scores_every_input_it_is_given() -> None:
    """One worker process serves every call (the reward is the pid of the process that scored); examples and
    responses of any type travel (bytes, tuples, a lone surrogate).

    Checked against: a worker started per call (the pid changes)."""
    guard = RewardGuard(Scripted("pid"), timeout=LONG)
    assert guard.isolation == "process"
    pids = {r for _ in range(3) for r in guard.score([{"b": b"\x00", "t": (1, 2)}] * 2, ["\ud800", ""]).rewards}
    assert pids == {float(guard.worker_pid)} and guard.worker_pid != os.getpid()
    assert guard.worker_restarts == 0
    guard.close()


def test_a_worker_that_dies_is_an_error_and_is_replaced() -> None:
    """``os._exit`` in the reward code ends the worker, not the run: the batch is retried one response at a
    time in the replacement, only the response that kills it scores 0.

    Checked against: treating a dead worker as a time-out (timeouts, not errors) and not retrying."""
    guard = RewardGuard(Scripted("die_on_boom"), timeout=LONG, isolation="process")
    guard.start()
    first = guard.worker_pid
    with pytest.warns(RuntimeWarning, match=r"1 errors.*worker process died"):
        report = guard.score([{}] * 3, ["a", "boom", "ccc"])
    assert report.rewards == [1.0, 0.0, 3.0] and (report.errors, report.timeouts) == (1, 0)
    assert guard.worker_restarts == 2 and not alive(first)  # the batch call and the "boom" call
    guard.close()


def test_grader_counters_are_read_in_the_worker_process() -> None:
    """The task's ``failure_counts()`` deltas come from the process that scored (the trainer's copy of the
    task never moves), per call.

    Checked against: reading the counters in the trainer process (deltas 0), reporting the totals instead of
    the deltas (the second call would give 4 and 2)."""
    task = Scripted("grader_counters")
    guard = RewardGuard(task, timeout=LONG, isolation="process")
    for _ in range(2):
        report = guard.score([{}] * 2, ["a", "bb"])
        assert report.rewards == [1.0, 2.0] and report.failures == 0
        assert (report.grader_timeouts, report.grader_errors) == (2, 1)
    assert (guard.totals["grader_timeouts"], guard.totals["grader_errors"]) == (4, 2)
    assert task.failure_counts()["failures"] == 0 and task.calls == 0
    guard.close()


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_gradients_are_off_where_the_reward_runs(isolation: str) -> None:
    """Scoring runs without autograd in the worker (the reward is ``torch.is_grad_enabled()`` there).

    Checked against: dropping ``no_grad`` from ``_ScoreCall`` (reward 1.0)."""
    guard = RewardGuard(Scripted("grad"), timeout=LONG, isolation=isolation)
    with torch.enable_grad():
        assert guard.score([{}], ["a"]).rewards == [0.0]
    guard.close()


# --------------------------------------------------------------------------- no orphans


def test_no_orphan_process_after_close_garbage_collection_or_with() -> None:
    """The worker and its warm spare are gone after ``close()``, after the guard is garbage-collected, and at
    the end of a ``with`` block.

    Checked against: ``close()`` that does nothing (the processes stay alive)."""
    mine = os.getpid()
    for ending in ("close", "gc", "with"):
        before = descendants(mine)
        guard = RewardGuard(Scripted("pid"), timeout=LONG, isolation="process")
        guard.score([{}], ["a"])
        helpers = descendants(mine) - before
        assert guard.worker_pid in helpers and len(helpers) == 2, ending  # the worker and its warm spare
        if ending == "close":
            guard.close()
        elif ending == "gc":
            del guard
            gc.collect()
        else:
            with guard:
                guard.score([{}], ["b"])
        assert not any(alive(pid) for pid in helpers), ending


def test_no_orphan_process_when_the_trainer_is_killed_mid_call(tmp_path: Path) -> None:
    """SIGKILL of the trainer while its worker runs a call (sleeping) and the spare waits: both exit on their
    own (the busy one through its watchdog, the idle one at the end of its input).

    Checked against: a helper without the parent watchdog (the busy worker sleeps on: still alive)."""
    marker = tmp_path / "busy"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_reward_guard_support import Scripted
        from tre_lightning.tasks.guard import RewardGuard
        guard = RewardGuard(Scripted("mark_then_sleep", marker={str(marker)!r}), timeout=600.0)
        guard.score([{{}}], ["sleep"])
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script])
    try:
        busy = int(_wait_for_file(marker))
        helpers = descendants(trainer.pid)
        assert busy in helpers
    finally:
        trainer.kill()
        trainer.wait()
    assert all(_wait_gone(pid) for pid in helpers)


# --------------------------------------------------------------------------- which isolation


def test_isolation_defaults_and_declarations() -> None:
    """auto: the task's ``score_isolation`` when declared, else a process; thread: no process at all."""
    assert RewardGuard(Scripted("ok"), timeout=LONG).isolation == "process"
    declared = RewardGuard(DeclaresThread("pid"), timeout=LONG)
    assert declared.isolation == "thread"
    assert declared.score([{}], ["a"]).rewards == [float(os.getpid())] and declared.worker_pid is None
    assert RewardGuard(Scripted("ok"), timeout=LONG, isolation="thread").isolation == "thread"
    with pytest.raises(ArgumentError, match=r"DeclaresBogus.score_isolation must be one of \['process', 'thread'\]"):
        RewardGuard(DeclaresBogus("ok"), timeout=LONG)


def test_a_task_that_cannot_be_pickled_falls_back_to_a_thread_only_when_not_asked_for_a_process() -> None:
    """auto: a warning naming the limitation, then thread scoring; isolation='process': a one-line refusal."""
    with pytest.warns(RuntimeWarning, match="cannot be pickled.*not cut off at the time limit"):
        guard = RewardGuard(Unpicklable("pid"), timeout=LONG)
    assert guard.isolation == "thread" and guard.score([{}], ["a"]).rewards == [float(os.getpid())]
    with pytest.raises(ArgumentError, match=r"^isolation must be 'thread' for a task that cannot be pickled"):
        RewardGuard(Unpicklable("ok"), timeout=LONG, isolation="process")


def test_a_task_that_cannot_load_in_the_worker(tmp_path: Path) -> None:
    """auto: found at the first start, a warning, then thread scoring; isolation='process': ``start()`` raises
    one line, and a call scores 0 as errors after one more start attempt, not one per response.

    Checked against: retrying response by response after a start failure (5 start attempts instead of 2)."""
    with pytest.warns(RuntimeWarning, match="could not load the callable.*RuntimeError"):
        auto = RewardGuard(FailsToLoad("pid"), timeout=LONG)
        report = auto.score([{}], ["a"])
    assert auto.isolation == "thread" and report.rewards == [float(os.getpid())]
    attempts = tmp_path / "attempts"
    strict = RewardGuard(FailsToLoad("ok", marker=str(attempts)), timeout=LONG, isolation="process")
    with pytest.raises(RuntimeError, match="reward worker process could not start"):
        strict.start()
    with pytest.warns(RuntimeWarning, match="3 errors.*could not start"):
        report = strict.score([{}] * 3, ["a", "b", "c"])
    assert report.rewards == [0.0] * 3 and report.errors == 3
    assert attempts.read_text().count("attempt") == 2
    strict.close()


def test_guard_arguments_are_validated() -> None:
    for kwargs, param in (({"timeout": 0}, "timeout"), ({"timeout": "10"}, "timeout"),
                          ({"isolation": "fork"}, "isolation"), ({"startup_timeout": 0.0}, "startup_timeout"),
                          ({"timeout": None, "isolation": "process"}, "isolation"), ({"name": ""}, "name")):
        with pytest.raises(ArgumentError) as err:
            RewardGuard(Scripted("ok"), **kwargs)
        assert err.value.param == param


def test_a_payload_file_left_by_a_killed_trainer_is_removed_by_the_next_worker() -> None:
    """The pickled task of a SIGKILLed trainer stays in the temporary folder; the next worker to start
    removes the files of processes that are gone and keeps those of live ones.

    Checked against: no sweep (the stale file stays)."""
    import tempfile

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = Path(tempfile.gettempdir())
    stale = folder / f"tre-worker-{gone.pid}-test.pkl"
    live = folder / f"tre-worker-{os.getppid()}-test.pkl"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    try:
        guard = RewardGuard(Scripted("ok"), timeout=LONG, isolation="process")
        assert guard.score([{}], ["ab"]).rewards == [2.0]
        assert not stale.exists() and live.exists()
        guard.close()
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def test_the_worker_sees_the_trainers_current_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA in use, the worker's CUDA_VISIBLE_DEVICES names the trainer's current device (its physical
    id under the trainer's own CUDA_VISIBLE_DEVICES), so ranks do not all score on GPU 0; without CUDA in use
    the environment is left alone. (CUDA faked: the mapping, not a GPU, is under test.)

    Checked against: passing the logical index through (1.0 instead of 6.0)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    with RewardGuard(Scripted("cuda_visible"), timeout=LONG, isolation="process") as guard:
        assert guard.score([{}], ["a"]).rewards == [6.0]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with RewardGuard(Scripted("cuda_visible"), timeout=LONG, isolation="process") as guard:
        assert guard.score([{}], ["a"]).rewards == [1.0]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with RewardGuard(Scripted("cuda_visible"), timeout=LONG, isolation="process") as guard:
        assert guard.score([{}], ["a"]).rewards == [-1.0]


def test_a_pickled_guard_gets_its_own_worker() -> None:
    """A copy of a guard (pickled, e.g. with its module) starts its own worker; closing it leaves the
    original's worker serving."""
    import pickle

    guard = RewardGuard(Scripted("pid"), timeout=LONG, isolation="process")
    first = guard.score([{}], ["a"]).rewards
    copy = pickle.loads(pickle.dumps(guard))
    assert copy.score([{}], ["a"]).rewards != first
    copy.close()
    assert guard.score([{}], ["a"]).rewards == first
    guard.close()
