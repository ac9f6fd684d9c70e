"""Entry points: tre-train (Hydra, also -m sweeps), tre-lightning (Lightning CLI), tre-eval."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

TINY = [
    "model=tiny_random",
    "task=countdown",
    "task.train_size=32",
    "task.val_size=4",
    "rollout=tiny",
    "rollout.max_prompt_length=512",
    "ppo=tiny",
    "optim=tiny",
    "evaluation=tiny",
    "trainer=cpu",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.checkpoint.every_n_train_steps=1",
]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _last(rows, key) -> float:
    return [float(r[key]) for r in rows if r.get(key, "") != ""][-1]


def _script(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        pytest.skip(f"console script {name} not installed")
    return found


def test_tre_train_run_and_tre_eval(tmp_path) -> None:
    from tre_lightning.cli.evaluate import run as tre_eval
    from tre_lightning.cli.train import run

    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", "regularizers=tre_k", *TINY])
    run(cfg)

    rows = _rows(tmp_path / "csv" / "metrics.csv")
    assert _last(rows, "policy/p_max") > 0
    assert 0.0 <= _last(rows, "val/pass@1") <= 1.0
    assert (tmp_path / "csv" / "samples.csv").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "hf_model" / "config.json").is_file()

    common = ["--task", "countdown", "--override", "task.train_size=32", "task.val_size=4", "--n", "2",
              "--max-new-tokens", "8", "--batch-size", "2", "--max-examples", "4", "--max-prompt-length", "512"]
    from_ckpt = tre_eval(["--checkpoint", str(tmp_path / "checkpoints" / "last.ckpt"), *common])
    from_hf = tre_eval(["--model", str(tmp_path / "hf_model"), *common])
    assert from_ckpt == from_hf  # same weights, same seed: the same samples
    assert from_ckpt["prompts"] == 4 and from_ckpt["samples"] == 8
    # the module's validation at the last step ran the same protocol on the same weights
    assert from_ckpt["val/response_length"] == pytest.approx(_last(rows, "val/response_length"))
    assert from_ckpt["val/pass@1"] == pytest.approx(_last(rows, "val/pass@1"))


def test_tre_train_help_lists_groups() -> None:
    proc = subprocess.run([_script("tre-train"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("regularizers:", "tre_p", "tre_k", "model:", "tiny_random", "ppo:", "trainer:", "-m regularizers="):
        assert word in proc.stdout, word


def test_tre_train_sweep_one_folder_per_run(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    args = [_script("tre-train"), "-m", "regularizers=none,tre_p", "seed=0", *TINY, "trainer.max_steps=1",
            "trainer.val_check_interval=1", f"hydra.sweep.dir={sweep}", "export_hf=null"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 2, runs
    assert [r.name for r in runs] == ["0_none_seed0", "1_tre_p_seed0"]
    for run in runs:
        rows = _rows(run / "csv" / "metrics.csv")
        assert _last(rows, "policy/p_max") > 0
        assert (run / ".hydra" / "config.yaml").is_file()
    assert "tre_p_entropy" in (runs[1] / "csv" / "metrics.csv").read_text()
    assert "tre_p_entropy" not in (runs[0] / "csv" / "metrics.csv").read_text()


LIGHTNING_TINY = [
    "--model.model.policy", "tre_lightning.models.TinyRandomSource",
    "--model.model.policy.hidden_size", "32",
    "--model.task.init_args.n_train", "32",
    "--model.task.init_args.n_val", "4",
    "--model.rollout.n", "2",
    "--model.rollout.max_new_tokens", "8",
    "--model.ppo.batch_size", "4",
    "--model.ppo.mini_batch_size", "2",
    "--model.ppo.micro_batch_size", "4",
    "--model.evaluation.n", "2",
    "--model.evaluation.max_new_tokens", "8",
    "--model.evaluation.batch_size", "2",
    "--model.evaluation.max_examples", "4",
    "--trainer.max_steps", "2",
    "--trainer.val_check_interval", "2",
    "--trainer.accelerator", "cpu",
    "--trainer.enable_progress_bar", "false",
]


def test_lightning_cli_fit_with_example_config(tmp_path, monkeypatch) -> None:
    from tre_lightning.cli.lightning import EXAMPLE_CONFIG, run

    monkeypatch.chdir(tmp_path)  # the example writes under runs/example
    cli = run(["fit", "--config", str(EXAMPLE_CONFIG), *LIGHTNING_TINY])
    assert cli.trainer.global_step == 2
    rows = _rows(tmp_path / "runs" / "example" / "csv" / "metrics.csv")
    assert _last(rows, "policy/p_max") > 0
    assert "val/pass@1" in rows[0]
    assert (tmp_path / "runs" / "example" / "checkpoints" / "last.ckpt").is_file()
    assert type(cli.model.regularizers[0]).__name__ == "TREP"


def test_lightning_cli_help_lists_regularizers(capsys) -> None:
    from tre_lightning.cli.lightning import run

    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("Ent", "TREK", "TREP", "MinEnt", "ForkingTokens", "KLCov", "ClipCov", "--model.regularizers"):
        assert name in out, name


def test_tre_eval_help(capsys) -> None:
    from tre_lightning.cli.evaluate import run

    with pytest.raises(SystemExit):
        run(["--help"])
    out = capsys.readouterr().out
    assert "top-p 0.7" in out and "--checkpoint" in out and "--model" in out
