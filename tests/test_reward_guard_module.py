"""Inside PPOModule: a reward function that holds the GIL past the limit, or calls sys.exit, does not stop
or stall training; the module's guard runs the task in a worker process by default."""

from __future__ import annotations

import math
import warnings

import pytest
from lightning.pytorch import Callback
from test_module_support import fit, tiny_module, trainer
from test_reward_guard_support import MiniCharTask



class Record(Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append(dict(outputs["metrics"]))


@pytest.mark.parametrize(("mode", "counter", "limit"), [("regex", "reward/score_timeouts", 1.0),
                                                        ("exit", "reward/score_errors", 600.0)])
def test_training_goes_on_when_the_reward_holds_the_gil_or_exits(mode: str, counter: str, limit: float) -> None:
    """Every sampled sequence of every step is counted under its failure and scores 0; the run reaches its
    last step with finite weights.

    Checked against: the old scoring.py (regex: the first step never ends; exit: SystemExit ends ``fit``)."""
    module = tiny_module(MiniCharTask(mode), batch_size=4, mini_batch_size=2, score_timeout=limit)
    module.configure_model()
    record = Record()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(max_steps=2, callbacks=[record])
        fit(t, module)
    assert t.global_step == 2 and module.guard.isolation == "process"
    for m in record.metrics:
        assert m["reward/failures"] == 4 * 2 and m[counter] == 4 * 2 and m["reward/mean"] == 0.0
    assert any("scored 0 because the reward function failed" in str(w.message) for w in caught)
    assert all(math.isfinite(float(v.abs().sum())) for v in module.model.actor.state_dict().values())
    module.guard.close()
