"""Each regularizer's weighted contribution is logged next to the surrogate (issue 16)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tre_lightning.regularizers import Ent
from tre_lightning.regularizers.base import RegularizerOutput
from tre_lightning.training.policy_loss import compose_policy_loss
from test_callbacks import FakeTensorBoard
from test_module_support import CharTask, fit, tiny_module, trainer


@dataclass
class _Constant:
    """A regularizer whose loss is a fixed (B, T) tensor."""

    name: str
    coef: float
    loss: torch.Tensor

    def out(self) -> RegularizerOutput:
        return RegularizerOutput(loss=self.loss)


def test_terms_are_coef_times_the_token_mean_of_each_term() -> None:
    """Hand-computed: surrogate token mean (1+2+3)/3 = 2; term token mean (4+0+8)/3 = 4, × 0.5 = 2.

    Checked against the mutation ``terms[...] = aggregate(...)`` without ``coef`` (gives 4, fails).
    """
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    surrogate = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    reg = _Constant("const", 0.5, torch.tensor([[4.0, 0.0, 7.0], [8.0, 7.0, 7.0]]))
    loss, terms = compose_policy_loss(surrogate, mask, [(reg, reg.out())], "token-mean", mask.sum())
    assert torch.isclose(terms["surrogate"], torch.tensor(2.0))
    assert torch.isclose(terms["const_weighted"], torch.tensor(2.0))
    assert torch.isclose(loss, torch.tensor(4.0))  # the loss is their sum here (one micro-batch)
    assert not terms["const_weighted"].requires_grad


def test_module_logs_weighted_term_and_it_is_documented(tmp_path) -> None:
    """A run with Ent logs ``policy/ent_weighted`` = coef × (−token-mean entropy) and docs/training.md names it.

    Fails on the code before the change (the key was not logged)."""
    logger = FakeTensorBoard(str(tmp_path))
    coef = 0.01
    fit(trainer(tmp_path, max_steps=1, logger=logger, callbacks=[]),
        tiny_module(CharTask(binary=True), regularizers=[Ent(coef=coef)]))
    logged = {k: v for m in logger.metrics for k, v in m.items()}
    assert "policy/ent_weighted" in logged and "policy/surrogate" in logged
    # Ent's loss is −H, so its weighted term is −coef × the logged entropy (same token weights)
    assert abs(logged["policy/ent_weighted"] + coef * logged["policy/ent_entropy"]) < 1e-6
    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    documented = set(re.findall(r"`((?:policy|value|reward|train|perf)/[\w@]+)`", doc))
    assert {"policy/ent_weighted", "policy/surrogate"} <= documented
