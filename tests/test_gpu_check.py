"""benchmarks/gpu_check.sh without CUDA: a clear one-line refusal, exit 3, a "no_cuda" summary.

``CUDA_VISIBLE_DEVICES=""`` hides any GPU, so the test means the same on every
machine. Checked against the mutation "drop the CUDA check at the top of
gpu_check.sh" (the script then goes on to install and run every step; the
test failed, on the loaded 2-core machine by its 300 s subprocess limit) and,
for the summary test, "a timed-out step counts as ok".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def _no_cuda_env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}


def test_script_refuses_without_cuda_and_writes_a_no_cuda_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=_no_cuda_env(),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == gpu_check.NO_CUDA_EXIT == 3, proc.stderr
    assert "gpu_check: no CUDA device (torch.cuda.is_available() is False" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "no_cuda" and summary["steps"] == []
    assert summary["message"].startswith("gpu_check: no CUDA device")
    assert "no_cuda" in (out / "summary.md").read_text()


def test_python_steps_refuse_cuda_when_absent(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "ppo", "--json",
                           str(tmp_path / "ppo.json")], env=_no_cuda_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3
    assert "gpu_check.py ppo: no CUDA device" in proc.stderr
    assert not (tmp_path / "ppo.json").exists()


def test_summary_status_follows_the_steps(tmp_path: Path) -> None:
    (tmp_path / "steps.tsv").write_text("install\t0\t3\ntests\t0\t40\n")
    (tmp_path / "ppo.json").write_text(json.dumps({"rollout_tokens_per_s": 1234.0}))
    ok = gpu_check.summary(tmp_path, tmp_path / "a", None)
    assert ok["status"] == "ok" and ok["ppo"] == {"rollout_tokens_per_s": 1234.0} and ok["kernels"] is None
    (tmp_path / "steps.tsv").write_text("install\t0\t3\nkernels\t124\t100\n")
    late = gpu_check.summary(tmp_path, tmp_path / "b", None)
    assert late["status"] == "failed"
    assert [s["status"] for s in late["steps"]] == ["ok", "timeout"]
    assert "| kernels | timeout | 124 | 100 |" in (tmp_path / "b" / "summary.md").read_text()
