"""Inputs that used to fail late or with a traceback: each is a one-line refusal at start-up, before any model.

Every case of ``CASES`` goes through both entry points in-process (``tre-train``'s
``run`` on the composed config, ``tre-lightning``'s ``run`` with the arguments)
with the spy of ``test_reliability_config`` (no ``PreTrainedModel`` may be
constructed); a few go through the real processes (exit status 2, one line, no
traceback). Each case's input was a traceback or a late failure before this
file existed (issue 15): a ``ZeroDivisionError`` after the first iteration, a
MisconfigurationException inside ``fit``, "2.5" run as 3 steps,
``IsADirectoryError``, ``UnpicklingError``, ``PytorchStreamReader``, a
prompt refused at the first batch, a safetensors error while loading, a
tokenizer crash on a lone surrogate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_reliability_config import (  # noqa: F401 - fixtures
    CLI_BASE_YAML,
    HYDRA_BASE,
    _assert_clear,
    _cli,
    _compose,
    _rows_file,
    _script,
    _spawn,
    cli_config,
    hydra_ctx,
    spy,
)

from tre_lightning.checks import ConfigError
from tre_lightning.tasks import DataError


def _checkpoint(folder: Path) -> Path:
    path = folder / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64)}, "epoch": 0}, path)
    return path


def ckpt_folder(tmp: Path) -> Path:
    (tmp / "run_folder").mkdir()
    return tmp / "run_folder"


def ckpt_empty(tmp: Path) -> Path:
    (tmp / "empty.ckpt").write_bytes(b"")
    return tmp / "empty.ckpt"


def ckpt_truncated(tmp: Path) -> Path:
    data = _checkpoint(tmp).read_bytes()
    (tmp / "half.ckpt").write_bytes(data[: len(data) // 2])
    return tmp / "half.ckpt"


def ckpt_foreign(tmp: Path) -> Path:
    (tmp / "notes.ckpt").write_text("these are not weights\n")
    return tmp / "notes.ckpt"


def _tiny_folder(tmp: Path) -> Path:
    from tre_lightning.models import TinyRandomSource

    folder = tmp / "tiny_model"
    source = TinyRandomSource(hidden_size=32, intermediate_size=64)
    source.causal_lm().save_pretrained(folder)
    source.tokenizer().save_pretrained(folder)
    return folder


def model_bad_json(tmp: Path) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2",')
    return folder


def model_unknown_type(tmp: Path) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen9000"}))
    return folder


def model_truncated_weights(tmp: Path) -> Path:
    folder = _tiny_folder(tmp)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    return folder


def surrogate_rows(tmp: Path) -> Path:
    path = tmp / "countdown.jsonl"
    path.write_text('{"target": 3, "nums": [1, 2]}\n{"target": 5, "nums": [1, 4], "note": "x\\ud800y"}\n')
    return path


@dataclass
class Case:
    """One bad input: Hydra overrides and CLI arguments (``{x}`` is replaced by the path ``make`` returns)."""

    id: str
    hydra: list[str]
    cli: list[str]
    key: str
    says: str
    make: Callable[[Path], Path] | None = None
    cli_key: str | None = None
    cli_says: str | None = None
    data_error: bool = False


_CKPT = "ckpt_path={x}"
_MODEL_H = ["model=pretrained", "model.policy.path={x}", "model.policy.dtype=float32"]
_MODEL_C = ["--model.model.policy=tre_lightning.models.PretrainedSource", "--model.model.policy.path={x}"]
CASES = [
    # Trainer settings that failed only inside fit (or were accepted)
    Case("val_check_interval=0", ["trainer.val_check_interval=0"], ["--trainer.val_check_interval=0"],
         "trainer.val_check_interval", "an int >= 1 (PPO iterations between validations), a float in (0, 1]"),
    Case("gradient_clip_val=1.0", ["+trainer.gradient_clip_val=1.0"], ["--trainer.gradient_clip_val=1.0"],
         "trainer.gradient_clip_val", "PPO optimizes manually: clip the gradient norm with ppo.max_grad_norm"),
    Case("accumulate_grad_batches=2", ["+trainer.accumulate_grad_batches=2"],
         ["--trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches",
         "PPO optimizes manually: gradients are accumulated over ppo.micro_batch_size"),
    Case("max_steps=2.5", ["trainer.max_steps=2.5"], ["--trainer.max_steps=2.5"], "trainer.max_steps",
         "an int >= -1", cli_says="expected int, got '2.5'"),
    Case("max_steps=abc", ["trainer.max_steps=abc"], ["--trainer.max_steps=abc"], "trainer.max_steps",
         "an int >= -1", cli_says="expected int, got 'abc'"),
    # resume paths that are not checkpoints
    Case("ckpt_path is a folder", [_CKPT], ["--ckpt_path={x}"], "ckpt_path", "is a folder, not a checkpoint",
         ckpt_folder),
    Case("ckpt_path is empty", [_CKPT], ["--ckpt_path={x}"], "ckpt_path", "is an empty file", ckpt_empty),
    Case("ckpt_path is truncated", [_CKPT], ["--ckpt_path={x}"], "ckpt_path", "truncated, or not written by torch",
         ckpt_truncated),
    Case("ckpt_path is not a checkpoint", [_CKPT], ["--ckpt_path={x}"], "ckpt_path", "is not a readable checkpoint",
         ckpt_foreign),
    # prompts longer than the limit, with prompt_overflow=error
    Case("prompt longer than max_prompt_length", ["rollout.max_prompt_length=8", "rollout.prompt_overflow=error"],
         ["--model.rollout.max_prompt_length=8", "--model.rollout.prompt_overflow=error"],
         "rollout.max_prompt_length", "16 of 16 train prompts are longer than 8 tokens"),
    # broken model folders
    Case("config.json is not JSON", _MODEL_H, _MODEL_C, "model.policy.path", "config.json' is not valid JSON",
         model_bad_json),
    Case("unknown model_type", _MODEL_H, _MODEL_C, "model.policy.path", "model_type 'qwen9000' is not known",
         model_unknown_type),
    Case("truncated safetensors", _MODEL_H, _MODEL_C, "model.policy.path", "(truncated: copy or download it again)",
         model_truncated_weights),
    # data that is JSON but not text
    Case("lone surrogate in a row", ["task.train_path={x}", "task.train_size=null", "task.val_size=null"],
         ["--model.task.init_args.train_path={x}", "--model.task.init_args.train_size=null",
          "--model.task.init_args.val_size=null"], "line 2", "not valid text: a lone surrogate '\\ud800'",
         surrogate_rows, data_error=True),
]


def _args(case: Case, args: list[str], tmp_path: Path) -> list[str]:
    if case.make is None:
        return args
    x = case.make(tmp_path)
    return [a.replace("{x}", str(x)) for a in args]


def _expected_cli_key(case: Case) -> str:
    if case.cli_key is not None:
        return case.cli_key
    return case.key if case.key.startswith(("trainer.", "ckpt_path", "line")) else "model." + case.key


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_at_start_up_by_tre_train(case: Case, spy, hydra_ctx, tmp_path) -> None:  # noqa: F811
    from tre_lightning.cli.train import run

    cfg = _compose(_args(case, case.hydra, tmp_path), tmp_path)
    spy.calls.clear()  # making the input may build a model (a saved tiny model)
    with pytest.raises(DataError if case.data_error else ConfigError) as info:
        run(cfg)
    _assert_clear(str(info.value), case.key, case.says)
    assert "\n" not in str(info.value)
    assert not any(c.startswith("model ") for c in spy.calls)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_at_start_up_by_tre_lightning(case: Case, spy, cli_config, monkeypatch,  # noqa: F811
                                              tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    args = _args(case, case.cli, tmp_path)
    spy.calls.clear()  # making the input may build a model (a saved tiny model)
    with pytest.raises(DataError if case.data_error else ConfigError) as info:
        _cli(cli_config, args)
    _assert_clear(str(info.value), _expected_cli_key(case), case.cli_says or case.says)
    assert "\n" not in str(info.value)
    assert not any(c.startswith("model ") for c in spy.calls)


def test_the_checks_pass_what_is_valid(tmp_path) -> None:
    """No false alarms: a complete checkpoint, a distributed checkpoint folder, a saved tiny model, fitting prompts."""
    from tre_lightning.models.folder_checks import check_model_folder
    from tre_lightning.training.checkpoint_io import check_resume_path
    from tre_lightning.training.trainer_args import check_trainer_args, trainer_settings

    check_resume_path(_checkpoint(tmp_path), "ckpt_path")
    dcp = tmp_path / "sharded.ckpt"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"x")
    check_resume_path(dcp, "ckpt_path")
    check_model_folder(_tiny_folder(tmp_path))
    for ok in ({"val_check_interval": 2}, {"val_check_interval": 0.5}, {"max_steps": -1}, {"gradient_clip_val": 0},
               {"accumulate_grad_batches": 1}, {"max_steps": 400, "val_check_interval": None}):
        check_trainer_args(ok)
    from lightning.pytorch import Trainer

    check_trainer_args(trainer_settings(Trainer(logger=False, max_steps=3, enable_progress_bar=False)))
    with pytest.raises(ConfigError, match="trainer.gradient_clip_val"):
        check_trainer_args(trainer_settings(Trainer(logger=False, gradient_clip_val=0.5, enable_progress_bar=False)))


def test_prompt_check_accepts_prompts_that_fit(hydra_ctx, tmp_path) -> None:
    """The prompt check refuses exactly when a prompt is longer than the limit (at the limit: accepted)."""
    from tre_lightning.cli.train import build
    from tre_lightning.training.data import _encode, check_prompt_lengths

    data = build(_compose(["rollout.prompt_overflow=error", "rollout.max_prompt_length=4096"], tmp_path)).datamodule
    longest = max(len(ids) for ids in _encode(data.tokenizer, data.task, data.task.train_examples()))
    data.max_prompt_length = longest
    check_prompt_lengths(data)
    data.max_prompt_length = longest - 1
    with pytest.raises(ConfigError, match=f"rollout.max_prompt_length: [0-9]+ of 16 train prompts .* {longest} "):
        check_prompt_lengths(data)
    data.prompt_overflow = "truncate_left"
    check_prompt_lengths(data)


# --------------------------------------------------------------------------- the real processes

PROCESS_CASES = ["val_check_interval=0", "ckpt_path is truncated", "truncated safetensors", "lone surrogate in a row"]
_SLOW = pytest.mark.slow  # a process start takes 10-60 s on a loaded machine: one per entry point by default


@pytest.mark.parametrize("case_id", [pytest.param(PROCESS_CASES[0], marks=_SLOW), PROCESS_CASES[1],
                                     pytest.param(PROCESS_CASES[2], marks=_SLOW), PROCESS_CASES[3]])
def test_processes_print_one_line_and_exit_2(case_id: str, tmp_path) -> None:
    """``tre-train`` for the first two, ``tre-lightning`` for the last two (both print the same lines in-process)."""
    case = next(c for c in CASES if c.id == case_id)
    if PROCESS_CASES.index(case_id) < 2:
        prog, key = "tre-train", case.key
        cmd = [*_script(prog), *HYDRA_BASE, *_args(case, case.hydra, tmp_path), f"hydra.run.dir={tmp_path / 'run'}"]
    else:
        prog, key = "tre-lightning", _expected_cli_key(case)
        config = tmp_path / "base.yaml"
        config.write_text(CLI_BASE_YAML)
        cmd = [*_script(prog), "fit", "--config", str(config), *_args(case, case.cli, tmp_path)]
    proc, marker = _spawn(cmd, tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not marker.exists()
    last = proc.stderr.strip().splitlines()[-1]
    kind = "invalid data" if case.data_error else "invalid configuration"
    assert last.startswith(f"{prog}: error: {kind}: ")
    _assert_clear(last, key, case.says)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["foo=1"], pytest.param(["regularizers=nope"], marks=_SLOW),
                                  pytest.param(["trainer.bogus=1"], marks=_SLOW)],
                         ids=["unknown key", "unknown group option", "key that needs +"])
def test_hydra_composition_errors_exit_2(args: list[str], tmp_path) -> None:
    """Hydra's own refusals (before the run starts) are configuration errors: status 2, no traceback.

    Checked against the mutant ``hydra_exit_status = lambda code, started: code`` (they exit 1 there).
    """
    import subprocess

    proc = subprocess.run([*_script("tre-train"), *args, f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("tre-train: error: invalid configuration: Hydra could not "
                                                     "compose the config or create the run folder (its message "
                                                     "is above)")
    assert "nope" in proc.stderr or "bogus" in proc.stderr or "foo" in proc.stderr


EVAL_CASES = [
    ("missing checkpoint", lambda tmp: ["--checkpoint", str(tmp / "nope.ckpt")], "--checkpoint", "does not exist"),
    ("truncated checkpoint", lambda tmp: ["--checkpoint", str(ckpt_truncated(tmp))], "--checkpoint",
     "truncated, or not written by torch.save"),
    ("checkpoint folder", lambda tmp: ["--checkpoint", str(ckpt_folder(tmp))], "--checkpoint",
     "is a folder, not a checkpoint"),
    ("missing model", lambda tmp: ["--model", str(tmp / "no_model")], "--model", "does not exist"),
    ("model with truncated weights", lambda tmp: ["--model", str(model_truncated_weights(tmp))], "--model",
     "(truncated: copy or download it again)"),
]


@pytest.mark.parametrize(("name", "source", "key", "says"), EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_tre_eval_refuses_in_one_line_with_status_2(name, source, key, says, spy, tmp_path,  # noqa: F811
                                                    capsys) -> None:
    """``tre-eval`` (its ``main``, what the console script runs): one line on stderr, status 2, no model built.

    Before issue 15 each was a traceback (FileNotFoundError, PytorchStreamReader, IsADirectoryError,
    SafetensorsError); checked against the mutant with both calls of ``check_sources`` removed (all 5 fail).
    """
    from tre_lightning.cli.evaluate import main

    args = source(tmp_path)
    spy.calls.clear()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*args, "--task", "countdown", "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"tre-eval: error: invalid configuration: {key}: "), err
    assert says in err
    assert not any(c.startswith("model ") for c in spy.calls)


@pytest.mark.parametrize("failure", ["full disk (torch's message)", "ENOSPC", "read-only folder"])
def test_a_checkpoint_that_cannot_be_written_is_one_line(failure: str, tmp_path, monkeypatch, capsys) -> None:
    """A full disk or a read-only run folder while saving: one line naming the path and the cause, status 2,
    and the previous checkpoint intact.

    Checked against the mutant ``_write_failure = lambda err, path: None`` (torch's "unexpected pos 64 vs 0"
    and the raw OSError come through, and ``exit_on_error`` re-raises them).
    """
    import errno

    from tre_lightning.cli.errors import exit_on_error
    from tre_lightning.training import checkpoint_io

    target = tmp_path / "last.ckpt"
    checkpoint_io.atomic_save({"step": 1}, target)
    if failure == "read-only folder":
        def fail(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(checkpoint_io.tempfile, "mkstemp", fail)
        why = "read-only file system (EROFS)"
    else:
        def fail(obj, file, target):
            file.write(b"x" * 64)
            if failure == "ENOSPC":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

        monkeypatch.setattr(checkpoint_io, "_dump", fail)
        monkeypatch.setattr(checkpoint_io, "_free_bytes", lambda folder: 4096)
        why = "no space left on the device (ENOSPC)"
    capsys.readouterr()
    with pytest.raises(SystemExit) as info, exit_on_error("tre-train"):
        try:
            checkpoint_io.AtomicCheckpointIO().save_checkpoint({"step": 2}, str(target))
        except Exception as err:  # Lightning's loop re-raises it wrapped in nothing; a wrapper must not matter
            raise RuntimeError("while saving") from err
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tre-train: error: cannot write the checkpoint "), err
    assert str(target) in err and why in err and "Traceback" not in err
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert list(tmp_path.iterdir()) == [target]


def test_a_failed_write_with_space_left_is_not_called_a_full_disk(tmp_path, monkeypatch) -> None:
    """Control: another error while saving (plenty of space) keeps its own type and message."""
    from tre_lightning.training import checkpoint_io

    def fail(obj, file, target):
        raise RuntimeError("something else")

    monkeypatch.setattr(checkpoint_io, "_dump", fail)
    monkeypatch.setattr(checkpoint_io, "_free_bytes", lambda folder: 10 << 30)
    with pytest.raises(RuntimeError, match="^something else$"):
        checkpoint_io.atomic_save({"step": 2}, tmp_path / "last.ckpt")
