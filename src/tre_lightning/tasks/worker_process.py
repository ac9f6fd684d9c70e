"""A picklable callable run in a persistent helper process, with a hard deadline per call.

Parent side, :class:`CallableWorker`: pickles the callable once, writes it to
a private temporary file and runs it in a helper process started by
:class:`tre_lightning.tasks.timeouts.SubprocessWorker` (the mechanism of the
MATH grader's symbolic helper: ``select``-based deadlines, the helper killed
when it overruns, a warm spare taking over at once, fork and pickle safety,
helpers stopped at interpreter exit). Each call sends the pickled arguments
and gets back the callable's return value, which must be JSON-serialisable.

Helper side, this file run as a script (``<launcher> worker_process.py
PAYLOAD``): it loads the callable once (the trainer's ``sys.path`` first, so
classes defined next to the trainer's code load too), then serves calls. A
fresh interpreter (not a ``fork``) so that the trainer's threads, locks and
CUDA context are not inherited and a helper can be started from any thread.

An orphaned helper (the trainer was SIGKILLed) does not outlive it: when idle
it sees the end of its input; in the middle of a call a watchdog thread exits
once the parent is gone (any call that lets other Python threads run); a call
stuck in C code that holds the GIL is ended by a per-call CPU-time cap
(``ITIMER_PROF``, default action: terminate) that the parent sets above what
the call could use before its own deadline.

The payload file is removed when the worker is closed or collected and at
interpreter exit; one left by a SIGKILLed trainer is removed by the next
worker that starts. Only the standard library is imported here, so a helper whose callable needs
no torch does not import it. :mod:`tre_lightning.tasks.timeouts` could build
its symbolic helper on this class later (its request/answer would become a
pickled call of a small function).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import sys
import tempfile
import weakref
from collections.abc import Mapping
from typing import Any

__all__ = ["CallableWorker", "TargetError"]


class TargetError(Exception):
    """The helper could not run the call (arguments or result did not travel); it is still alive."""


def _payload_header(env: Mapping[str, str], cpu_seconds: float) -> bytes:
    cwd = os.getcwd()
    sys_path = [cwd if p in ("", ".") else p for p in sys.path]
    return json.dumps({"sys_path": sys_path, "env": dict(env), "cpu_seconds": float(cpu_seconds)}).encode() + b"\n"


_PREFIX = "tre-worker-"


def _sweep_stale(folder: str) -> None:
    """Remove payload files left by processes that are gone (a SIGKILLed trainer cannot remove its own)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(_PREFIX) and name.endswith(".pkl")):
            continue
        pid = name[len(_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _unlink(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        try:
            os.unlink(path)
        except OSError:
            pass


class CallableWorker:
    """``target(*args)`` in a helper process, at most ``timeout`` seconds per call.

    Args:
        target: a picklable callable returning JSON-serialisable values; pickled
            now (the helper gets this snapshot, later changes to ``target`` are
            not seen), so an unpicklable one raises here.
        startup_timeout: seconds a helper may take to start (imports, loading
            ``target``); not counted in a call's deadline.
        cpu_seconds: CPU-time cap of one call inside the helper (orphan backstop,
            see the module docstring); 0 = none.
        env: environment variables set in the helper before ``target`` is loaded.
        spare: keep a second helper started so that a killed one is replaced at once.

    Raises (from :meth:`call`): ``WorkerTimeout`` (helper killed, spare took over),
    ``WorkerStartError``, ``WorkerError`` (helper died; replaced), :class:`TargetError`.
    """

    def __init__(
        self,
        target: Any,
        *,
        startup_timeout: float = 120.0,
        cpu_seconds: float = 0.0,
        env: Mapping[str, str] | None = None,
        spare: bool = True,
    ) -> None:
        self._target_bytes = pickle.dumps(target, protocol=pickle.HIGHEST_PROTOCOL)
        self.startup_timeout = float(startup_timeout)
        self.cpu_seconds = float(cpu_seconds)
        self.env = dict(env or {})
        self.spare = bool(spare)
        self._path: str | None = None
        self._path_pid = -1
        self._finalizer: weakref.finalize | None = None
        self._worker: Any = None

    def _payload_path(self) -> str:
        """The payload file of this process (written on first use; a forked copy writes its own)."""
        if self._path is None or self._path_pid != os.getpid():
            _sweep_stale(tempfile.gettempdir())
            fd, path = tempfile.mkstemp(prefix=f"{_PREFIX}{os.getpid()}-", suffix=".pkl")
            with os.fdopen(fd, "wb") as fh:
                fh.write(_payload_header(self.env, self.cpu_seconds))
                fh.write(self._target_bytes)
            self._path, self._path_pid = path, os.getpid()
            self._finalizer = weakref.finalize(self, _unlink, path, os.getpid())
        return self._path

    def _subprocess_worker(self) -> Any:
        from tre_lightning.tasks.timeouts import SubprocessWorker

        if self._worker is None:
            self._worker = SubprocessWorker(
                os.path.abspath(__file__), [self._payload_path()], startup_timeout=self.startup_timeout,
                spare=self.spare,
            )
        return self._worker

    def start(self) -> None:
        """Start the helper now and wait until it is ready (calls start it lazily)."""
        self._subprocess_worker().start()

    def call(self, args: tuple[Any, ...], timeout: float) -> Any:
        """``target(*args)`` in the helper, answered within ``timeout`` seconds."""
        request = {"args": base64.b64encode(pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")}
        answer = self._subprocess_worker().call(request, timeout)
        if answer.get("ok") is True:
            return answer.get("result")
        raise TargetError(str(answer.get("error", answer))[:500])

    @property
    def pid(self) -> int | None:
        """Process id of the helper that serves the next call (None before the first start)."""
        return None if self._worker is None else self._worker.pid

    @property
    def restarts(self) -> int:
        """Helpers killed and replaced after an overrun or a death in a call."""
        return 0 if self._worker is None else int(self._worker.restarts)

    def close(self) -> None:
        """Stop the helpers and remove the payload file (a later call starts afresh)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._path = None

    def __getstate__(self) -> dict[str, Any]:
        return {"target_bytes": self._target_bytes, "startup_timeout": self.startup_timeout,
                "cpu_seconds": self.cpu_seconds, "env": self.env, "spare": self.spare}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._target_bytes = state["target_bytes"]
        self.startup_timeout, self.cpu_seconds = state["startup_timeout"], state["cpu_seconds"]
        self.env, self.spare = state["env"], state["spare"]
        self._path, self._path_pid, self._finalizer, self._worker = None, -1, None, None


# ---------------------------------------------------------------------------------------------- helper side


def _watch_parent(parent: int) -> None:
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="tre-worker-watchdog", daemon=True).start()


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:300]}"


def main() -> None:  # pragma: no cover - runs in the helper process (tested through CallableWorker)
    parent = os.getppid()
    # Private protocol channels: whatever the target prints or reads cannot touch them.
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    proto_in = os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdout = sys.stderr

    def send(obj: dict[str, Any]) -> None:
        try:
            line = json.dumps(obj)
        except (TypeError, ValueError) as exc:
            line = json.dumps({"ok": False, "error": f"the result is not JSON-serialisable: {exc}"})
        proto_out.write(line.encode() + b"\n")

    try:
        with open(sys.argv[1], "rb") as fh:
            header = json.loads(fh.readline())
            sys.path[:] = list(header["sys_path"]) + [p for p in sys.path if p not in header["sys_path"]]
            os.environ.update(header["env"])
            target = pickle.load(fh)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as a start failure
        send({"ready": False, "error": f"could not load the callable: {_describe(exc)}"})
        return
    cpu_seconds = float(header.get("cpu_seconds", 0.0))
    itimer: Any = None
    if cpu_seconds > 0:
        import signal

        signal.signal(signal.SIGPROF, signal.SIG_DFL)  # default action: terminate
        itimer = signal
    _watch_parent(parent)

    send({"ready": True, "pid": os.getpid()})
    for raw in proto_in:
        try:
            args = pickle.loads(base64.b64decode(json.loads(raw)["args"]))
        except BaseException as exc:  # noqa: BLE001
            send({"ok": False, "error": f"bad request: {_describe(exc)}"})
            continue
        if itimer is not None:
            itimer.setitimer(itimer.ITIMER_PROF, cpu_seconds)
        try:
            answer = {"ok": True, "result": target(*args)}
        except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt too: never die on a call
            answer = {"ok": False, "error": f"the call raised {_describe(exc)}"}
        finally:
            if itimer is not None:
                itimer.setitimer(itimer.ITIMER_PROF, 0)
        send(answer)


if __name__ == "__main__":
    main()
