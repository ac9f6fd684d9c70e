"""Resuming into the same run folder keeps the CSV history: every step once, the earlier rows untouched."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from test_module_support import CharTask, fit, tiny_module, trainer

from tre_lightning.training.csv_logger import ResumableCSVLogger

N_STEPS, K = 4, 2


def _module():
    return tiny_module(CharTask(n_train=8, binary=True), n=2, batch_size=4, mini_batch_size=2, micro_batch_size=2,
                       max_new_tokens=6, seed=3)


def _train_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return [row for row in csv.DictReader(file) if row.get("reward/mean")]


def _fit(folder: Path, max_steps: int, ckpt_path: str | None = None) -> None:
    logger = ResumableCSVLogger(save_dir=str(folder), name="csv", version="", flush_logs_every_n_steps=1)
    checkpoint = ModelCheckpoint(dirpath=folder / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                 filename="{step}")
    fit(trainer(folder, max_steps=max_steps, logger=logger, callbacks=[checkpoint], enable_checkpointing=True),
        _module(), ckpt_path=ckpt_path)


def test_resume_into_the_same_folder_appends_and_logs_every_step_once(tmp_path) -> None:
    """k steps, a step the "killed" run logged after its checkpoint, resume from step k, N - k steps.

    Checked against Lightning's behaviour (the mutant without the ``_check_log_dir_exists`` override), which
    deletes ``metrics.csv`` when the resumed run's writer starts (only the resumed steps remain), and against
    appending without dropping the rows of the re-run step (step K + 1 twice).
    """
    _fit(tmp_path, K + 1)  # the first run gets one step past the checkpoint it is resumed from
    metrics = tmp_path / "csv" / "metrics.csv"
    before = _train_rows(metrics)
    assert len(before) == K + 1
    _fit(tmp_path, N_STEPS, ckpt_path=str(tmp_path / "ckpt" / f"step={K}.ckpt"))
    after = _train_rows(metrics)
    steps = [int(row["step"]) for row in after]
    assert len(steps) == N_STEPS and steps == sorted(set(steps)), steps
    assert [int(r["step"]) for r in before[:K]] == steps[:K]
    assert [r["reward/mean"] for r in before[:K]] == [r["reward/mean"] for r in after[:K]]  # the earlier rows kept
