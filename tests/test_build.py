"""The one build path (tre_lightning.cli.build): every object once, errors keyed by the node being built,
and a new regularizer is one file plus one YAML outside the package."""

from __future__ import annotations

import csv
import functools
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from tre_lightning.checks import ArgumentError, ConfigError
from tre_lightning.cli.build import ObjectBuilder, locate

TINY = [
    "model=tiny_random", "task=countdown", "task.train_size=8", "task.val_size=2", "rollout=tiny",
    "rollout.max_prompt_length=512", "ppo=tiny", "optim=tiny", "evaluation=tiny", "trainer=cpu",
    "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "export_hf=null",
]


def _compose(overrides: list[str], tmp_path: Path):
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        return compose("train", overrides=[f"output_dir={tmp_path}", *overrides])


# --------------------------------------------------------------------------- every object once


def _count_constructions(monkeypatch, classes: list[type]) -> Counter:
    counts: Counter = Counter()
    for cls in classes:
        init = cls.__init__

        @functools.wraps(init)
        def counted(self, *args, __init=init, __name=cls.__name__, **kwargs):
            if type(self).__name__ == __name:  # not a subclass' super().__init__
                counts[__name] += 1
            return __init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counted)
    return counts


def _config_classes() -> list[type]:
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from tre_lightning import regularizers as R
    from tre_lightning.callbacks import PMaxMonitor, RunReport, SampleLogger
    from tre_lightning.evaluation import EvalConfig
    from tre_lightning.models import ActorCritic, TinyRandomSource
    from tre_lightning.tasks import CountdownTask
    from tre_lightning.tasks.guard import RewardGuard
    from tre_lightning.training import OptimConfig, PPOConfig, PPOModule, PromptDataModule, RolloutConfig

    return [PPOModule, ActorCritic, TinyRandomSource, CountdownTask, R.TREP, R.KLCov, RolloutConfig, PPOConfig,
            OptimConfig, EvalConfig, L.Trainer, PMaxMonitor, SampleLogger, RunReport, ModelCheckpoint,
            LearningRateMonitor, CSVLogger, PromptDataModule, RewardGuard]


def test_tre_train_builds_every_object_exactly_once(monkeypatch, tmp_path) -> None:
    from tre_lightning.cli.train import run

    classes = _config_classes()
    counts = _count_constructions(monkeypatch, classes)
    run(_compose([*TINY, "regularizers=[tre_p,kl_cov]"], tmp_path))
    assert dict(counts) == {cls.__name__: 1 for cls in classes}


def test_tre_lightning_builds_every_object_exactly_once(monkeypatch, tmp_path) -> None:
    from tre_lightning.cli.lightning import run

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent("""\
        trainer:
          accelerator: cpu
          max_steps: 1
          val_check_interval: 1
          num_sanity_val_steps: 0
          enable_progress_bar: false
          enable_model_summary: false
          logger:
            class_path: lightning.pytorch.loggers.CSVLogger
            init_args: {save_dir: logs}
          callbacks:
            - class_path: tre_lightning.callbacks.PMaxMonitor
            - class_path: tre_lightning.callbacks.SampleLogger
            - class_path: tre_lightning.callbacks.RunReport
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
            - class_path: lightning.pytorch.callbacks.LearningRateMonitor
        model:
          model:
            policy: {class_path: tre_lightning.models.TinyRandomSource, init_args: {hidden_size: 32}}
          task: {class_path: tre_lightning.tasks.CountdownTask, init_args: {train_size: 8, val_size: 2}}
          regularizers:
            - class_path: tre_lightning.regularizers.TREP
            - class_path: tre_lightning.regularizers.KLCov
          rollout: {n: 2, max_new_tokens: 8, max_prompt_length: 512}
          ppo: {batch_size: 4, mini_batch_size: 2, micro_batch_size: 2}
          optim: {actor_lr: 1.0e-4, critic_lr: 1.0e-4}
          evaluation: {n: 2, max_new_tokens: 8, batch_size: 2, max_examples: 2}
        """))
    classes = _config_classes()
    counts = _count_constructions(monkeypatch, classes)
    run(["fit", "--config", str(config)])
    assert dict(counts) == {cls.__name__: 1 for cls in classes}


# --------------------------------------------------------------------------- keyed errors


class _Leaf:
    def __init__(self, rate: float = 0.1) -> None:
        if rate < 0:
            raise ArgumentError("rate", "a finite number >= 0", rate)
        self.rate = rate


class _Parent:
    def __init__(self, leaf: _Leaf, items: list | None = None, name: str = "x") -> None:
        self.leaf, self.items, self.name = leaf, items, name


def _target(cls: type) -> str:
    return f"{__name__}.{cls.__name__}"


def test_builder_keys_errors_by_the_node_being_built() -> None:
    builder = ObjectBuilder()
    node = {"_target_": _target(_Parent), "leaf": {"_target_": _target(_Leaf), "rate": -1}}
    with pytest.raises(ConfigError) as info:
        builder.build(node, "regularizers.mine")
    assert str(info.value) == "regularizers.mine.leaf.rate: must be a finite number >= 0, got -1"
    with pytest.raises(ConfigError) as info:
        builder.build({"_target_": _target(_Parent), "leaf": {"_target_": _target(_Leaf)}, "nmae": "y"}, "p")
    assert info.value.key == "p.nmae" and "unknown argument" in info.value.message and "'name'" in info.value.message
    with pytest.raises(ConfigError, match=r"^p\.leaf: required, not set$"):
        builder.build({"_target_": _target(_Parent)}, "p")
    lists = {"_target_": _target(_Parent), "leaf": {"_target_": _target(_Leaf)},
             "items": [{"_target_": _target(_Leaf)}, {"_target_": _target(_Leaf), "rate": -2}]}
    with pytest.raises(ConfigError, match=r"^p\.items\[1\]\.rate: must be"):
        builder.build(lists, "p")


def test_builder_accepts_both_spellings_and_builds_dataclasses_from_annotations() -> None:
    from tre_lightning.training import PPOModule

    built = ObjectBuilder().build({"class_path": _target(_Parent), "init_args": {"leaf": {"class_path": _target(
        _Leaf), "init_args": {"rate": 0.5}}}}, "p")
    assert isinstance(built, _Parent) and built.leaf.rate == 0.5
    from tre_lightning.training.config import RolloutConfig

    import typing

    hint = typing.get_type_hints(PPOModule.__init__)["rollout"]
    assert ObjectBuilder().build({"n": 3}, "rollout", hint) == RolloutConfig(n=3)


def test_an_import_error_inside_a_user_module_is_shown_verbatim(tmp_path, monkeypatch) -> None:
    (tmp_path / "broken_reg.py").write_text("import not_a_real_package_xyz\nclass Reg: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        locate("broken_reg.Reg", "regularizers.mine._target_")
    assert info.value.key == "regularizers.mine._target_"
    assert "ModuleNotFoundError: No module named 'not_a_real_package_xyz'" in info.value.message
    with pytest.raises(ConfigError, match=r"has no 'Foo' \(it has: ClipCov, Ent, ForkingTokens"):
        locate("tre_lightning.regularizers.Foo", "regularizers.foo._target_")


def test_a_regularizer_node_outside_the_regularizers_key_is_refused(tmp_path) -> None:
    from tre_lightning.cli.train import build

    cfg = _compose([*TINY, "+regularizer.tre_p._target_=tre_lightning.regularizers.TREP"], tmp_path)
    with pytest.raises(ConfigError, match=r"^regularizer: unknown top-level key \(a regularizer belongs under"):
        build(cfg)
    cfg = _compose([*TINY, "+task.reg={_target_:tre_lightning.regularizers.TREP}"], tmp_path)
    with pytest.raises(ConfigError, match=r"^task\.reg: unknown argument of CountdownTask"):
        build(cfg)


# --------------------------------------------------------------------------- a regularizer in one file + one YAML

_REGULARIZER_FILE = '''\
"""A user's regularizer, outside the package: the collision entropy of the top-K probabilities."""

import torch

from tre_lightning.ppo import masked_mean
from tre_lightning.regularizers import PolicyContext, RegularizerOutput


class TopKCollision:
    name = "top_k_collision"

    def __init__(self, coef: float = 0.01, k: int = 4) -> None:
        self.coef, self.k = coef, k

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        q = ctx.logits.topk(self.k, dim=-1).values.float().softmax(-1)
        h2 = -torch.log((q * q).sum(-1))
        return RegularizerOutput(loss=torch.where(ctx.mask > 0, -h2, 0.0),
                                 metrics={"policy/h2_top_k": masked_mean(h2.detach(), ctx.mask)})
'''


def _user_folder(tmp_path: Path, package_line: bool) -> Path:
    folder = tmp_path / "user"
    (folder / "conf" / "regularizers").mkdir(parents=True)
    (folder / "my_regularizer.py").write_text(_REGULARIZER_FILE)
    head = "# @package regularizers\n" if package_line else ""
    (folder / "conf" / "regularizers" / "top_k_collision.yaml").write_text(
        head + "top_k_collision:\n  _target_: my_regularizer.TopKCollision\n  coef: 0.01\n  k: 4\n")
    return folder


def _tre_train(args: list[str], tmp_path: Path, folder: Path) -> subprocess.CompletedProcess:
    import shutil

    script = shutil.which("tre-train", path=os.path.dirname(sys.executable))
    cmd = [script] if script else [sys.executable, "-m", "tre_lightning.cli.train"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([*cmd, *args, f"hydra.searchpath=[file://{folder / 'conf'}]"], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env=env)


@pytest.mark.parametrize("package_line", [True, False], ids=["with package line", "without package line"])
def test_a_new_regularizer_is_one_file_and_one_yaml(package_line: bool, tmp_path) -> None:
    folder = _user_folder(tmp_path, package_line)
    run_dir = tmp_path / "run"
    proc = _tre_train([*TINY, "regularizers=[tre_p,top_k_collision]", f"hydra.run.dir={run_dir}"], tmp_path, folder)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    values = [float(r["policy/h2_top_k"]) for r in rows if r.get("policy/h2_top_k")]
    assert values and all(v > 0 for v in values)  # its metric is logged
    assert any(r.get("policy/tre_p_entropy") for r in rows)  # next to a shipped one


def test_a_regularizer_yaml_in_the_wrong_group_is_refused_with_exit_code_2(tmp_path) -> None:
    folder = _user_folder(tmp_path, package_line=False)
    (folder / "conf" / "regularizers" / "top_k_collision.yaml").rename(folder / "conf" / "top_k_collision.yaml")
    (folder / "conf" / "regularizer").mkdir()
    (folder / "conf" / "top_k_collision.yaml").rename(folder / "conf" / "regularizer" / "top_k_collision.yaml")
    proc = _tre_train([*TINY, "+regularizer=top_k_collision"], tmp_path, folder)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tre-train: error: invalid configuration: regularizer: unknown top-level key")
    assert "Traceback" not in proc.stderr
