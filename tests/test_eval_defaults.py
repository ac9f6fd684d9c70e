"""tre-eval takes its evaluation settings from the checkpoint and reproduces training's validation
without repeating the flags (issue 16)."""

from __future__ import annotations

import argparse
import csv

import pytest
from hydra import compose, initialize_config_module

from test_entry_points import TINY


def _last(path, key: str) -> float:
    with open(path, newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key, "") != ""][-1]


def test_tre_eval_reproduces_validation_with_the_checkpoints_settings(tmp_path, capsys) -> None:
    """Only --checkpoint and the task: n, temperature, top-p, max_new_tokens, batch size, seed and the
    prompt length come from the checkpoint (evaluation=tiny differs from EvalConfig() in n, max_new_tokens,
    batch size), and Pass@1 / response length equal the last validation of the run.

    Fails before issue 16 (checked): tre-eval then used EvalConfig()'s n=8, max_new_tokens=512 and
    max_prompt_length 1024, and the numbers differed."""
    from tre_lightning.cli.evaluate import run as tre_eval
    from tre_lightning.cli.train import run

    overrides = [f"output_dir={tmp_path}", "regularizers=none", "evaluation.n=3", "evaluation.temperature=0.9",
                 "evaluation.seed=7", *TINY]
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run(cfg)
    capsys.readouterr()
    got = tre_eval(["--checkpoint", str(tmp_path / "checkpoints" / "last.ckpt"), "--task", "countdown",
                    "--override", "task.train_size=32", "task.val_size=4"])
    printed = capsys.readouterr().out
    assert "tre-eval settings: n=3 (checkpoint), temperature=0.9 (checkpoint)" in printed
    assert "seed=7 (checkpoint)" in printed and "max_prompt_length=512 (checkpoint)" in printed
    metrics = tmp_path / "csv" / "metrics.csv"
    assert got["samples"] == 3 * got["prompts"]
    assert got["val/pass@1"] == pytest.approx(_last(metrics, "val/pass@1"))
    assert got["val/response_length"] == pytest.approx(_last(metrics, "val/response_length"))


def test_flags_override_the_checkpoint_and_defaults_apply_without_one() -> None:
    from tre_lightning.cli.evaluate import _parser, resolve_settings
    from tre_lightning.evaluation import EvalConfig

    args = _parser().parse_args(["--model", "x", "--task", "countdown", "--n", "2"])
    cfg, prompt, source = resolve_settings(args)
    d = EvalConfig()
    assert (cfg.n, source["n"]) == (2, "flag")
    assert (cfg.top_p, source["top_p"]) == (d.top_p, "default") and (prompt, source["max_prompt_length"]) == (
        1024, "default")
    assert isinstance(args, argparse.Namespace)
