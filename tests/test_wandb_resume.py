"""The W&B run id in the checkpoint; a resumed run continues the same W&B run (offline, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("wandb")  # the `wandb` extra (part of `dev`)

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from test_module_support import CharTask, fit, tiny_module, trainer  # noqa: E402

from tre_lightning.training.wandb_resume import WandbRunId, continue_wandb_runs, stored_run_ids  # noqa: E402


def test_continue_sets_the_stored_id_on_a_logger_not_started(tmp_path: Path) -> None:
    ckpt = tmp_path / "x.ckpt"
    torch.save({"callbacks": {"WandbRunId": {"run_ids": ["abc123"]}}}, ckpt)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    assert continue_wandb_runs([logger], str(ckpt)) == ["abc123"]
    assert logger.version == "abc123" and logger._wandb_init["resume"] == "allow"
    chosen = WandbLogger(save_dir=str(tmp_path), offline=True, project="t", id="mine")
    assert continue_wandb_runs([chosen], str(ckpt)) == [] and chosen.version == "mine"  # the user's id wins
    assert continue_wandb_runs([logger], None) == []
    torch.save({"callbacks": {}}, tmp_path / "old.ckpt")
    assert stored_run_ids(str(tmp_path / "old.ckpt")) == []


@pytest.mark.slow
def test_resumed_fit_continues_the_same_offline_wandb_run(tmp_path: Path, monkeypatch) -> None:
    """Two fits, the second resumed from the first's checkpoint: one W&B run id for both.

    Checked against the unfixed state (no continue_wandb_runs): the second fit gets a new id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def run(steps: int, ckpt: str | None) -> str:
        logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="tre-test")
        continue_wandb_runs([logger], ckpt)
        callbacks = [WandbRunId(), ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True,
                                                   every_n_train_steps=1)]
        t = trainer(tmp_path, max_steps=steps, logger=logger, enable_checkpointing=True, callbacks=callbacks)
        fit(t, tiny_module(CharTask()), ckpt_path=ckpt)
        run_id = str(logger.version)
        logger.experiment.finish()
        return run_id

    first = run(1, None)
    assert stored_run_ids(str(tmp_path / "ckpt" / "last.ckpt")) == [first]
    second = run(2, str(tmp_path / "ckpt" / "last.ckpt"))
    assert second == first
