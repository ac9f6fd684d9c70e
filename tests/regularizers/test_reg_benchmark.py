"""benchmarks/regularizers.py runs end to end at a tiny size and writes its report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "regularizers.py"


def test_benchmark_script_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("reg_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.json"
    mod.main(["--positions", "24", "--vocab", "600", "--repeats", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    names = {"log_softmax", "ent", "tre_k", "tre_p", "min_ent", "forking", "kl_cov", "clip_cov",
             "tre_p_cap256", "ref_tre_p_capped256", "ref_tre_p_full_sort"}
    assert names <= set(report["results"])
    for r in report["results"].values():
        assert r["seconds"] > 0 and r["time_ratio"] > 0 and r["peak_extra_bytes"] >= 0
    assert set(report["checks"]) and "logits_profile" in report
    assert "ratio" in capsys.readouterr().out
