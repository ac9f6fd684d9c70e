"""Cluster-friendly output: the PPO progress display, each log line once, no inapplicable advice."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
from test_module_support import CharTask, fit, tiny_module, trainer

from tre_lightning.callbacks import PPOProgress
from tre_lightning.callbacks.progress import format_metrics, iteration_line, wrap_fields
from tre_lightning.checks import ConfigError


def test_iteration_line_hand_written() -> None:
    fields = format_metrics({"reward/mean": 0.125, "val/pass@1": 0.5, "policy/approx_kl": 0.0012,
                             "unrelated": 3.0}, {"reward": ("reward/mean",), "pass@1": ("val/pass@1",),
                                                 "kl": ("train/ref_kl", "policy/approx_kl")})
    assert fields == ["reward 0.125", "pass@1 50.0%", "kl 1.20e-03"]
    assert iteration_line(3, 5, fields, 1.94, 65.0) == \
        "iteration 3/5 | reward 0.125 | pass@1 50.0% | kl 1.20e-03 | 1.94 s/it | eta 0:01:05"
    assert iteration_line(7, None, [], None, None) == "iteration 7"


def test_wrap_fields_keeps_fields_whole() -> None:
    assert wrap_fields(["aaaa", "bbb", "cc", "dddddddd"], width=10) == ["aaaa  bbb", "cc", "dddddddd"]
    assert wrap_fields(["x" * 12], width=10) == ["x" * 12]


def test_bad_arguments_are_keyed() -> None:
    with pytest.raises(ConfigError, match="width"):
        PPOProgress(width=5)
    with pytest.raises(ConfigError, match="plain"):
        PPOProgress(plain="yes")  # type: ignore[arg-type]


def test_plain_mode_one_line_per_iteration() -> None:
    """3 iterations of a real fit: exactly 3 iteration lines, numbered 1..3 of 3, with the step's metrics."""
    out = io.StringIO()
    module = tiny_module(CharTask())
    fit(trainer(max_steps=3, callbacks=[PPOProgress(stream=out)], limit_val_batches=0), module)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("iteration")]
    assert [line.split(" | ")[0] for line in lines] == ["iteration 1/3", "iteration 2/3", "iteration 3/3"]
    for line in lines:
        for label in ("reward", "p_max", "entropy", "approx_kl", "policy_loss", "value_loss", "s/it", "eta"):
            assert f" {label}" in line or line.endswith(label), (label, line)


def test_terminal_mode_wraps_at_width() -> None:
    """The rich display (forced) writes the bar and the metric lines, none wider than 80 columns."""
    out = io.StringIO()
    module = tiny_module(CharTask())
    fit(trainer(max_steps=2, callbacks=[PPOProgress(plain=False, stream=out)], limit_val_batches=0), module)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "iteration" in text and "2/2" in text and "p_max" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def _lightning_records(root_stream: io.StringIO) -> None:
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info(
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](x) to enable it")


def test_setup_logging_each_line_once_and_tip_dropped() -> None:
    """With a root handler (Hydra's), a Lightning INFO line prints once; the tip not at all.

    Checked against the unfixed state: without setup_logging the line appears twice (Lightning's
    own ``INFO: `` handler and the root handler) and the tip once per handler."""
    from tre_lightning.cli.logging_setup import setup_logging

    root, stream = logging.getLogger(), io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[root] %(message)s"))
    saved = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
             for name in ("lightning", "lightning.pytorch", "lightning.fabric")}
    # the state earlier tests of the same process may have left: a global logging.disable, disabled
    # or raised loggers (this test is about handlers and filters, not levels)
    chain = ("lightning", "lightning.pytorch", "lightning.pytorch.utilities", "lightning.pytorch.utilities.rank_zero")
    levels = {name: (logging.getLogger(name).level, logging.getLogger(name).disabled) for name in chain}
    disabled_below = logging.root.manager.disable
    logging.disable(logging.NOTSET)
    for name in chain:  # (benchmarks/ppo_iteration.py's main, run in-process by a test, raises rank_zero's level)
        logging.getLogger(name).disabled = False
        logging.getLogger(name).setLevel(logging.INFO if name == "lightning.pytorch" else logging.NOTSET)
    root.addHandler(handler)
    for name in saved:  # Lightning's own console handlers write into the same capture
        for own in logging.getLogger(name).handlers:
            if isinstance(own, logging.StreamHandler):
                own.setStream(stream)
    try:
        setup_logging()
        setup_logging()  # idempotent
        _lightning_records(stream)
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: something else")
    finally:
        root.removeHandler(handler)
        for name, (handlers, propagate) in saved.items():
            for own in handlers:
                if isinstance(own, logging.StreamHandler):
                    own.setStream(sys.stderr)
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
        for name, (level, disabled) in levels.items():
            logging.getLogger(name).setLevel(level)
            logging.getLogger(name).disabled = disabled
        logging.disable(disabled_below)
    captured = stream.getvalue()
    assert captured.count("GPU available: False, used: False") == 1
    assert "litlogger" not in captured
    assert "Tip: something else" in captured  # only the litlogger tip is dropped


def test_manual_checkpoint_warning_ignored_others_kept() -> None:
    from tre_lightning.cli.logging_setup import setup_logging

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        setup_logging()
        warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no "
                      "pre-optimization state was saved. The checkpoint will contain ...", UserWarning)
        warnings.warn("Using ModelCheckpoint with something else", UserWarning)
    assert [str(w.message) for w in seen] == ["Using ModelCheckpoint with something else"]


# ---------------------------------------------------------------------------- captured logs of real runs

_TINY_RUN = ["model=tiny_random", "task=countdown", "task.train_size=32", "task.val_size=4", "rollout=tiny",
             "rollout.max_prompt_length=512", "ppo=tiny", "optim=tiny", "evaluation=tiny", "trainer=cpu",
             "trainer.max_steps=5", "trainer.val_check_interval=5", "callbacks.checkpoint.every_n_train_steps=2"]


def _check_log(log: str, n: int) -> None:
    lines = [line.rstrip() for line in log.splitlines() if line.strip()]
    iterations = [line for line in lines if line.startswith("iteration ")]
    assert [line.split(" | ")[0] for line in iterations] == [f"iteration {i}/{n}" for i in range(1, n + 1)], log
    dupes = [line for line, count in Counter(lines).items() if count > 1]
    assert not dupes, dupes
    for noise in ("litlogger", "Epoch 0/", "def training_step", "pre-optimization state"):
        assert noise not in log, noise


@pytest.mark.slow
def test_tre_train_non_terminal_log(tmp_path: Path) -> None:
    """``tre-train`` with stdout/stderr piped (not a terminal): one line per iteration, no line twice.

    Checked against the unfixed state (Lightning's bar, no setup_logging): the test fails on the
    missing iteration lines, the doubled ``Seed set to 0`` and the litlogger tip."""
    out = subprocess.run([sys.executable, "-m", "tre_lightning.cli.train", *_TINY_RUN, f"output_dir={tmp_path}",
                          f"hydra.run.dir={tmp_path}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env={**os.environ, "PYTHONWARNINGS": "default"}, timeout=900)
    (tmp_path / "captured.log").write_text(out.stdout)
    assert out.returncode == 0, out.stdout[-3000:]
    _check_log(out.stdout, 5)


_CLI_TINY = ["--model.model.policy", "tre_lightning.models.TinyRandomSource",
             "--model.model.policy.hidden_size", "32", "--model.task.init_args.n_train", "32",
             "--model.task.init_args.n_val", "4", "--model.rollout.n", "2", "--model.rollout.max_new_tokens", "8",
             "--model.ppo.batch_size", "4", "--model.ppo.mini_batch_size", "2", "--model.ppo.micro_batch_size", "4",
             "--model.evaluation.n", "2", "--model.evaluation.max_new_tokens", "8",
             "--model.evaluation.batch_size", "2", "--model.evaluation.max_examples", "4",
             "--trainer.max_steps", "5", "--trainer.val_check_interval", "5", "--trainer.accelerator", "cpu"]


@pytest.mark.slow
def test_tre_lightning_non_terminal_log(tmp_path: Path) -> None:
    """``tre-lightning fit --config example.yaml`` piped: one line per iteration, no line twice."""
    from tre_lightning.cli.lightning import EXAMPLE_CONFIG

    out = subprocess.run([sys.executable, "-m", "tre_lightning.cli.lightning", "fit", "--config",
                          str(EXAMPLE_CONFIG), *_CLI_TINY], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=900)
    (tmp_path / "captured.log").write_text(out.stdout)
    assert out.returncode == 0, out.stdout[-3000:]
    _check_log(out.stdout, 5)
