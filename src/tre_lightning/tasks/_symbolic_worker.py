"""Helper process for the symbolic MATH check (math-verify on top of sympy).

Run by :class:`tre_lightning.tasks.timeouts.SubprocessWorker` as a script, never
imported by the library: ``<launcher> _symbolic_worker.py MEMORY_MB CPU_SECONDS``.

Protocol (one JSON object per line):
    start-up  -> {"ready": true, "math_verify": "<version>"} or {"ready": false, "error": ...}
    request   <- {"gold": "<latex>", "pred": "<latex>"}
    answer    -> {"ok": true, "equal": bool} or {"ok": false, "error": "..."}

Safety: only LaTeX extraction is enabled (math-verify's plain-expression
extraction goes through sympy's ``parse_expr``, which calls ``eval``); the
address space is capped with RLIMIT_AS; each request arms a CPU-time timer
(ITIMER_PROF, default action: terminate) so that even an orphaned helper stuck
inside C code cannot spin forever. The parent enforces the real (wall-clock)
deadline and kills the helper when it is exceeded.
"""

import json
import logging
import os
import sys


def _vm_size_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    memory_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    cpu_seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0

    # Keep the protocol channel private: anything printed by libraries goes to stderr.
    proto = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj).encode() + b"\n")

    logging.disable(logging.CRITICAL)
    try:
        import math_verify
        from math_verify import LatexExtractionConfig, parse, verify
    except Exception as exc:  # math-verify missing or broken
        send({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return

    extraction = [LatexExtractionConfig()]

    def to_sympy(answer: str) -> list:
        return parse(
            "\\boxed{" + answer + "}",
            extraction_config=extraction,
            parsing_timeout=None,  # the parent owns the clock
            raise_on_error=False,
        )

    # Warm up sympy's caches and lazy imports so the first real request is fast.
    try:
        verify(to_sympy("\\frac{1}{2}"), to_sympy("0.5"), timeout_seconds=None)
    except Exception:
        pass

    if memory_mb > 0:
        try:
            import resource

            limit = _vm_size_bytes() + memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass

    itimer = None
    if cpu_seconds > 0:
        try:
            import signal

            signal.signal(signal.SIGPROF, signal.SIG_DFL)
            itimer = signal
        except (ImportError, AttributeError, ValueError):
            itimer = None

    send({"ready": True, "math_verify": getattr(math_verify, "__version__", "unknown")})
    for raw in sys.stdin.buffer:
        try:
            request = json.loads(raw)
            gold, pred = str(request["gold"]), str(request["pred"])
        except Exception as exc:
            send({"ok": False, "error": f"bad request: {exc}"})
            continue
        if itimer is not None:
            itimer.setitimer(itimer.ITIMER_PROF, cpu_seconds)
        try:
            gold_parsed = to_sympy(gold)
            pred_parsed = to_sympy(pred)
            equal = bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))
            answer = {"ok": True, "equal": equal}
        except MemoryError:
            answer = {"ok": False, "error": "MemoryError"}
        except BaseException as exc:  # noqa: BLE001 - report, never die on a request
            answer = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        finally:
            if itimer is not None:
                itimer.setitimer(itimer.ITIMER_PROF, 0)
        send(answer)


if __name__ == "__main__":
    main()
