"""``ckpt_path=auto`` (newest checkpoint of the run folder) and the CSV logger a resumed run appends to."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from tre_lightning.checks import ConfigError
from tre_lightning.training.auto_resume import newest_checkpoint, resolve_auto_resume
from tre_lightning.training.csv_logger import ResumableCSVLogger


def _touch(path: Path, mtime: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, ns=(mtime, mtime))
    return path


def test_newest_checkpoint_by_mtime_skipping_temporaries(tmp_path: Path) -> None:
    _touch(tmp_path / "a" / "step000002.ckpt", 2_000)
    newest = _touch(tmp_path / "b" / "step000004.ckpt", 4_000)
    _touch(tmp_path / "a" / ".last.ckpt.x1.tmp", 9_000)  # an interrupted atomic save
    _touch(tmp_path / "a" / ".hidden.ckpt", 9_000)
    _touch(tmp_path / "a" / "notes.txt", 9_000)
    assert newest_checkpoint([tmp_path / "a", tmp_path / "b", tmp_path / "missing"]) == newest
    assert newest_checkpoint([tmp_path / "missing"]) is None


def test_resolve_auto_resume(tmp_path: Path) -> None:
    trainer = SimpleNamespace(checkpoint_callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"))])
    assert resolve_auto_resume("auto", trainer, "ckpt_path") is None  # first launch: start fresh
    last = _touch(tmp_path / "ckpt" / "last.ckpt", 5_000)
    _touch(tmp_path / "ckpt" / "step000002.ckpt", 1_000)
    assert resolve_auto_resume("auto", trainer, "ckpt_path") == str(last)
    assert resolve_auto_resume("x.ckpt", trainer, "ckpt_path") == "x.ckpt"
    assert resolve_auto_resume(None, trainer, "ckpt_path") is None
    with pytest.raises(ConfigError, match="ckpt_path: auto resumes from the checkpoints of a ModelCheckpoint"):
        resolve_auto_resume("auto", SimpleNamespace(checkpoint_callbacks=[]), "ckpt_path")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resumed_csv_keeps_earlier_rows_and_each_step_once(tmp_path: Path) -> None:
    """Steps 0-4 logged, the run resumed from step 3: the file has 0-2 from the first run, 3-5 from the
    second, each once. Checked against Lightning's CSVLogger, which deletes the first run's rows (0-2)."""
    first = ResumableCSVLogger(tmp_path, name="csv", version="")
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step=step)
    first.save()
    second = ResumableCSVLogger(tmp_path, name="csv", version="")
    for step in range(3, 6):
        second.log_metrics({"loss": 10.0 + step, "val": 1.0}, step=step)
    second.save()
    rows = _rows(tmp_path / "csv" / "metrics.csv")
    assert [(int(r["step"]), float(r["loss"])) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0),
                                                                   (4, 14.0), (5, 15.0)]
    assert [r["val"] for r in rows] == ["", "", "", "1.0", "1.0", "1.0"]


_TINY = ["model=tiny_random", "task=countdown", "task.train_size=32", "task.val_size=4", "rollout=tiny",
         "rollout.max_prompt_length=512", "ppo=tiny", "optim=tiny", "evaluation=tiny", "trainer=cpu",
         "trainer.limit_val_batches=0", "validate_first=false", "callbacks=default", "callbacks.run_report=null",
         "callbacks.samples=null", "callbacks.checkpoint.every_n_train_steps=1", "export_hf=null", "ckpt_path=auto"]


@pytest.mark.slow
def test_tre_train_ckpt_auto_starts_fresh_then_resumes_into_the_same_folder(tmp_path: Path) -> None:
    def launch(steps: int) -> str:
        out = subprocess.run([sys.executable, "-m", "tre_lightning.cli.train", *_TINY, f"trainer.max_steps={steps}",
                              f"hydra.run.dir={tmp_path}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:]
        return out.stdout

    first = launch(2)
    assert "ckpt_path=auto: no checkpoint yet, starting fresh" in first
    second = launch(3)
    assert f"ckpt_path=auto: resuming from {tmp_path}/checkpoints/" in second
    assert [ln.split(" | ")[0] for ln in second.splitlines() if ln.startswith("iteration ")] == ["iteration 3/3"]
    steps = [int(r["step"]) for r in _rows(tmp_path / "csv" / "metrics.csv") if r.get("reward/mean")]
    assert steps == [0, 1, 2]  # both launches' iterations in the run folder's one file, each once


@pytest.mark.slow
def test_tre_lightning_ckpt_path_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_progress import _CLI_TINY

    from tre_lightning.cli.lightning import EXAMPLE_CONFIG, run

    monkeypatch.chdir(tmp_path)  # the example writes under runs/example
    (tmp_path / "every_step.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: tre_lightning.callbacks.PPOProgress\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args:\n"
        "        dirpath: runs/example/checkpoints\n        every_n_train_steps: 1\n        save_last: true\n")
    base = ["fit", "--config", str(EXAMPLE_CONFIG), "--config", "every_step.yaml", *_CLI_TINY,
            "--trainer.limit_val_batches", "0", "--ckpt_path", "auto"]
    first = run([*base, "--trainer.max_steps", "1"])
    assert first.trainer.global_step == 1 and first.trainer.ckpt_path is None
    second = run([*base, "--trainer.max_steps", "2"])
    assert second.trainer.global_step == 2
    assert second.trainer.ckpt_path is not None and "runs/example/checkpoints" in second.trainer.ckpt_path
