"""The helper-process machinery behind the hard time limit, with a trivial helper script."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import pytest

from tre_lightning.tasks.timeouts import GraderStats, SubprocessWorker, WorkerError, WorkerStartError, WorkerTimeout

HELPER = """
import json, sys, time
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req.get("exit"):
        sys.exit(3)
    if req.get("spin"):
        while True:
            pass
    time.sleep(req.get("sleep", 0))
    print(json.dumps({"echo": req.get("x"), "pid": __import__("os").getpid()}), flush=True)
"""


LIMIT_S = 60.0
"""Deadline of the calls that must answer: a trivial echo never gets near it, even under load."""


@pytest.fixture()
def script(tmp_path: Path) -> str:
    path = tmp_path / "helper.py"
    path.write_text(HELPER)
    return str(path)


def test_answers_times_out_and_the_spare_takes_over(script: str) -> None:
    worker = SubprocessWorker(script)
    try:
        first = worker.call({"x": 1}, timeout=LIMIT_S)
        assert first["echo"] == 1
        spinning = worker.pid
        with pytest.raises(WorkerTimeout):  # the spin never ends: only the deadline can stop it
            worker.call({"spin": True}, timeout=0.3)
        assert worker.pid != spinning  # the spinning helper was killed and replaced
        after = worker.call({"x": 2}, timeout=LIMIT_S)
        assert after["echo"] == 2 and after["pid"] != first["pid"]
        assert worker.restarts == 1
    finally:
        worker.close()


def test_a_dead_helper_is_an_error_then_replaced(script: str) -> None:
    worker = SubprocessWorker(script, spare=False)
    try:
        with pytest.raises(WorkerError):
            worker.call({"exit": True}, timeout=LIMIT_S)
        assert worker.call({"x": 3}, timeout=LIMIT_S)["echo"] == 3
    finally:
        worker.close()


def test_start_failure(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import json; print(json.dumps({'ready': False, 'error': 'no math here'}), flush=True)\n")
    worker = SubprocessWorker(str(bad))
    with pytest.raises(WorkerStartError, match="no math here"):
        worker.call({}, timeout=1)
    crash = tmp_path / "crash.py"
    crash.write_text("raise SystemExit(1)\n")
    with pytest.raises(WorkerStartError):
        SubprocessWorker(str(crash)).start()


def test_threads_share_one_worker(script: str) -> None:
    worker = SubprocessWorker(script, spare=False)
    results: list[int] = []

    def run(i: int) -> None:
        results.append(worker.call({"x": i, "sleep": 0.01}, timeout=LIMIT_S)["echo"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    worker.close()
    assert sorted(results) == list(range(8))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_copy_starts_its_own_helper(script: str) -> None:
    worker = SubprocessWorker(script, spare=False)
    parent_pid = worker.call({"x": 0}, timeout=LIMIT_S)["pid"]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            pid = worker.call({"x": 1}, timeout=LIMIT_S)["pid"]
            os.write(write, str(pid).encode())
            worker.close()
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    child_helper = int(os.read(read, 64).decode())
    os.close(read)
    assert child_helper != parent_pid
    assert worker.call({"x": 2}, timeout=LIMIT_S)["pid"] == parent_pid  # the parent's helper is untouched
    worker.close()


def test_pickles_without_processes(script: str) -> None:
    worker = SubprocessWorker(script, max_requests=5, spare=False)
    worker.call({"x": 0}, timeout=LIMIT_S)
    clone = pickle.loads(pickle.dumps(worker))
    assert clone.pid is None and clone.max_requests == 5
    assert clone.call({"x": 1}, timeout=LIMIT_S)["echo"] == 1
    clone.close()
    worker.close()


def test_recycles_after_max_requests(script: str) -> None:
    worker = SubprocessWorker(script, max_requests=2, spare=False)
    pids = [worker.call({"x": i}, timeout=LIMIT_S)["pid"] for i in range(3)]
    worker.close()
    assert pids[0] == pids[1] != pids[2]


def test_stats() -> None:
    stats = GraderStats()
    stats.add("checks", 3)
    stats.add("timeouts")
    stats.add("errors", 2)
    assert stats.as_dict() == {"checks": 3, "timeouts": 1, "errors": 2, "failures": 3}
    assert pickle.loads(pickle.dumps(stats)).as_dict() == stats.as_dict()
    with pytest.raises(KeyError):
        stats.add("nope")
