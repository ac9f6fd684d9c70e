"""One PPO iteration as a plain object: collect experience → advantages → PPO epochs.

Nothing here needs a Trainer: :class:`PPOLearner` takes the models, the
engine, the reward guard and the configs; :meth:`PPOLearner.iteration` takes
a batch of prompts, the two optimizers and a generator, and returns the
iteration's metrics and samples. ``PPOModule`` drives it under Lightning; a
benchmark or a notebook can drive it directly (see ``docs/architecture.md``).

What a driver must provide besides that is a :class:`Runtime`: how to run
backward (Lightning's ``manual_backward`` under a strategy), the sum over
data-parallel ranks, and an all-ranks decision.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tre_lightning.models.actor_critic import ActorCritic
from tre_lightning.ppo import (
    AllReduce,
    aggregate_loss,
    clipped_value_loss,
    compute_gae,
    global_loss_normalizer,
    global_masked_whiten,
    masked_mean,
    masked_var,
    sampled_kl,
    token_level_rewards,
)
from tre_lightning.regularizers.base import Regularizer
from tre_lightning.regularizers.functional import log_probs_from_logits
from tre_lightning.rollout.base import Rollout, RolloutEngine
from tre_lightning.rollout.experience import Experience
from tre_lightning.tasks.guard import RewardGuard, decode_responses
from tre_lightning.training.config import PPOConfig, RolloutConfig
from tre_lightning.training.optim import clip_grad_norm
from tre_lightning.training.policy_loss import policy_loss
from tre_lightning.training.stats import RunningMeans

__all__ = ["IterationResult", "NonFiniteError", "PPOLearner", "Runtime"]


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def _backward(loss: Tensor) -> None:
    loss.backward()


def _every_rank(flag: bool) -> bool:
    return flag


@dataclass
class Runtime:
    """What the PPO loop needs from whoever drives it.

    Attributes:
        device: where rewards and scalars are put.
        backward: runs backward on a loss (Lightning: ``manual_backward``).
        all_reduce: sums a tensor over the data-parallel ranks (None: one process).
        world_size: number of data-parallel ranks W.
        all_ranks: True only if its argument is True on every rank.
        iteration: the PPO iteration (for messages).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backward: Callable[[Tensor], None] = _backward
    all_reduce: AllReduce | None = None
    world_size: int = 1
    all_ranks: Callable[[bool], bool] = _every_rank
    iteration: int = 0


@dataclass
class IterationResult:
    """What one PPO iteration produced: scalar ``metrics``, the ``samples`` (prompt, response, reward
    columns) and the ``rollout`` it trained on."""

    metrics: dict[str, float]
    samples: dict[str, list[Any]]
    rollout: Rollout


def _repeat(items: Sequence[Any], n: int) -> list[Any]:
    return [item for item in items for _ in range(n)]


class PPOLearner:
    """Actor-critic PPO with GAE over a batch of prompts (the paper's update, regularizers included).

    Args:
        model: the actor-critic container (built before the first iteration).
        engine: generates the responses.
        guard: scores the decoded responses (never raises, never hangs).
        regularizers: act on the policy-loss pass; none = vanilla PPO.
        rollout: sampling of training responses (n, temperature, lengths).
        ppo: the update (batch sizes, clipping, GAE, aggregation, KL).
    """

    def __init__(
        self,
        model: ActorCritic,
        engine: RolloutEngine,
        guard: RewardGuard,
        regularizers: Sequence[Regularizer],
        rollout: RolloutConfig,
        ppo: PPOConfig,
    ) -> None:
        self.model = model
        self.engine = engine
        self.guard = guard
        self.regularizers = list(regularizers)
        self.rollout = rollout
        self.ppo = ppo
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._invalid: Tensor | None = None
        self._invalid_known = False

    def invalid_tokens(self, device: torch.device) -> Tensor | None:
        """(V,) bool mask of the task's ``invalid_token_ids`` (None when the task declares none)."""
        if not self._invalid_known:
            declare = getattr(self.guard.task, "invalid_token_ids", None)
            ids = declare(self.model.tokenizer) if callable(declare) else None
            if ids is not None:
                mask = torch.zeros(len(self.model.tokenizer), dtype=torch.bool)
                mask[torch.as_tensor(list(ids), dtype=torch.long)] = True
                self._invalid = mask
            self._invalid_known = True
        return None if self._invalid is None else self._invalid.to(device)

    # ------------------------------------------------------------------ one iteration

    def iteration(
        self,
        batch: Mapping[str, Any],
        optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
        generator: torch.Generator,
        runtime: Runtime,
    ) -> IterationResult:
        """Rollout, reward, advantages, PPO epochs; then the engine gets the new weights."""
        stats = RunningMeans()
        n = self.rollout.n
        t0 = time.perf_counter()
        with torch.no_grad(), self.model.generation_context(self.engine):
            rollout = self.engine.generate(batch["input_ids"], batch["attention_mask"], self.rollout.sampling())
        rollout_s = time.perf_counter() - t0

        responses, decode_failures = decode_responses(self.model.tokenizer, rollout.response_ids,
                                                      rollout.response_lengths)
        report = self.guard.score(_repeat(batch["examples"], n), responses)
        scores = torch.tensor(report.rewards, dtype=torch.float32, device=runtime.device)

        t1 = time.perf_counter()
        experience, kl = self.experience(rollout, scores, runtime)
        for _ in range(self.ppo.ppo_epochs):
            for mini_batch in self.mini_batches(experience, generator):
                self.optimization_step(mini_batch, optimizers, runtime, stats)
        train_s = time.perf_counter() - t1
        self.engine.sync_weights(self.model.actor)

        self._rollout_metrics(stats, rollout, scores, experience, kl, batch)
        for name, value in report.metrics().items():
            stats.add(name, value)
        stats.add("reward/decode_failures", float(decode_failures))
        stats.add("perf/rollout_tokens_per_s", float(rollout.response_lengths.sum()) / max(rollout_s, 1e-9))
        trained_tokens = float(experience.attention_mask.sum()) * self.ppo.ppo_epochs
        stats.add("perf/train_tokens_per_s", trained_tokens / max(train_s, 1e-9))
        stats.add("perf/rollout_s", rollout_s)
        stats.add("perf/train_s", train_s)
        prompts = self.model.tokenizer.batch_decode(
            [ids[m.bool()] for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)],
            skip_special_tokens=False,
        )
        samples = {"prompt": _repeat(prompts, n), "response": responses, "reward": scores.tolist()}
        return IterationResult(metrics=stats.result(), samples=samples, rollout=rollout)

    # ------------------------------------------------------------------ experience

    @torch.no_grad()
    def score_rollout(self, rollout: Rollout, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """Behaviour log-probs, values and (with a KL) reference log-probs, (N, R) each, float32."""
        exp = Experience.from_rollout(rollout)
        shape = rollout.response_ids.shape
        log_probs = torch.zeros(shape, dtype=torch.float32, device=device)
        values = torch.zeros(shape, dtype=torch.float32, device=device)
        with_ref = self.model.reference is not None
        ref = torch.zeros(shape, dtype=torch.float32, device=device) if with_ref else None
        size = self.ppo.micro_batch_size
        temperature = self.rollout.temperature
        for start, mb in zip(range(0, len(exp), size), exp.micro_batches(size), strict=True):
            rows = slice(start, start + len(mb))
            width = mb.response_ids.shape[1]
            logits, hidden = self.model.policy_logits(mb.input_ids, mb.attention_mask, width, temperature)
            log_probs[rows, :width] = log_probs_from_logits(logits, mb.response_ids).float()
            values[rows, :width] = self.model.values(mb.input_ids, mb.attention_mask, width, hidden)
            if ref is not None:
                ref_logits = self.model.reference_logits(mb.input_ids, mb.attention_mask, width, temperature)
                ref[rows, :width] = log_probs_from_logits(ref_logits, mb.response_ids).float()
        mask = rollout.response_mask.bool()
        zero = torch.zeros((), device=device)
        return (
            torch.where(mask, log_probs, zero),
            torch.where(mask, values, zero),
            torch.where(mask, ref, zero) if ref is not None else None,
        )

    def experience(self, rollout: Rollout, scores: Tensor, runtime: Runtime) -> tuple[Experience, Tensor | None]:
        """Old log-probs and values, token rewards (with the reference KL), GAE, whitening."""
        cfg = self.ppo
        old_log_probs, old_values, ref_log_probs = self.score_rollout(rollout, runtime.device)
        mask = rollout.response_mask.to(old_log_probs.dtype)
        # KL(pi_old || pi_ref) estimated on the sampled tokens (sampled from pi_old), in the reward
        kl = sampled_kl(old_log_probs, ref_log_probs, cfg.kl_estimator) if ref_log_probs is not None else None
        token_rewards = token_level_rewards(scores, mask, kl=kl, kl_coef=cfg.kl_coef if kl is not None else 0.0)
        advantages, returns = compute_gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:  # over the valid tokens of the whole global batch (all data-parallel ranks)
            advantages = global_masked_whiten(advantages, mask, all_reduce=runtime.all_reduce)
        experience = Experience.from_rollout(rollout, old_log_probs=old_log_probs, old_values=old_values,
                                             advantages=advantages, returns=returns)
        return experience, kl

    def mini_batches(self, experience: Experience, generator: torch.Generator) -> list[Experience]:
        """One epoch of mini-batches of ``mini_batch_size × n`` sequences (shuffled if configured)."""
        n_rows = len(experience)
        device = experience.response_ids.device
        order = (torch.randperm(n_rows, generator=generator).to(device) if self.ppo.shuffle
                 else torch.arange(n_rows, device=device))
        size = self.ppo.mini_batch_size * self.rollout.n
        return [experience.select(order[i : i + size]) for i in range(0, n_rows, size)]

    # ------------------------------------------------------------------ update

    def optimization_step(
        self,
        mini_batch: Experience,
        optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
        runtime: Runtime,
        stats: RunningMeans,
    ) -> None:
        """Gradient accumulation over micro-batches, then one step of each optimizer
        (skipped on every rank when any rank's loss or gradient is not finite)."""
        cfg = self.ppo
        actor_opt, critic_opt = optimizers
        actor_opt.zero_grad(set_to_none=True)
        critic_opt.zero_grad(set_to_none=True)
        # the global mini-batch's denominator / W (W ranks average their gradients)
        normalizer = global_loss_normalizer(mini_batch.response_mask.float(), cfg.loss_aggregation,
                                            all_reduce=runtime.all_reduce, world_size=runtime.world_size)
        policy_total = torch.zeros((), device=runtime.device)
        value_total = torch.zeros((), device=runtime.device)
        for micro in mini_batch.micro_batches(cfg.micro_batch_size):
            weight = float(micro.response_mask.sum())
            p_loss, hidden = policy_loss(self.model, micro, self.regularizers, cfg, self.rollout.temperature,
                                         normalizer, stats, weight, self.invalid_tokens(runtime.device))
            v_loss = self.value_loss(micro, hidden, normalizer, stats, weight)
            if self.model.share_backbone:
                runtime.backward(p_loss + cfg.vf_coef * v_loss)
            else:
                runtime.backward(p_loss)
                runtime.backward(cfg.vf_coef * v_loss)
            policy_total = policy_total + p_loss.detach().float()
            value_total = value_total + v_loss.detach().float()
        stats.add("train/policy_loss", policy_total)
        stats.add("train/value_loss", value_total)
        actor_norm = clip_grad_norm(self.model.actor.parameters(), cfg.max_grad_norm)
        critic_norm = clip_grad_norm(self.model.critic_parameters(), cfg.max_grad_norm)
        stats.add("train/grad_norm_actor", actor_norm)
        stats.add("train/grad_norm_critic", critic_norm)
        stats.add_max("train/grad_norm_actor_max", actor_norm)
        checks = torch.stack([policy_total, value_total, actor_norm.float().to(runtime.device),
                              critic_norm.float().to(runtime.device)])
        if runtime.all_ranks(bool(torch.isfinite(checks).all().item())):
            actor_opt.step()
            critic_opt.step()
            self.nonfinite_in_a_row = 0
        else:
            self._skip_step(runtime)
        actor_opt.zero_grad(set_to_none=True)
        critic_opt.zero_grad(set_to_none=True)
        stats.add_max("train/nonfinite_skips", float(self.nonfinite_total))

    def _skip_step(self, runtime: Runtime) -> None:
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        warnings.warn(f"non-finite loss or gradient at iteration {runtime.iteration}: optimizer step skipped "
                      f"({self.nonfinite_in_a_row} in a row)", stacklevel=3)
        if self.nonfinite_in_a_row >= self.ppo.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(PPOConfig.max_consecutive_nonfinite={self.ppo.max_consecutive_nonfinite}); "
                "lower the learning rates or regularizer coefficients, or check the rewards"
            )

    def value_loss(self, micro: Experience, hidden: Tensor | None, normalizer: Tensor, stats: RunningMeans,
                   weight: float) -> Tensor:
        """The micro-batch's share of the mini-batch value loss."""
        mask = micro.response_mask.float()
        values = self.model.values(micro.input_ids, micro.attention_mask, micro.response_ids.shape[1], hidden)
        out = clipped_value_loss(values, micro.old_values, micro.returns, mask,
                                 clip_range=self.ppo.value_clip_range, scale=self.ppo.value_loss_scale)
        loss = aggregate_loss(out.per_token, mask, self.ppo.loss_aggregation, normalizer=normalizer)
        stats.add("value/clipfrac", out.vf_clipfrac, weight)
        stats.add("value/loss", masked_mean(out.per_token.detach(), mask), weight)
        return loss

    # ------------------------------------------------------------------ metrics and state

    def _rollout_metrics(self, stats: RunningMeans, rollout: Rollout, scores: Tensor, exp: Experience,
                         kl: Tensor | None, batch: Mapping[str, Any]) -> None:
        lengths = rollout.response_lengths.float()
        mask = rollout.response_mask.to(exp.old_values.dtype)
        values, returns = exp.old_values, exp.returns
        stats.add("reward/mean", scores.mean())
        stats.add("reward/std", scores.std(unbiased=False) if scores.numel() > 1 else 0.0)
        stats.add("reward/max", scores.max())
        stats.add("reward/min", scores.min())
        stats.add("train/response_length", lengths.mean())
        stats.add("train/response_length_max", lengths.max())
        stats.add("train/response_clip_ratio", (lengths >= self.rollout.max_new_tokens).float().mean())
        stats.add("train/prompt_length", rollout.prompt_mask.float().sum(dim=1).mean())
        stats.add("train/truncated_prompts", float(batch.get("truncated", 0)))
        var_returns = masked_var(returns, mask)
        # 1 - Var(R - V) / Var(R); undefined (logged as 0) when the returns are constant
        explained = 1.0 - masked_var(returns - values, mask) / var_returns if float(var_returns) > 1e-8 else 0.0
        stats.add("value/explained_variance", explained)
        stats.add("value/mean", masked_mean(values, mask))
        stats.add("value/returns_mean", masked_mean(returns, mask))
        stats.add("train/advantages_mean", masked_mean(exp.advantages, mask))
        if kl is not None:
            stats.add("train/ref_kl", masked_mean(kl, mask))
        invalid = self.invalid_tokens(rollout.response_ids.device)
        if invalid is not None:  # sampled: share of responses with at least one invalid token
            hit = invalid[rollout.response_ids.clamp(0, invalid.numel() - 1)] & rollout.response_mask.bool()
            stats.add("train/invalid_seq_rate", hit.any(dim=1).float().mean())

    def state_dict(self) -> dict[str, int]:
        return {"nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
