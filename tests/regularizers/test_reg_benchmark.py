"""benchmarks/regularizers.py runs end to end at a tiny size and writes its report.

No timing is asserted (timings belong to the benchmark's own run); the test
checks that every entry and every case of the default table is measured and
reported.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "regularizers.py"


def _load():
    spec = importlib.util.spec_from_file_location("reg_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_script_smoke(tmp_path, capsys):
    mod = _load()
    out = tmp_path / "bench.json"
    mod.main(["--positions", "24", "--vocab", "600,300", "--repeats", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    names = {"log_softmax", "ent", "tre_k", "tre_p", "min_ent", "forking", "kl_cov", "clip_cov",
             "tre_p_eager", "tre_p_cap256", "ref_tre_p_capped256", "ref_tre_p_full_sort"}
    assert names <= set(report["results"])
    for r in report["results"].values():
        assert r["time_ratio"] > 0 and r["peak_extra_bytes"] >= 0
    assert set(report["checks"]) and "logits_profile" in report
    # the default table: every case at every vocabulary, TRE-P entries in each
    cases = {(c["case"], c["vocab"]) for c in report["table"]}
    assert cases == {(k, v) for k in mod.CASES for v in (600, 300)}
    for case in report["table"]:
        assert {"log_softmax", "tre_p", "tre_p_eager", "tre_p_cap256", "ref_tre_p_capped256"} <= set(case["results"])
        for r in case["results"].values():
            assert r["time_ratio"] > 0 and r["cpu_time_ratio"] >= 0
        assert case["logits_profile"]["nucleus_q50_q90_q99_max"][0] >= 1
    assert report["config"]["threads"] >= 1 and len(report["config"]["load_average_before_after"]) == 2
    assert "ratio" in capsys.readouterr().out
