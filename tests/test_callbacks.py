"""Callbacks: P-max monitor, diagnostics, sample logger (CSV and the active logger's text view)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from lightning.pytorch.loggers.logger import Logger
from test_module_support import CharTask, tiny_module, fit, trainer, validate

from tre_lightning.callbacks import PMaxMonitor, SampleLogger


class _Experiment:
    def __init__(self) -> None:
        self.texts: list[tuple[str, str, int]] = []

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        self.texts.append((tag, text, global_step))


class FakeTensorBoard(Logger):
    """Records metrics and text like TensorBoardLogger (``experiment.add_text``)."""

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self._exp = _Experiment()
        self._dir = save_dir
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "fake"

    @property
    def version(self) -> int:
        return 0

    @property
    def log_dir(self) -> str:
        return self._dir

    @property
    def experiment(self) -> _Experiment:
        return self._exp

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics, step=step))


class FakeWandb(FakeTensorBoard):
    """Has ``log_text`` like WandbLogger."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(save_dir)
        self.tables: list[dict[str, Any]] = []

    def log_text(self, key: str, columns: list[str], data: list[list[Any]], step: int | None = None) -> None:
        self.tables.append({"key": key, "columns": columns, "data": data, "step": step})


def test_module_logs_every_metric_every_step_and_pmax_keeps_its_history(tmp_path) -> None:
    logger = FakeTensorBoard(str(tmp_path))
    pmax = PMaxMonitor()
    t = trainer(tmp_path, max_steps=3, logger=logger, callbacks=[pmax])
    fit(t, tiny_module(CharTask(binary=True)))
    steps = [m for m in logger.metrics if "policy/p_max" in m]
    assert [m["step"] for m in steps] == [0, 1, 2]  # logged once per PPO iteration
    assert [m["policy/p_max"] for m in steps] == pytest.approx([v for _, v in pmax.history])
    for key in ("policy/entropy", "reward/mean", "train/grad_norm_critic", "value/explained_variance"):
        assert all(key in m for m in steps), key
    # the progress bar shows reward and P-max
    bar = t.progress_bar_metrics
    assert "policy/p_max" in bar and "reward/mean" in bar


def test_module_logs_p_max_without_any_callback(tmp_path) -> None:
    logger = FakeTensorBoard(str(tmp_path))
    fit(trainer(tmp_path, max_steps=1, logger=logger, callbacks=[]), tiny_module(CharTask()))
    assert any("policy/p_max" in m for m in logger.metrics)


def test_sample_logger_text_views(tmp_path) -> None:
    tb, wb = FakeTensorBoard(str(tmp_path / "tb")), FakeWandb(str(tmp_path / "wb"))
    samples = SampleLogger(every_n_steps=1, max_rows=2)
    fit(trainer(tmp_path, max_steps=2, logger=[tb, wb], callbacks=[samples]), tiny_module(CharTask(binary=True)))
    assert [step for _, _, step in tb.experiment.texts] == [1, 2]
    tag, text, _ = tb.experiment.texts[0]
    assert tag == "samples" and text.startswith("| prompt | response | reward |")
    assert text.count("\n") == 3  # header, rule, 2 rows
    assert [t["step"] for t in wb.tables] == [1, 2]
    assert wb.tables[0]["columns"] == ["step", "prompt", "response", "reward"] and len(wb.tables[0]["data"]) == 2
    # the CSV goes to the first logger's folder
    assert (tmp_path / "tb" / "samples.csv").is_file()


def test_sample_logger_validates() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        SampleLogger(every_n_steps=0)
    with pytest.raises(ValueError, match="max_rows"):
        SampleLogger(max_rows=0)


def test_every_logged_metric_is_documented_in_training_md(tmp_path) -> None:
    """docs/training.md's metric table names every metric an iteration logs (a new metric needs its row)."""
    from pathlib import Path

    logger = FakeTensorBoard(str(tmp_path))
    fit(trainer(tmp_path, max_steps=1, logger=logger, callbacks=[]), tiny_module(CharTask(binary=True)))
    logged = {k for m in logger.metrics for k in m if k not in ("step", "epoch") and not k.startswith("lr/")}
    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    documented = set(re.findall(r"`((?:policy|value|reward|train|perf)/[\w@]+)`", doc))
    assert "reward/score_timeouts" in logged and "reward/decode_failures" in logged
    assert sorted(logged - documented) == []
