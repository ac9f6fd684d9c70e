"""Non-finite losses and gradients, and prompts longer than the configured prompt length.

Non-finite: an optimizer step with a non-finite loss or gradient is skipped
with the optimizer state untouched, ``train/nonfinite_skips`` counts it, and
``PPOConfig.max_consecutive_nonfinite`` skips *in a row* stop the run with a
clear error (a finite step resets the streak).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch import Callback
from test_module_support import CharTask, tiny_module, fit, trainer, validate

from tre_lightning import regularizers as R
from tre_lightning.training.data import render_prompts
from tre_lightning.training import NonFiniteError


class Poison:
    """A regularizer that makes the loss (``kind="loss"``) or only the gradient (``kind="grad"``)
    non-finite while ``active``; a no-op otherwise."""

    name = "poison"
    coef = 1.0

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.active = False

    def __call__(self, ctx: R.PolicyContext) -> R.RegularizerOutput:
        if not self.active:
            return R.RegularizerOutput()
        if self.kind == "loss":
            return R.RegularizerOutput(loss=ctx.log_probs * math.nan)
        # sqrt at 0: the value is 0 (the loss stays finite), the gradient 0.5 / sqrt(0) * 0 is NaN
        return R.RegularizerOutput(loss=torch.sqrt(ctx.log_probs * 0.0))


class Schedule(Callback):
    """Poisons the iterations in ``poisoned`` (1-based) and records optimizer state and metrics."""

    def __init__(self, poison: Poison, poisoned: set[int]) -> None:
        self.poison = poison
        self.poisoned = poisoned
        self.snapshots: list[dict[str, object]] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.poison.active = trainer.global_step + 1 in self.poisoned

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append(dict(outputs["metrics"]))
        optimizers = [o.optimizer if hasattr(o, "optimizer") else o for o in trainer.optimizers]
        self.snapshots.append({
            "actor": {k: v.detach().clone() for k, v in pl_module.model.actor.state_dict().items()},
            "critic": {k: v.detach().clone() for k, v in pl_module.model.critic.state_dict().items()},
            "optim": [_clone_state(o.state_dict()) for o in optimizers],
        })


def _clone_state(state: dict) -> dict:
    return {
        "state": {k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in v.items()}
                  for k, v in state["state"].items()},
        "param_groups": [dict(g) for g in state["param_groups"]],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["actor"].keys() == b["actor"].keys()
    for part in ("actor", "critic"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} changed on a skipped step"
    for oa, ob in zip(a["optim"], b["optim"], strict=True):
        assert oa["state"].keys() == ob["state"].keys()
        for k in oa["state"]:
            for name, value in oa["state"][k].items():
                other = ob["state"][k][name]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (k, name)


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a["actor"][k], b["actor"][k]) for k in a["actor"])


def _fit(poison: Poison, poisoned: set[int], steps: int, limit: int = 3) -> tuple[Schedule, list[str]]:
    schedule = Schedule(poison, poisoned)
    # 4 prompts x 2 samples, mini-batches of 2 prompts: two optimizer steps per iteration
    module = tiny_module(CharTask(), [poison], batch_size=4, mini_batch_size=2, max_consecutive_nonfinite=limit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(trainer(max_steps=steps, callbacks=[schedule]), module)
    messages = [str(w.message) for w in caught if "optimizer step skipped" in str(w.message)]
    return schedule, messages


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_skipped_step_leaves_weights_and_optimizer_state_untouched(kind: str) -> None:
    schedule, messages = _fit(Poison(kind), poisoned={2}, steps=3)
    first, poisoned, third = schedule.snapshots
    _assert_same(first, poisoned)  # iteration 2: both optimizer steps skipped
    assert _differs(poisoned, third)  # iteration 3 trains again
    # Adam's step counters moved on iterations 1 and 3 only (2 optimizer steps each)
    step = lambda snap: int(next(iter(snap["optim"][0]["state"].values()))["step"])  # noqa: E731
    assert (step(first), step(poisoned), step(third)) == (2, 2, 4)
    # the counter metric (cumulative) and one warning per skipped step
    assert [m["train/nonfinite_skips"] for m in schedule.metrics] == [0.0, 2.0, 2.0]
    assert len(messages) == 2 and "(2 in a row)" in messages[1]


def test_a_finite_step_resets_the_streak() -> None:
    # 2 skips, a finite iteration, 2 skips: never 3 in a row, so no error
    schedule, messages = _fit(Poison("loss"), poisoned={1, 3}, steps=4, limit=3)
    assert [m["train/nonfinite_skips"] for m in schedule.metrics] == [2.0, 2.0, 4.0, 4.0]
    assert len(messages) == 4


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_too_many_in_a_row_stop_with_a_clear_error(kind: str) -> None:
    schedule = Schedule(Poison(kind), poisoned={1, 2, 3})
    module = tiny_module(CharTask(), [schedule.poison], batch_size=4, mini_batch_size=2, max_consecutive_nonfinite=3)
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.model.actor.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteError) as info:
            fit(trainer(max_steps=5, callbacks=[schedule]), module)
    assert "3 optimizer steps in a row" in str(info.value)
    assert "PPOConfig.max_consecutive_nonfinite=3" in str(info.value)
    assert module.learner.nonfinite_total == 3 and len(schedule.metrics) == 1  # stopped in the 2nd iteration
    for k, v in module.model.actor.state_dict().items():
        assert torch.equal(before[k], v), k


# --------------------------------------------------------------------------- prompt length


class LongPrompts(CharTask):
    """Prompts of 'say <c>' preceded by a long, distinct filler."""

    def messages(self, example):
        return [{"role": "user", "content": "0123456789" * 8 + " " + example["q"]}]


def _ids(tokenizer, task, example) -> list[int]:
    text = tokenizer.apply_chat_template(task.messages(example), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_long_prompts_are_truncated_on_the_left_with_a_counted_warning() -> None:
    from test_module_support import tiny_source

    tok = tiny_source().tokenizer()
    task = LongPrompts()
    examples = [*task.train_examples()[:3]]
    full = [_ids(tok, task, ex) for ex in examples]
    limit = 40
    assert all(len(ids) > limit for ids in full)
    with pytest.warns(UserWarning, match=r"3 of 3 prompts were longer than max_prompt_length=40 .* truncated on "
                                         r"the left"):
        input_ids, mask, truncated = render_prompts(tok, task, examples, limit, "truncate_left")
    assert truncated == 3 and input_ids.shape == (3, limit)
    for row, ids in zip(input_ids.tolist(), full, strict=True):
        assert row == ids[-limit:]  # the end of the prompt (the question and the generation prompt) is kept
    short = render_prompts(tok, CharTask(), CharTask().train_examples()[:2], limit, "truncate_left")
    assert short[2] == 0


def test_long_prompts_are_rejected_by_configuration() -> None:
    from test_module_support import tiny_source

    tok = tiny_source().tokenizer()
    task = LongPrompts()
    with pytest.raises(ValueError, match=r"max_prompt_length=40 \(RolloutConfig.prompt_overflow='error'"):
        render_prompts(tok, task, task.train_examples()[:2], 40, "error")


@pytest.mark.parametrize("overflow", ["truncate_left", "error"])
def test_prompt_overflow_in_training(overflow: str) -> None:
    class Record(Callback):
        def __init__(self) -> None:
            self.truncated: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.truncated.append(outputs["metrics"]["train/truncated_prompts"])

    module = tiny_module(LongPrompts(), batch_size=4, mini_batch_size=2, n=2, max_new_tokens=4, max_prompt_length=40,
                         prompt_overflow=overflow)
    record = Record()
    if overflow == "error":
        with pytest.raises(ValueError, match="prompt_overflow='error'"):
            fit(trainer(max_steps=1, callbacks=[record]), module)
        assert record.truncated == []
    else:
        with pytest.warns(UserWarning, match="4 of 4 prompts were longer"):
            fit(trainer(max_steps=2, callbacks=[record]), module)
        assert record.truncated == [4.0, 4.0]
