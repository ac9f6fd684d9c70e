"""Every YAML under conf/ composes and instantiates; the config records validate their fields."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import tre_lightning.conf
from tre_lightning.cli.build import ObjectBuilder
from tre_lightning.evaluation import EvalConfig
from tre_lightning.training import OptimConfig, PPOConfig, RolloutConfig

CONF = Path(tre_lightning.conf.__file__).parent
HYDRA_FILES = sorted(p for p in CONF.rglob("*.yaml") if p.parent.name != "lightning")
# top-level configs of other entry points (e.g. train_rm.yaml): composed, not instantiated
OTHER_ROOTS = {"train_rm"}
LIGHTNING_FILES = sorted((CONF / "lightning").glob("*.yaml"))
# groups whose instantiation needs no model or task of their own
NEUTRAL = ["~model", "~task", "~regularizers"]


def _compose(overrides: list[str], tmp_path, name: str = "train") -> object:
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        extra = [f"output_dir={tmp_path}"] if name == "train" else []
        cfg = compose(name, overrides=[*extra, *overrides])
    # model folders (mandatory ??? values and the presets' ~/models/... paths) point at a stand-in folder with a
    # config.json: building a source checks that the folder exists, loading its weights is not part of building
    folder = tmp_path / "placeholder"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    tree = _fill_missing(OmegaConf.to_container(cfg, resolve=False), str(folder))
    for key in ("policy", "critic", "reference"):
        node = (tree.get("model") or {}).get(key)
        if isinstance(node, dict) and isinstance(node.get("path"), str) and node["path"].startswith("~/models/"):
            node["path"] = str(folder)
    return OmegaConf.create(tree)


def _fill_missing(node, value):
    if isinstance(node, dict):
        return {k: _fill_missing(v, value) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill_missing(v, value) for v in node]
    return value if node == "???" else node


def _cpu(node) -> object:
    """Trainer nodes that ask for a GPU are built on CPU when there is none."""
    node = OmegaConf.to_container(node, resolve=True)
    if not torch.cuda.is_available() and node.get("accelerator") in ("gpu", "cuda"):
        node["accelerator"] = "cpu"
    strategy = node.get("strategy")
    if isinstance(strategy, dict) and "data_parallel_size" in strategy:
        strategy["data_parallel_size"] = 1
    node["devices"] = 1
    return node


def instantiate(node) -> object:
    """Build a config node with the entry points' own builder (``tre_lightning.cli.build``)."""
    tree = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node
    return ObjectBuilder().build(tree, "node")


def _instantiate_everything(cfg) -> None:
    from tre_lightning.models import ActorCritic
    from tre_lightning.regularizers import Regularizer

    if "model" in cfg:
        assert isinstance(instantiate(cfg.model), ActorCritic)
    if "task" in cfg:
        task = instantiate(cfg.task)
        assert isinstance(task.name, str)
    for reg in instantiate(cfg.regularizers).values():
        assert isinstance(reg, Regularizer)
    assert isinstance(instantiate(cfg.rollout), RolloutConfig)
    assert isinstance(instantiate(cfg.ppo), PPOConfig)
    assert isinstance(instantiate(cfg.optim), OptimConfig)
    assert isinstance(instantiate(cfg.evaluation), EvalConfig)
    ObjectBuilder().build(_cpu(cfg.trainer), "trainer", enable_progress_bar=False, logger=False)
    for cb in (cfg.callbacks or {}).values():
        if cb is not None:
            instantiate(cb)
    for lg in (cfg.logger or {}).values():
        if lg is not None:
            try:
                instantiate(lg)
            except ModuleNotFoundError as err:  # optional logger packages (tensorboard, wandb)
                pytest.skip(f"optional logger package not installed: {err}")


def test_files_found() -> None:
    names = {p.relative_to(CONF).as_posix() for p in HYDRA_FILES}
    assert "train.yaml" in names and "model/tiny_random.yaml" in names and "ppo/paper.yaml" in names
    assert LIGHTNING_FILES, "conf/lightning/ holds the Lightning CLI example"


@pytest.mark.parametrize("path", HYDRA_FILES, ids=lambda p: p.relative_to(CONF).as_posix())
def test_hydra_yaml_instantiates(path: Path, tmp_path) -> None:
    rel = path.relative_to(CONF)
    if len(rel.parts) == 1 and path.stem in OTHER_ROOTS:
        assert _compose([], tmp_path, name=path.stem) is not None
        return
    if rel.as_posix() == "train.yaml":
        cfg = _compose([], tmp_path)  # the defaults: the embedded quickstart
    elif rel.parts[0] == "experiment":
        cfg = _compose([f"experiment={path.stem}"], tmp_path)
    elif rel.parts[0] in ("model", "task", "regularizers"):
        keep = [o for o in NEUTRAL if o[1:] != rel.parts[0]]
        override = f"{rel.parts[0]}={path.stem}"
        if rel.parts[0] == "model" and path.stem == "embedded":
            keep = [o for o in keep if o != "~task"] + ["task=embedded"]
        cfg = _compose([*keep, override], tmp_path)
    elif rel.parts[0] == "engine":  # not in train.yaml's defaults list (engine: null): appended, +engine=vllm
        cfg = _compose([*NEUTRAL, f"+engine={path.stem}"], tmp_path)
        assert cfg.engine["_target_"].startswith("tre_lightning.rollout.")
    elif rel.parts[0] == "strategy":  # strategy=fsdp also sets model.fsdp: keep a model to set it on
        cfg = _compose(["model=tiny_random", "~task", "~regularizers", f"strategy={path.stem}"], tmp_path)
    else:
        cfg = _compose([*NEUTRAL, f"{rel.parts[0]}={path.stem}"], tmp_path)
    _instantiate_everything(cfg)


@pytest.mark.parametrize("path", LIGHTNING_FILES, ids=lambda p: p.name)
def test_lightning_yaml_instantiates(path: Path, tmp_path) -> None:
    from tre_lightning.cli.lightning import EXAMPLE_CONFIG, TRECLI
    from tre_lightning.training import PPOModule

    args = ["--config", str(EXAMPLE_CONFIG)]
    if path != EXAMPLE_CONFIG:
        args += ["--config", str(path)]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    if not torch.cuda.is_available():
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    text = path.read_text()
    if "data_parallel_size" in text:
        args += ["--trainer.strategy.init_args.data_parallel_size", "1"]
    cli = TRECLI(PPOModule, run=False, args=args, seed_everything_default=0, auto_configure_optimizers=False)
    assert isinstance(cli.model, PPOModule)
    assert cli.model.regularizers, "the example configures a regularizer"


def test_example_is_packaged_next_to_the_cli() -> None:
    from tre_lightning.cli.lightning import EXAMPLE_CONFIG

    assert EXAMPLE_CONFIG.is_file()


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: RolloutConfig(n=0), "n"),
        (lambda: RolloutConfig(temperature=0.0), "temperature"),
        (lambda: RolloutConfig(top_p=1.5), "top_p"),
        (lambda: RolloutConfig(max_new_tokens=0), "max_new_tokens"),
        (lambda: RolloutConfig(prompt_overflow="drop"), "prompt_overflow"),
        (lambda: PPOConfig(batch_size=10, mini_batch_size=4), "mini_batch_size"),
        (lambda: PPOConfig(clip_ratio_low=1.0), "clip_ratio_low"),
        (lambda: PPOConfig(dual_clip=1.0), "dual_clip"),
        (lambda: PPOConfig(gamma=1.1), "gamma"),
        (lambda: PPOConfig(lam=-0.1), "lam"),
        (lambda: PPOConfig(loss_aggregation="sum"), "loss_aggregation"),
        (lambda: PPOConfig(kl_coef=-1.0), "kl_coef"),
        (lambda: PPOConfig(kl_estimator="k4"), "kl_estimator"),
        (lambda: PPOConfig(ppo_epochs=0), "ppo_epochs"),
        (lambda: PPOConfig(max_grad_norm=0.0), "max_grad_norm"),
        (lambda: PPOConfig(max_consecutive_nonfinite=0), "max_consecutive_nonfinite"),
        (lambda: PPOConfig(batch_size=2, mini_batch_size=2, micro_batch_size=5).check_micro_batch(2),
         "ppo.micro_batch_size"),
        (lambda: OptimConfig(actor_lr=0.0), "actor_lr"),
        (lambda: OptimConfig(betas=[0.9]), "betas"),
        (lambda: OptimConfig(betas=[0.9, 1.0]), "betas[1]"),
        (lambda: OptimConfig(warmup_ratio=1.0), "warmup_ratio"),
        (lambda: OptimConfig(schedule="step"), "schedule"),
        (lambda: EvalConfig(top_p=0.0), "top_p"),
        (lambda: EvalConfig(n=4, pass_k=[8]), "pass_k"),
        (lambda: EvalConfig(pass_k=[]), "pass_k"),
    ],
)
def test_config_fields_validated(make, field: str) -> None:
    from tre_lightning.checks import ArgumentError

    with pytest.raises(ArgumentError) as info:
        make()
    assert info.value.param == field and str(info.value).startswith(f"{field} must be ")


def test_defaults_are_the_paper() -> None:
    ppo, optim, ev, ro = PPOConfig(), OptimConfig(), EvalConfig(), RolloutConfig()
    assert (ppo.batch_size, ppo.mini_batch_size, ppo.ppo_epochs) == (512, 64, 1)
    assert (ppo.clip_ratio_low, ppo.clip_ratio_high, ppo.dual_clip) == (0.2, 0.2, 3.0)
    assert (ppo.gamma, ppo.lam, ppo.kl_coef, ppo.loss_aggregation) == (1.0, 1.0, 0.0, "token-mean")
    assert (optim.actor_lr, optim.critic_lr) == (1e-6, 1e-5)
    assert (ev.n, ev.temperature, ev.top_p, ev.pass_k) == (8, 1.0, 0.7, [1])
    assert (ro.n, ro.temperature, ro.top_p) == (8, 1.0, 1.0)
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=["output_dir=/tmp", *NEUTRAL, "ppo=paper", "optim=paper", "evaluation=paper",
                                          "rollout=paper"])
    assert instantiate(cfg.ppo) == ppo and instantiate(cfg.optim) == optim
    assert instantiate(cfg.evaluation) == ev and instantiate(cfg.rollout) == ro


def test_train_defaults_are_the_quickstart(tmp_path) -> None:
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}"], return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.task, choices.regularizers) == ("embedded", "embedded", "tre_p")


@pytest.mark.parametrize(("group", "record"), [("ppo", PPOConfig), ("optim", OptimConfig), ("evaluation", EvalConfig),
                                               ("rollout", RolloutConfig)])
def test_paper_yamls_spell_out_every_field(group: str, record: type) -> None:
    """conf/<group>/paper.yaml lists every field of its record (the documented place to read the settings)."""
    from dataclasses import fields

    yaml = OmegaConf.load(CONF / group / "paper.yaml")
    missing = [f.name for f in fields(record) if f.name not in yaml]
    assert not missing, f"conf/{group}/paper.yaml lacks {missing}"
