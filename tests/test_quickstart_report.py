"""Run reports and tre-plot on hand-made run folders (no training)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from tre_lightning.cli.plot import main as tre_plot
from tre_lightning.evaluation.report import (
    RunHistory,
    ema,
    find_runs,
    format_sweep_table,
    load_run,
    plot_sweep,
    summarize,
    sweep_rows,
    write_run_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _history(before: float, after: float, p_max_end: float, steps: int = 20) -> RunHistory:
    h = RunHistory()
    h.add_val(0, before)
    for s in range(1, steps + 1):
        h.add_train(s, reward=0.1 + 0.01 * s, p_max=0.8 + (p_max_end - 0.8) * s / steps, entropy=0.5)
    h.add_val(steps // 2, (before + after) / 2)
    h.add_val(steps, after)
    return h


def test_summary_before_after_and_windows() -> None:
    h = _history(0.2, 0.5, 0.9, steps=20)
    s = summarize(h, window=10)
    assert (s.before, s.after, s.after_step) == (0.2, 0.5, 20)
    assert s.delta == pytest.approx(0.3)
    # P̄max ramps linearly 0.805 .. 0.9: mean of steps 11..20 and of steps 1..10
    assert s.final_p_max == pytest.approx(statistics.fmean(0.8 + 0.1 * k / 20 for k in range(11, 21)))
    assert s.first_p_max == pytest.approx(statistics.fmean(0.8 + 0.1 * k / 20 for k in range(1, 11)))
    assert s.final_reward == pytest.approx(statistics.fmean(0.1 + 0.01 * k for k in range(11, 21)))
    assert s.steps == 20


def test_summary_without_validation_before() -> None:
    h = RunHistory()
    h.add_train(1, reward=0.1, p_max=0.9)
    h.add_val(5, 0.4)
    s = summarize(h)
    assert s.before is None and s.after == 0.4 and s.delta is None


def test_csv_roundtrip(tmp_path) -> None:
    h = _history(0.25, 0.45, 0.95)
    path = h.write_csv(tmp_path / "m.csv")
    back = RunHistory.read_csv(path)
    assert back.val == h.val
    assert back.series("p_max") == h.series("p_max")
    assert back.series("reward") == h.series("reward")


def test_lightning_csv_step_mapping(tmp_path) -> None:
    # what CSVLogger writes: validation before training, training rows at step k-1, validation after k iterations
    rows = [
        {"step": "0", "val/pass@1": "0.2", "reward/mean": "", "policy/p_max": ""},
        {"step": "0", "val/pass@1": "", "reward/mean": "0.1", "policy/p_max": "0.8"},
        {"step": "1", "val/pass@1": "", "reward/mean": "0.2", "policy/p_max": "0.85"},
        {"step": "1", "val/pass@1": "0.3", "reward/mean": "", "policy/p_max": ""},
    ]
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    h = RunHistory.from_lightning_csv(path)
    assert h.val == {0: 0.2, 2: 0.3}
    assert h.series("p_max") == ([1, 2], [0.8, 0.85])


def test_ema() -> None:
    assert ema([1.0, 0.0, 0.0], 0.5) == [1.0, 0.5, 0.25]
    assert ema([3.0, 4.0], 0.0) == [3.0, 4.0]
    with pytest.raises(ValueError):
        ema([1.0], 1.0)


def test_write_run_report_files_and_table(tmp_path, capsys) -> None:
    h = _history(0.2, 0.45, 0.9)
    h.meta = {"task": "embedded", "regularizers": "TREP", "seed": 3}
    out = write_run_report(h, tmp_path / "report")
    text = capsys.readouterr().out
    assert "20.0%" in text and "45.0%" in text and "+25.0 points" in text
    assert (tmp_path / "report" / "curves.png").read_bytes()[:8] == PNG
    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert saved["delta"] == pytest.approx(0.25) and saved["meta"]["seed"] == 3
    assert out["files"]["plot"].endswith("curves.png")


def _fake_run(folder: Path, label: str, seed: int, before: float, after: float, p_max_end: float) -> None:
    """A run folder as tre-train leaves it: .hydra/config.yaml and report/."""
    (folder / ".hydra").mkdir(parents=True)
    regs = "{}" if label == "none" else f"{{{label}: {{_target_: x, coef: 0.001}}}}"
    (folder / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nregularizers: {regs}\n")
    write_run_report(_history(before, after, p_max_end), folder / "report", print_table=False)


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    data = {"none": [(0.2, 0.40, 0.95), (0.2, 0.44, 0.97)], "tre_p": [(0.2, 0.46, 0.90), (0.2, 0.50, 0.88)]}
    for label, runs in data.items():
        for seed, (b, a, p) in enumerate(runs):
            _fake_run(root / f"{label}_{seed}", label, seed, b, a, p)
    return root


def test_sweep_rows_mean_and_std(sweep) -> None:
    runs = find_runs([sweep])
    assert sorted((r.label, r.seed) for r in runs) == [("none", 0), ("none", 1), ("tre_p", 0), ("tre_p", 1)]
    rows = {r["regularizer"]: r for r in sweep_rows(runs)}
    m, s = rows["tre_p"]["after"]
    assert m == pytest.approx(0.48) and s == pytest.approx(statistics.stdev([0.46, 0.50]))
    assert rows["none"]["delta"][0] == pytest.approx(0.22)
    table = format_sweep_table(list(rows.values()))
    assert "| tre_p | 2 | 20.0 ± 0.0 | 48.0 ± 2.8 | +28.0 ± 2.8 |" in table
    assert table.index("| none") < table.index("| tre_p")  # the paper's order: baselines first


def test_plot_sweep_writes_png(sweep, tmp_path) -> None:
    path = plot_sweep(find_runs([sweep]), tmp_path / "s.png")
    assert path.read_bytes()[:8] == PNG


def test_tre_plot_cli(sweep, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "fig" / "sweep.png"
    assert tre_plot([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 runs, 2 regularizers" in printed and "| none |" in printed and "| tre_p |" in printed
    assert out.read_bytes()[:8] == PNG
    assert out.with_suffix(".md").read_text().startswith("| regularizer |")
    # no argument: the latest folder under ./multirun
    monkeypatch.chdir(sweep.parents[2])
    assert tre_plot([]) == 0
    assert (sweep / "sweep.png").is_file()


def test_tre_plot_cli_errors(tmp_path, capsys) -> None:
    assert tre_plot([str(tmp_path)]) == 1
    assert "no tre-train runs" in capsys.readouterr().err
    assert tre_plot([str(tmp_path), "--smoothing", "1.5"]) == 2
    with pytest.raises(SystemExit) as exc:
        tre_plot(["--help"])
    assert exc.value.code == 0
    assert "P̄max" in capsys.readouterr().out


def test_load_run_falls_back_to_the_lightning_csv(tmp_path) -> None:
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step,val/pass@1,reward/mean,policy/p_max\n0,,0.1,0.8\n0,0.3,,\n")
    run = load_run(tmp_path)
    assert run is not None and run.history.val == {1: 0.3} and run.label == tmp_path.name
