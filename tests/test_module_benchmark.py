"""benchmarks/ppo_iteration.py runs and prints its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "ppo_iteration.py"


def test_benchmark_smoke(capsys) -> None:
    spec = importlib.util.spec_from_file_location("ppo_iteration", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--regularizers", "none,tre_p", "--hidden-size", "32", "--batch-size", "2",
                       "--mini-batch-size", "1", "--micro-batch-size", "2", "--n", "2", "--max-new-tokens", "4",
                       "--warmup", "0", "--iterations", "1"])
    out = capsys.readouterr().out
    assert "| regularizer | rollout tok/s | train tok/s |" in out
    assert [r["regularizer"] for r in rows] == ["none", "tre_p"]
    assert all(r["rollout tok/s"] > 0 and r["train tok/s"] > 0 and r["peak MiB"] > 0 for r in rows)
