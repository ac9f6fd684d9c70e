"""The quickstart end to end: `tre-train` defaults, the report, the sweep preset and `tre-plot`.

Runs are tiny (a 40-step warm start with a small vocabulary, 2 PPO iterations):
they check the wiring (files, tables, grouping), not the learning. The
learning targets are measured by ``benchmarks/quickstart.py`` and the sweep.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import tre_lightning.conf

from tre_lightning.evaluation.report import load_run

PNG = b"\x89PNG\r\n\x1a\n"

TINY = [
    "model.policy.vocab_size=256",
    "model.policy.hidden_size=16",
    "model.policy.intermediate_size=32",
    "model.policy.num_attention_heads=2",
    "model.policy.num_key_value_heads=1",
    "model.policy.steps=40",
    "model.policy.batch_size=16",
    "model.policy.verbose=false",
    "model.policy.torch_threads=null",
    "task.n_train=64",
    "task.n_val=8",
    "ppo.batch_size=4",
    "ppo.mini_batch_size=2",
    "ppo.micro_batch_size=8",
    "evaluation.n=2",
    "evaluation.batch_size=8",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.checkpoint=null",
    "callbacks.samples=null",
    "export_hf=null",
]


def _compose(overrides: list[str], **kwargs):
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        return compose("train", overrides=overrides, **kwargs)


def test_defaults_are_the_embedded_quickstart(tmp_path) -> None:
    from tre_lightning.cli.train import build
    from tre_lightning.regularizers import TREP
    from tre_lightning.tasks.embedded import EmbeddedTask, WarmStartSource

    cfg = _compose([f"output_dir={tmp_path}"])
    assert cfg.validate_first is True
    assert cfg.callbacks.run_report is not None
    module = build(cfg).module
    task, source = module.task, module.model.policy_source
    assert isinstance(task, EmbeddedTask) and isinstance(source, WarmStartSource)
    assert source.task is task  # the warm start learns the task it is evaluated on (bound by the module)
    assert len(source.tokenizer()) == 4096
    assert [type(r) for r in module.regularizers] == [TREP]
    # "after" is a validation on the last iteration
    assert cfg.trainer.max_steps % cfg.trainer.val_check_interval == 0


def test_sweep_preset(tmp_path) -> None:
    cfg = _compose([f"output_dir={tmp_path}", "experiment=quickstart_sweep"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    regs = params.regularizers.split(",")
    assert regs == ["none", "ent", "tre_k", "tre_p", "min_ent", "forking", "kl_cov"]
    assert params.seed.split(",") == ["0", "1", "2"]
    conf = Path(tre_lightning.conf.__file__).parent
    for name in regs:
        assert (conf / "regularizers" / f"{name}.yaml").is_file(), name
    assert cfg.hydra.runtime.choices.model == "embedded"
    assert cfg.validate_first is True


def test_tre_train_quickstart_writes_the_report(tmp_path, capsys) -> None:
    from tre_lightning.cli.train import run

    cfg = _compose([f"output_dir={tmp_path}", f"model.policy.cache_dir={tmp_path / 'cache'}", *TINY])
    run(cfg)
    out = capsys.readouterr().out
    report = tmp_path / "report"
    assert "Pass@1" in out and "before" in out and "after" in out and "final P̄max" in out
    assert str(report / "metrics.csv") in out and str(report / "curves.png") in out

    with open(report / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert rows[0]["val_score"] != "" and rows[0]["reward"] == ""  # validation before training
    assert rows[1]["val_score"] == "" and rows[1]["p_max"] != ""
    assert rows[2]["val_score"] != ""  # and after
    assert all(0.0 < float(r["p_max"]) <= 1.0 for r in rows[1:])
    assert (report / "curves.png").read_bytes()[:8] == PNG
    summary = json.loads((report / "summary.json").read_text())
    assert summary["after_step"] == 2 and summary["meta"]["regularizers"] == "TREP"
    assert summary["before"] == pytest.approx(float(rows[0]["val_score"]))
    # the warm start was cached where the config said
    assert len(list((tmp_path / "cache").glob("warmstart-*/config.json"))) == 1
    # tre-plot can read it back, with the regularizer label from Hydra's config when present
    run_back = load_run(tmp_path)
    assert run_back is not None and run_back.history.val == {0: summary["before"], 2: summary["after"]}


def _script(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        pytest.skip(f"console script {name} not installed")
    return found


@pytest.mark.slow
def test_sweep_subset_then_tre_plot(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    env = {**os.environ, "TRE_LIGHTNING_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [_script("tre-train"), "-m", "experiment=quickstart_sweep", "regularizers=none,tre_p", "seed=0",
           f"hydra.sweep.dir={sweep}", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run report") == 2
    assert len(list((tmp_path / "cache").glob("warmstart-*/config.json"))) == 1  # trained once, shared

    out = tmp_path / "plots" / "sweep.png"
    plot = subprocess.run([_script("tre-plot"), str(sweep), "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert plot.returncode == 0, plot.stderr
    assert out.read_bytes()[:8] == PNG
    table = out.with_suffix(".md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| setting")]
    assert [ln.split("|")[1].strip() for ln in lines] == ["none", "tre_p"]
    assert "±" in table and table in plot.stdout + "\n"
