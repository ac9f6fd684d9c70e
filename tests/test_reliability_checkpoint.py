"""A crash loses at most the work since the last checkpoint; checkpoints are written atomically.

* Kill and resume: ``tre-train`` runs (tiny Countdown, a checkpoint every
  iteration) are SIGKILLed at several points (``KILL_POINTS``): between two
  iterations, after an update whose checkpoint is not written yet, and in the
  middle of writing ``last.ckpt``. Each resumes from its ``last.ckpt`` into a
  new folder and must end with the same weights, optimizer state and logged
  metrics (float tolerance, CPU) as a run that was never killed.
* Atomic saves: a crash while saving leaves the previous ``last.ckpt``
  intact and loadable; the atomic checkpoint IO is the default of both
  entry points.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tre_lightning.training.checkpoint_io as ckpt_mod
from tre_lightning.training.checkpoint_io import AtomicCheckpointIO, atomic_save, with_atomic_checkpoint_io

TESTS = Path(__file__).resolve().parent
MAX_STEPS = 4
RUN = [
    "experiment=tiny_countdown",
    "task.train_size=32",
    "task.val_size=4",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.samples=null",
    "callbacks.run_report=null",
    "validate_first=false",
    "export_hf=null",
]
# One run killed three times, each segment resumed from the previous one's last.ckpt into a new folder:
# (where it is paused and killed, at which iteration, the global step of its last.ckpt after the kill)
KILL_POINTS = [("between", 1, 1), ("save", 3, 2), ("after_update", 4, 3)]


def _command() -> list[str]:
    import shutil

    found = shutil.which("tre-train", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "tre_lightning.cli.train"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


def _args(out: Path, *extra: str) -> list[str]:
    return [*_command(), *RUN, f"hydra.run.dir={out}", f"output_dir={out}", *extra]


def _run(out: Path, *extra: str) -> None:
    proc = subprocess.run(_args(out, *extra), capture_output=True, text=True, timeout=300, env=_env(), cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _run_and_kill(out: Path, where: str, step: int, *more: str) -> subprocess.Popen:
    marker = out.parent / f"{out.name}.paused"
    extra = [*more, "+callbacks.killpoint._target_=_reliability_killpoint.KillPoint",
             f"+callbacks.killpoint.where={where}", f"+callbacks.killpoint.step={step}",
             f"+callbacks.killpoint.marker={marker}"]
    proc = subprocess.Popen(_args(out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=out.parent)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill point (rc {proc.returncode}): "
                                 f"{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the kill point was never reached")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return proc


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _metrics(out: Path) -> dict[int, dict[str, float]]:
    """Logged metrics by step (timings left out: they differ between any two runs)."""
    rows: dict[int, dict[str, float]] = {}
    with open(out / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for k, v in row.items():
                if v != "" and k not in ("step", "epoch") and not k.startswith("perf/"):
                    rows.setdefault(step, {})[k] = float(v)
    return rows


def _assert_close_metrics(got: dict[str, float], want: dict[str, float], step: int, complete: bool = True) -> None:
    if complete:
        assert got.keys() == want.keys(), (step, got.keys() ^ want.keys())
    assert got.keys() <= want.keys(), (step, got.keys() - want.keys())
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (step, k)


def _assert_same_final(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for p, state in oa["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(ob["state"][p][name], value, rtol=1e-5, atol=1e-6)
    assert a["PromptDataModule"]["data_position"] == b["PromptDataModule"]["data_position"]
    assert a["tre_lightning"]["rng"]["python"] == b["tre_lightning"]["rng"]["python"]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path) -> None:
    straight = tmp_path / "straight"
    background = subprocess.Popen(_args(straight), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env=_env(), cwd=tmp_path)  # the reference run, alongside the killed ones
    resume_from: Path | None = None
    segments: list[tuple[Path, int]] = []
    for i, (where, step, saved) in enumerate(KILL_POINTS):
        out = tmp_path / f"segment{i}"
        _run_and_kill(out, where, step, *([f"ckpt_path={resume_from}"] if resume_from else []))
        folder = out / "checkpoints"
        for path in folder.glob("*.ckpt"):  # every checkpoint file the kill left is complete
            _load(path)
        last = folder / "last.ckpt"
        assert _load(last)["global_step"] == saved, where
        temps = list(folder.glob(".last.ckpt.*.tmp"))
        if where == "save":  # killed with half of the new last.ckpt written: only the temporary file has it
            assert len(temps) == 1 and temps[0].stat().st_size > 0
            assert _load(folder / f"step{step:06d}.ckpt")["global_step"] == step
        else:
            assert temps == []
        segments.append((out, saved if resume_from is None else int(_load(resume_from)["global_step"])))
        resume_from = last
    final = tmp_path / "final"
    _run(final, f"ckpt_path={resume_from}")
    segments.append((final, int(_load(resume_from)["global_step"])))
    assert background.wait(timeout=300) == 0, background.stderr.read()[-3000:]
    background.stderr.close()

    _assert_same_final(_load(straight / "checkpoints" / "last.ckpt"), _load(final / "checkpoints" / "last.ckpt"))
    # metrics: every segment logged only steps after its start, equal to the uninterrupted run's; together they
    # cover the whole run (CSV step s = iteration s + 1; a killed segment keeps every iteration it finished)
    want = _metrics(straight)
    covered: set[int] = set()
    for i, (out, start) in enumerate(segments):
        got = _metrics(out)
        assert all(s >= (0 if i == 0 else start) for s in got), (out.name, sorted(got))
        end = KILL_POINTS[i][2] if i < len(KILL_POINTS) else MAX_STEPS
        finished = set(range(0 if i == 0 else start, end))  # iterations it completed and checkpointed
        assert finished <= set(got), (out.name, sorted(got))
        for s, values in got.items():  # a step cut by the kill may hold a part of its metrics (e.g. the lr)
            _assert_close_metrics(values, want[s], s, complete=s in finished)
        covered |= finished
    assert covered == set(want) == set(range(MAX_STEPS))
    assert not list((final / "checkpoints").glob("*.tmp"))


# --------------------------------------------------------------------------- atomic saves, in-process


def test_a_crash_during_save_keeps_the_previous_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1, "w": torch.arange(4.0)}, path)
    before = path.read_bytes()

    def crash(obj, file, target):
        file.write(b"PK\x03\x04 half a checkpoint")
        file.flush()
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "_dump", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2, "w": torch.zeros(4)}, path)
    assert path.read_bytes() == before
    assert _load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_a_stale_temporary_file_is_removed_by_the_next_save(tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    stale = tmp_path / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"left by a killed save")
    other = tmp_path / ".other.ckpt.abc123.tmp"
    other.write_bytes(b"another file's")
    atomic_save({"step": 3}, path)
    assert not stale.exists() and other.exists()
    assert _load(path)["step"] == 3


def test_trainer_crash_while_saving_last_keeps_it_loadable_and_resumable(tmp_path, monkeypatch) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_module_support import CharTask, tiny_module, trainer
    from test_module_support import fit as fit_module

    def fit(max_steps: int, ckpt_path: str | None = None):
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
        t = trainer(tmp_path, max_steps=max_steps, callbacks=[checkpoint], enable_checkpointing=True,
                    plugins=[AtomicCheckpointIO()])
        fit_module(t, tiny_module(CharTask(), batch_size=4, mini_batch_size=2), ckpt_path=ckpt_path)
        return t

    fit(1)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert _load(last)["global_step"] == 1
    original = ckpt_mod._dump

    def crash_on_last(obj, file, target):
        if target.name == "last.ckpt":
            file.write(b"partial")
            raise OSError("the machine went away")
        original(obj, file, target)

    monkeypatch.setattr(ckpt_mod, "_dump", crash_on_last)
    with pytest.raises(OSError, match="went away"):
        fit(2, ckpt_path=str(last))
    assert _load(last)["global_step"] == 1  # the interrupted save of iteration 2 left last.ckpt as it was
    [step2] = (tmp_path / "ckpt").glob("*step=2.ckpt")  # saved before last.ckpt, complete
    assert _load(step2)["global_step"] == 2
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))
    monkeypatch.setattr(ckpt_mod, "_dump", original)
    t = fit(3, ckpt_path=str(last))
    assert t.global_step == 3 and _load(last)["global_step"] == 3


def test_atomic_checkpoint_io_is_the_default_of_both_entry_points(tmp_path, monkeypatch) -> None:
    from hydra import compose, initialize_config_module
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from tre_lightning.cli.train import build

    tiny = ["model=tiny_random", "task=countdown", "task.train_size=8", "task.val_size=2", "ppo=tiny", "rollout=tiny"]
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", "trainer=cpu", "logger=none", *tiny])
        assert isinstance(build(cfg).trainer.strategy.checkpoint_io, AtomicCheckpointIO)
        own_io = "+trainer.plugins=[{_target_:lightning.pytorch.plugins.io.TorchCheckpointIO}]"
        own = compose("train", overrides=[f"output_dir={tmp_path}", "trainer=cpu", "logger=none", own_io, *tiny])
        io = build(own).trainer.strategy.checkpoint_io
        assert type(io) is TorchCheckpointIO  # the user's own CheckpointIO wins

    from tre_lightning.cli.lightning import run

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer: {accelerator: cpu, logger: false}\n"
        "model:\n"
        "  model: {policy: {class_path: tre_lightning.models.TinyRandomSource, init_args: {hidden_size: 32}}}\n"
        "  task: {class_path: tre_lightning.tasks.CountdownTask, init_args: {train_size: 8, val_size: 2}}\n"
        "  rollout: {n: 2}\n"
        "  ppo: {batch_size: 4, mini_batch_size: 2, micro_batch_size: 2}\n"
    )
    cli = run(["--config", str(config)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert len(with_atomic_checkpoint_io([TorchCheckpointIO()])) == 1
    assert len(with_atomic_checkpoint_io(None)) == 1
