"""tre-plot groups runs by setting (every recorded override but the seed), labels groups by what
differs, and says "(n = 1)" for single runs; -m sweeps over a combination get readable folders (issue 16)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tre_lightning.cli.train import run_folder_name
from tre_lightning.evaluation.report import RunHistory, find_runs, format_sweep_table, sweep_rows, write_run_report


def _run(folder: Path, overrides: list[str], seed: int, after: float) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nregularizers: {{tre_p: {{coef: 0.001}}}}\n")
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in [*overrides, f"seed={seed}"]))
    h = RunHistory()
    h.add_val(0, 0.2)
    h.add_train(1, reward=0.1, p_max=0.9, entropy=0.3)
    h.add_val(1, after)
    write_run_report(h, folder / "report", print_table=False)


def test_a_coefficient_sweep_is_one_group_per_value(tmp_path) -> None:
    """Two coefficients × two seeds -> two groups labelled by the coefficient; before issue 16 the four runs
    were one "tre_p" row averaging both coefficients (checked: 1 row, mean 0.45)."""
    for i, (coef, seed, after) in enumerate([("0.001", 0, 0.40), ("0.001", 1, 0.44), ("0.01", 0, 0.50),
                                             ("0.01", 1, 0.46)]):
        _run(tmp_path / f"{i}", ["experiment=quickstart", "regularizers=tre_p", f"regularizers.tre_p.coef={coef}"],
             seed, after)
    rows = {r["setting"]: r for r in sweep_rows(find_runs([tmp_path]))}
    assert sorted(rows) == ["regularizers.tre_p.coef=0.001", "regularizers.tre_p.coef=0.01"]
    assert rows["regularizers.tre_p.coef=0.001"]["after"][0] == pytest.approx(0.42)
    assert rows["regularizers.tre_p.coef=0.01"]["after"][0] == pytest.approx(0.48)
    assert rows["regularizers.tre_p.coef=0.01"]["seeds"] == [0, 1]


def test_single_runs_say_n_1_and_missing_keys_say_default(tmp_path) -> None:
    _run(tmp_path / "a", ["regularizers=tre_p"], 0, 0.4)
    _run(tmp_path / "b", ["regularizers=tre_p", "optim.actor_lr=1e-5"], 0, 0.5)
    rows = sweep_rows(find_runs([tmp_path]))
    assert [r["setting"] for r in rows] == ["optim.actor_lr=(default)", "optim.actor_lr=1e-5"]
    table = format_sweep_table(rows)
    assert "| optim.actor_lr=1e-5 | 1 | 20.0 (n = 1) | 50.0 (n = 1) | +30.0 (n = 1) |" in table
    assert "± 0.0" not in table


def test_run_folder_name() -> None:
    assert run_folder_name("regularizers=[tre_p,kl_cov],regularizers.tre_p.coef=0.01,trainer.max_steps=1") == \
        "tre_p+kl_cov,regularizers.tre_p.coef=0.01"
    assert run_folder_name("optim.actor_lr=1e-5", "tre_p") == "tre_p"  # the group's choice
    assert run_folder_name("", ["ent", "kl_cov"]) == "ent+kl_cov"
    assert run_folder_name("regularizers=none") == "none"
    assert len(run_folder_name("regularizers=x,regularizers.x.a=" + "a" * 500)) == 120


def _script(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        pytest.skip(f"console script {name} not installed")
    return found


@pytest.mark.slow
def test_sweep_over_a_combination_and_a_coefficient_then_tre_plot(tmp_path) -> None:
    """``-m 'regularizers=tre_p,[tre_p,kl_cov]' regularizers.tre_p.coef=0.001,0.01`` runs 4 jobs in readable
    folders and tre-plot shows 4 groups. Fails before issue 16: the subdir interpolated
    ``hydra.runtime.choices.regularizers``, a list for the combination (interpolation error)."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [_script("tre-train"), "-m", "experiment=tiny_countdown", "regularizers=tre_p,[tre_p,kl_cov]",
           "regularizers.tre_p.coef=0.001,0.01", "seed=0", "trainer.max_steps=1", "export_hf=null",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert names == ["0_tre_p,regularizers.tre_p.coef=0.001_seed0", "1_tre_p,regularizers.tre_p.coef=0.01_seed0",
                     "2_tre_p+kl_cov,regularizers.tre_p.coef=0.001_seed0",
                     "3_tre_p+kl_cov,regularizers.tre_p.coef=0.01_seed0"]
    out = tmp_path / "plot" / "sweep.png"
    plot = subprocess.run([_script("tre-plot"), str(sweep), "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert plot.returncode == 0, plot.stderr
    lines = out.with_suffix(".md").read_text().splitlines()[2:]
    assert [ln.split("|")[1].strip() for ln in lines] == [
        "tre_p, regularizers.tre_p.coef=0.001", "tre_p, regularizers.tre_p.coef=0.01",
        "[tre_p,kl_cov], regularizers.tre_p.coef=0.001", "[tre_p,kl_cov], regularizers.tre_p.coef=0.01"]
    assert all("(n = 1)" in ln and "n/a" not in ln for ln in lines)  # "after" exists: validated at the last step
