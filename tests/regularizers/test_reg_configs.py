"""Every conf/regularizers/*.yaml composes and builds (with the entry points' builder); every class builds
through jsonargparse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from jsonargparse import ArgumentParser

import tre_lightning.conf
from tre_lightning.checks import ConfigError
from tre_lightning.cli.build import ObjectBuilder
from tre_lightning.regularizers import TREK, TREP, ClipCov, Ent, ForkingTokens, KLCov, MinEnt, Regularizer

CONF = Path(tre_lightning.conf.__file__).parent
GROUP = CONF / "regularizers"
OPTIONS = sorted(p.stem for p in GROUP.glob("*.yaml"))
CLASSES = {"Ent": Ent, "TREK": TREK, "TREP": TREP, "MinEnt": MinEnt, "ForkingTokens": ForkingTokens, "KLCov": KLCov, "ClipCov": ClipCov}


def instantiate(node):
    return ObjectBuilder().build(OmegaConf.to_container(node, resolve=True), "regularizers")


def _compose(overrides: list[str]):
    # no primary config: only the regularizer group, so the test does not depend on train.yaml
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=None, overrides=overrides)


def test_the_group_has_every_regularizer_and_none():
    assert {"none", "ent", "tre_k", "tre_p", "min_ent", "forking", "kl_cov", "clip_cov"} <= set(OPTIONS)


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_composes_and_instantiates(option):
    cfg = _compose([f"+regularizers={option}"])
    raw = yaml.safe_load((GROUP / f"{option}.yaml").read_text()) or {}
    built = instantiate(cfg.regularizers)
    assert set(built) == set(raw)
    for name, reg in built.items():
        assert isinstance(reg, Regularizer)
        node = raw[name]
        assert type(reg).__name__ == node["_target_"].rsplit(".", 1)[1]
        for key, value in node.items():
            if key != "_target_":
                assert getattr(reg, key) == value, (option, key)


def test_several_options_at_once():
    cfg = _compose(["+regularizers=[tre_p,kl_cov,forking]"])
    built = instantiate(cfg.regularizers)
    assert [type(r) for r in built.values()] == [TREP, KLCov, ForkingTokens]


def test_none_is_empty():
    assert dict(instantiate(_compose(["+regularizers=none"]).regularizers)) == {}


def test_overrides_reach_the_constructor_and_are_validated():
    cfg = _compose(["+regularizers=tre_p", "regularizers.tre_p.top_p=0.9", "regularizers.tre_p.max_region=256"])
    reg = instantiate(cfg.regularizers)["tre_p"]
    assert (reg.top_p, reg.max_region) == (0.9, 256)
    bad = _compose(["+regularizers=tre_p", "regularizers.tre_p.top_p=1.5"])
    with pytest.raises(ConfigError, match=r"^regularizers\.tre_p\.top_p: must be a finite number in \(0, 1\], got 1\.5$"):
        instantiate(bad.regularizers)


# the parameter that says how strongly each class acts: coef for the loss terms, its own name otherwise
STRENGTH = {"ForkingTokens": "unselected_weight", "ClipCov": "detach_prob"}


@pytest.mark.parametrize("cls", list(CLASSES.values()), ids=list(CLASSES))
def test_jsonargparse_builds_each_class_from_class_path(cls):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reg", type=Regularizer)
    parser.add_argument("--exact", type=cls)
    key = STRENGTH.get(cls.__name__, "coef")
    spec = {"class_path": f"tre_lightning.regularizers.{cls.__name__}", "init_args": {key: 0.5}}
    cfg = parser.parse_args(["--reg", json.dumps(spec), "--exact", json.dumps(spec)])
    built = parser.instantiate(cfg)
    for reg in (built.reg, built.exact):
        assert type(reg) is cls and getattr(reg, key) == 0.5


@pytest.mark.parametrize("cls", [ForkingTokens, ClipCov], ids=["ForkingTokens", "ClipCov"])
def test_jsonargparse_refuses_the_former_coef_of_the_surrogate_strategies(cls):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reg", type=Regularizer)
    spec = {"class_path": f"tre_lightning.regularizers.{cls.__name__}", "init_args": {"coef": 0.5}}
    with pytest.raises(Exception, match="coef"):
        parser.parse_args(["--reg", json.dumps(spec)])


def test_the_surrogate_options_have_their_own_parameter_not_coef():
    for option, key, value in [("forking", "unselected_weight", 0.0), ("clip_cov", "detach_prob", 1.0)]:
        node = yaml.safe_load((GROUP / f"{option}.yaml").read_text())[option]
        assert "coef" not in node and node[key] == value


def test_jsonargparse_list_of_regularizers_with_arguments():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--regs", type=list[Regularizer])
    specs = [
        {"class_path": "tre_lightning.regularizers.TREP", "init_args": {"top_p": 0.9, "max_region": 256}},
        {"class_path": "tre_lightning.regularizers.KLCov", "init_args": {"top_fraction": 0.002, "kl_estimator": "abs"}},
    ]
    regs = parser.instantiate(parser.parse_args(["--regs", json.dumps(specs)])).regs
    assert (regs[0].top_p, regs[0].max_region) == (0.9, 256)
    assert (regs[1].top_fraction, regs[1].kl_estimator) == (0.002, "abs")
    with pytest.raises(Exception):  # Literal type checked by the parser
        parser.parse_args(["--regs", json.dumps([{"class_path": "tre_lightning.regularizers.KLCov", "init_args": {"kl_estimator": "k2"}}])])
