"""Hard time and memory limits for reward checks, and the failure counters.

Two tools, both usable from any thread and from inside DataLoader workers
(which are daemonic processes, so ``multiprocessing`` may not start children
there; ``subprocess`` may):

* :class:`GraderStats`: thread-safe counters of checks, time-outs and errors.
  Every task exposes one through ``task.failure_counts()``; a check that
  raises or times out scores 0 and bumps a counter instead of propagating.
* :class:`SubprocessWorker`: a persistent helper process that answers
  JSON-line requests. The caller waits with ``select`` (no ``signal.alarm``,
  so it works outside the main thread); a request that overruns its deadline
  gets the helper killed and a warm spare takes over. The helper
  limits its own address space (``RLIMIT_AS``) and, as a backstop for an
  orphaned helper, its CPU time per request (``ITIMER_PROF``, default action:
  terminate). Used for the symbolic MATH check (sympy / math-verify), the
  only grader step whose cost is not bounded by construction.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any


class GraderStats:
    """Counters of one grader (per process; DataLoader workers keep their own).

    Keys of :meth:`as_dict`:

    * ``checks``: responses scored.
    * ``timeouts``: checks cut off by the hard time limit (scored 0).
    * ``errors``: checks that raised, or whose helper process died (scored 0).
    * ``failures``: ``timeouts + errors``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"checks": 0, "timeouts": 0, "errors": 0}

    def add(self, key: str, n: int = 1) -> None:
        if key not in self._counts:
            raise KeyError(f"unknown counter {key!r}; known: {sorted(self._counts)}")
        with self._lock:
            self._counts[key] += n

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._counts)
        out["failures"] = out["timeouts"] + out["errors"]
        return out

    def reset(self) -> None:
        with self._lock:
            for key in self._counts:
                self._counts[key] = 0

    # Locks do not pickle; tasks travel to spawned DataLoader workers.
    def __getstate__(self) -> dict[str, Any]:
        return {"counts": self.as_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        for key in self._counts:
            self._counts[key] = int(state["counts"].get(key, 0))


class WorkerTimeout(Exception):
    """The helper did not answer within the deadline (it has been killed)."""


class WorkerError(Exception):
    """The helper died, could not start, or answered garbage."""


class WorkerStartError(WorkerError):
    """No helper could be started (bad interpreter, missing module, start-up timeout)."""


_LAUNCHER = (
    "import sys, runpy; "
    "sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)

_LIVE_WORKERS: weakref.WeakSet[SubprocessWorker] = weakref.WeakSet()


def _close_all() -> None:  # pragma: no cover - interpreter shutdown
    for worker in list(_LIVE_WORKERS):
        worker.close()


atexit.register(_close_all)


class _Helper:
    """One helper process, its protocol buffer and its state (owned by one process)."""

    def __init__(self, argv: list[str]) -> None:
        env = dict(os.environ)
        # The helper must not inherit thread pools that oversubscribe the CPU.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env.setdefault(var, "1")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C in the trainer's terminal is not the helper's business
        )
        self.owner_pid = os.getpid()
        self.ready = False
        self.info: dict[str, Any] = {}
        self.buffer = b""
        self.served = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_line(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerTimeout
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                raise WorkerTimeout
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise WorkerError("helper process exited")
            self.buffer += chunk
            if len(self.buffer) > (1 << 24):
                raise WorkerError("helper answer too long")
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            out = json.loads(line)
        except ValueError as exc:
            raise WorkerError(f"helper answered non-JSON: {line[:200]!r}") from exc
        if not isinstance(out, dict):
            raise WorkerError(f"helper answered {type(out).__name__}, expected an object")
        return out

    def discard(self) -> None:
        """Kill it when this process started it; always drop this process's pipe ends."""
        if self.owner_pid == os.getpid():
            try:
                self.proc.kill()
                self.proc.wait(timeout=5)
            except Exception:  # pragma: no cover - already gone
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except Exception:  # pragma: no cover
                pass


class SubprocessWorker:
    """A persistent helper process with a hard deadline per request.

    The helper is a Python script run as ``python -c <launcher> script args…``;
    it must print one JSON line ``{"ready": true, ...}`` once started, then
    answer each JSON request line with one JSON line. Requests are serialized
    (one lock per worker); use several workers for parallelism.

    When a request overruns its deadline the helper is killed and a warm
    *spare* (a second helper kept started) takes over at once, so the request
    after a hang does not wait for a fresh start-up. A call therefore takes at
    most ``timeout`` seconds once a helper is ready; waiting for a helper to
    start (imports, about 0.3-1 s: on first use, and after two hangs within
    one start-up time) is bounded by ``startup_timeout``.

    Args:
        script: path of the helper script.
        args: extra command-line arguments for the script.
        startup_timeout: seconds allowed for the helper to start (imports);
            not counted in the per-request deadline.
        max_requests: recycle the helper after this many requests (bounds
            slow growth of caches inside it); 0 = never.
        spare: keep a second, idle helper started (one more process) so that
            a hang costs only its own deadline.

    The worker is fork- and pickle-safe: a copy in a forked or spawned process
    never talks to its parent's helpers; it starts its own on first use.
    """

    def __init__(
        self,
        script: str,
        args: Sequence[str] = (),
        startup_timeout: float = 60.0,
        max_requests: int = 0,
        spare: bool = True,
    ) -> None:
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0, got {startup_timeout}")
        if max_requests < 0:
            raise ValueError(f"max_requests must be >= 0, got {max_requests}")
        self.script = str(script)
        self.args = [str(a) for a in args]
        self.startup_timeout = float(startup_timeout)
        self.max_requests = int(max_requests)
        self.spare = bool(spare)
        self._lock = threading.Lock()
        self._active: _Helper | None = None
        self._spare: _Helper | None = None
        self.ready_info: dict[str, Any] = {}
        self.restarts = 0
        _LIVE_WORKERS.add(self)

    # ------------------------------------------------------------------ process
    def _argv(self) -> list[str]:
        return [sys.executable, "-c", _LAUNCHER, self.script, *self.args]

    def _drop_foreign(self) -> None:
        """Forget helpers inherited through fork: they belong to the parent process."""
        pid = os.getpid()
        for name in ("_active", "_spare"):
            helper = getattr(self, name)
            if helper is not None and helper.owner_pid != pid:
                helper.discard()  # closes this process's pipe ends only
                setattr(self, name, None)

    def _replace_active(self) -> None:
        """Kill the active helper; promote the spare (or start one); keep a spare starting."""
        if self._active is not None:
            self._active.discard()
        self._active = self._spare if self._spare is not None and self._spare.alive() else None
        if self._active is None:
            self._active = _Helper(self._argv())
        self._spare = _Helper(self._argv()) if self.spare else None
        self.restarts += 1

    def _ensure_ready(self) -> _Helper:
        self._drop_foreign()
        if self._active is not None and not self._active.alive():
            self._active.discard()
            self._active = None
        if self._active is not None and self.max_requests and self._active.served >= self.max_requests:
            self._replace_active()
        if self._active is None:
            self._active = _Helper(self._argv())
        helper = self._active
        if not helper.ready:
            try:
                info = helper.read_line(time.monotonic() + self.startup_timeout)
            except (WorkerTimeout, WorkerError) as exc:
                helper.discard()
                self._active = None
                raise WorkerStartError(f"helper {self.script} did not start: {exc or 'timed out'}") from exc
            if not info.get("ready"):
                helper.discard()
                self._active = None
                raise WorkerStartError(f"helper {self.script} failed to start: {info.get('error', info)}")
            helper.ready, helper.info = True, info
            self.ready_info = info
        if self.spare and self._spare is None:
            self._spare = _Helper(self._argv())  # warms up while the active one works
        return helper

    def start(self) -> None:
        """Start the helper now and wait until it is ready (optional; calls start it lazily)."""
        with self._lock:
            self._ensure_ready()

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request; wait at most ``timeout`` seconds for the answer.

        Raises:
            WorkerTimeout: no answer in time; the helper was killed and the
                spare took over.
            WorkerStartError: no helper could be started.
            WorkerError: the helper died or answered garbage (it is replaced).
        """
        with self._lock:
            helper = self._ensure_ready()
            assert helper.proc.stdin is not None
            helper.served += 1
            try:
                helper.proc.stdin.write(json.dumps(request).encode() + b"\n")
                helper.proc.stdin.flush()
                return helper.read_line(time.monotonic() + timeout)
            except WorkerTimeout:
                self._replace_active()
                raise
            except (OSError, WorkerError) as exc:
                self._replace_active()
                raise WorkerError(str(exc) or type(exc).__name__) from exc

    @property
    def pid(self) -> int | None:
        """Process id of the active helper (None when not running)."""
        return None if self._active is None else self._active.proc.pid

    def close(self) -> None:
        """Stop the helpers (a later call starts a new one)."""
        with self._lock:
            for helper in (self._active, self._spare):
                if helper is not None:
                    helper.discard()
            self._active = self._spare = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            for helper in (self._active, self._spare):
                if helper is not None:
                    helper.discard()
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        return {
            "script": self.script,
            "args": self.args,
            "startup_timeout": self.startup_timeout,
            "max_requests": self.max_requests,
            "spare": self.spare,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(
            state["script"], state["args"], state["startup_timeout"], state["max_requests"], state["spare"]
        )
