"""The `tensorboard` and `wandb` extras install what Lightning's loggers import; the loggers write offline."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _extra(name: str) -> list[str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return [re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in extras[name]]


def test_extras_name_the_packages_lightning_checks_for() -> None:
    """Lightning's TensorBoardLogger needs `tensorboard` (or tensorboardX), WandbLogger needs `wandb`."""
    assert "tensorboard" in _extra("tensorboard")
    assert "wandb" in _extra("wandb")
    assert {"tensorboard", "wandb"} <= set(_extra("dev"))


def test_tensorboard_logger_writes_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="tensorboard", version="")
    logger.log_metrics({"reward/mean": 0.5}, step=0)
    logger.finalize("success")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_config_is_offline_by_default() -> None:
    import yaml

    node = yaml.safe_load((ROOT / "conf" / "logger" / "wandb.yaml").read_text())["wandb"]
    assert node["_target_"] == "lightning.pytorch.loggers.WandbLogger" and node["offline"] is True
