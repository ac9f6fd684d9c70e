"""Tests for the mutants the issue-15 audit found surviving, each checked against its mutant (see each docstring).

They drive ``PPOLearner``'s own steps (``experience``, ``value_loss``) on a tiny model with settings where
the mutant differs (γ ≠ λ, a value clip that is active) and compare with hand-written formulas.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
from test_module_support import CharTask, fixed_engine_for, tiny_module, tiny_source

from tre_lightning.training import PromptDataModule
from tre_lightning.training.loop import Runtime
from tre_lightning.training.stats import RunningMeans

GAMMA, LAM = 0.9, 0.6


def _learner_and_rollout(**ppo):
    source = tiny_source()
    engine = fixed_engine_for(source)
    module = tiny_module(CharTask(), engine=engine, source=source, batch_size=2, mini_batch_size=2,
                         micro_batch_size=4, n=2, max_new_tokens=6, **ppo)
    module.configure_model()
    batch = next(iter(PromptDataModule.for_module(module).train_dataloader()))
    rollout = engine.generate(batch["input_ids"], batch["attention_mask"], SimpleNamespace(n=2, max_new_tokens=6))
    return module.learner, rollout


def _hand_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """A_t = δ_t + γλ A_{t+1}, δ_t = r_t + γ V_{t+1} − V_t, V after the last token = 0 (slow and obvious)."""
    out = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        nxt = values[t + 1] if t + 1 < len(values) else 0.0
        running = rewards[t] + gamma * nxt - values[t] + gamma * lam * running
        out[t] = running
    return out


def test_gae_uses_gamma_and_lambda_in_their_places() -> None:
    """Advantages and returns of the loop's ``experience`` with γ = 0.9, λ = 0.6 (whitening off) against GAE by hand.

    Checked against the mutant ``compute_gae(token_rewards, old_values, mask, cfg.lam, cfg.gamma)`` in
    ``loop.py`` (γ and λ swapped): it fails (every module test used γ = λ = 1, where the swap is invisible).
    """
    learner, rollout = _learner_and_rollout(gamma=GAMMA, lam=LAM, whiten_advantages=False)
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0])
    exp, _ = learner.experience(rollout, scores, Runtime())
    for row in range(len(scores)):
        length = int(rollout.response_mask[row].sum())
        values = exp.old_values[row, :length].tolist()
        rewards = [0.0] * (length - 1) + [float(scores[row])]  # the score on the last valid token, no KL
        want = _hand_gae(rewards, values, GAMMA, LAM)
        torch.testing.assert_close(exp.advantages[row, :length], torch.tensor(want), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exp.returns[row, :length], torch.tensor(want) + exp.old_values[row, :length],
                                   rtol=1e-5, atol=1e-6)
    assert any(int(m.sum()) > 1 for m in rollout.response_mask)  # some row has a discounted token


def test_value_clip_is_centred_on_the_old_values() -> None:
    """The loop's value loss where the clip is active (old values moved by 1 > c = 0.5) against the formula.

    ``value/clipfrac`` must be > 0 (in the audit's hand reference the clip never triggered). Checked against
    the mutant that centres the clip on the returns (``old_values ± clip_range`` → ``returns ± clip_range``
    in ``ppo/losses.clipped_value_loss``): it fails.
    """
    learner, rollout = _learner_and_rollout(whiten_advantages=False, value_clip_range=0.5, value_loss_scale=0.5)
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0])
    exp, _ = learner.experience(rollout, scores, Runtime())
    mask = rollout.response_mask.float()
    current = exp.old_values.clone()  # the critic has not moved: its values now are the rollout-time values
    shift = torch.where(torch.arange(mask.shape[1]) % 2 == 0, 1.0, -1.0).expand_as(mask)
    moved = dataclasses.replace(exp, old_values=(current + shift) * mask)
    stats = RunningMeans()
    loss = learner.value_loss(moved, None, mask.sum(), stats, float(mask.sum()))
    c, old, ret = 0.5, moved.old_values, exp.returns
    clipped = old + (current - old).clamp(-c, c)
    per_token = 0.5 * torch.maximum((current - ret) ** 2, (clipped - ret) ** 2)
    torch.testing.assert_close(loss, (per_token * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)
    assert stats.result()["value/clipfrac"] > 0


def test_policy_pass_divides_the_logits_by_the_rollout_temperature() -> None:
    """With rollout temperature 0.5 and the actor not yet moved, the policy pass's log-probs equal the
    behaviour log-probs (ratio 1, approx KL 0), and its P̄max is the hand-computed one of softmax(logits / 0.5).

    Checked against the mutant that calls ``model.policy_logits(..., 1.0)`` in ``policy_loss.py`` (the
    un-temperatured logits): it fails (no module test used a temperature other than 1).
    """
    from tre_lightning.training.policy_loss import policy_loss

    temperature = 0.5
    learner, rollout = _learner_and_rollout(whiten_advantages=False)
    learner.rollout = dataclasses.replace(learner.rollout, temperature=temperature)
    exp, _ = learner.experience(rollout, torch.tensor([1.0, 0.0, 0.5, 2.0]), Runtime())
    mask = rollout.response_mask.float()
    stats = RunningMeans()
    with torch.no_grad():
        policy_loss(learner.model, exp, [], learner.ppo, temperature, mask.sum(), stats, float(mask.sum()))
    metrics = stats.result()
    assert abs(metrics["policy/approx_kl"]) < 1e-6
    # P̄max by hand from the actor's own forward pass (no tre_lightning code)
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
    att = torch.cat([rollout.prompt_mask, rollout.response_mask], 1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    width = rollout.response_ids.shape[1]
    with torch.no_grad():
        logits = learner.model.actor(input_ids=ids, attention_mask=att, position_ids=pos).logits
    probs = torch.softmax(logits[:, -width - 1 : -1].float() / temperature, -1).amax(-1)
    want = float((probs * mask).sum() / mask.sum())
    untempered = float((torch.softmax(logits[:, -width - 1 : -1].float(), -1).amax(-1) * mask).sum() / mask.sum())
    assert abs(want - untempered) > 1e-3  # the temperature matters here
    assert abs(metrics["policy/p_max"] - want) < 1e-5


def test_resume_replays_the_global_rng_that_user_code_draws_between_iterations(tmp_path) -> None:
    """A callback that draws from torch's, Python's and NumPy's global RNGs after every iteration sees the
    same numbers in a run resumed after step k as in the uninterrupted run, and the run samples the same.

    Checked against the mutant ``ResumeState.load_state_dict`` that drops the checkpointed RNG states
    (``self._pending = None``): it fails (Python's and NumPy's streams restart after the resume).
    """
    import random

    import numpy as np
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_module_resume import _module
    from test_module_support import fit, trainer

    class Draw(Callback):
        def __init__(self) -> None:
            self.draws: list[tuple[float, float, float]] = []
            self.rewards: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.rewards.append(outputs["metrics"]["reward/mean"])
            self.draws.append((float(torch.rand(())), random.random(), float(np.random.rand())))

    def run(folder, max_steps, draw, ckpt_path=None) -> None:
        checkpoint = ModelCheckpoint(dirpath=folder / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
        fit(trainer(folder, max_steps=max_steps, callbacks=[draw, checkpoint], enable_checkpointing=True),
            _module(), ckpt_path=ckpt_path)

    import lightning as L

    L.seed_everything(7)
    straight = Draw()
    run(tmp_path / "a", 3, straight)
    L.seed_everything(7)
    resumed = Draw()
    run(tmp_path / "b", 1, resumed)
    random.random(), np.random.rand(), torch.rand(())  # the process goes on drawing before the resume
    run(tmp_path / "b", 3, resumed, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert len(straight.draws) == 3
    assert resumed.rewards == straight.rewards
    assert resumed.draws == straight.draws


def _hand_p_max(actor: torch.nn.Module, exp, temperature: float) -> float:
    """Token mean over the response of max_a softmax(z / T)_a, from a plain forward of ``actor`` (slow, obvious)."""
    with torch.no_grad():
        positions = (exp.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = actor(input_ids=exp.input_ids, attention_mask=exp.attention_mask, position_ids=positions).logits
        width = exp.response_ids.shape[1]
        probs = torch.softmax(logits[:, -width - 1 : -1].float() / temperature, dim=-1)
        mask = exp.response_mask.float()
        return float((probs.amax(-1) * mask).sum() / mask.sum())


def test_p_max_is_measured_on_the_policy_being_updated() -> None:
    """Two optimizer steps on the same mini-batch: each step's logged ``policy/p_max`` is P̄max of the weights
    that step starts from (computed by hand), and the second differs from the first.

    Checked against the mutant that measures P̄max on the rollout-time policy (in ``policy_loss.py``,
    ``token_stats`` of logits from a forward with the weights saved before the first step): the second
    step's value then equals the first and the test fails. The only earlier test had one mini-batch and
    one epoch, where both policies are the same.
    """
    learner, rollout = _learner_and_rollout(whiten_advantages=False)
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0])
    exp, _ = learner.experience(rollout, scores, Runtime())
    actor = learner.model.actor
    optimizers = (torch.optim.SGD(actor.parameters(), lr=20.0),
                  torch.optim.SGD(learner.model.critic_parameters(), lr=0.0))
    temperature = learner.rollout.temperature
    logged, by_hand = [], []
    for _ in range(2):
        by_hand.append(_hand_p_max(actor, exp, temperature))
        stats = RunningMeans()
        learner.optimization_step(exp, optimizers, Runtime(), stats)
        logged.append(float(stats.result()["policy/p_max"]))
    assert abs(by_hand[1] - by_hand[0]) > 1e-3, by_hand  # the step moved the policy's peak probability
    for got, want in zip(logged, by_hand, strict=True):
        assert abs(got - want) < 1e-5, (logged, by_hand)
