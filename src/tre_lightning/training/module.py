"""PPOModule: actor-critic PPO with GAE on language models, regularizers as objects.

One ``training_step`` is one PPO iteration over a batch of prompts and reads
top to bottom:

1. rollout: ``n`` responses per prompt from the engine (HF generate by default);
2. reward: the task scores the decoded responses;
3. old log-probs and values (and reference log-probs when a KL is configured);
4. token rewards and GAE advantages (whitened over the global batch: all
   data-parallel ranks);
5. PPO epochs over shuffled mini-batches, each split into micro-batches with
   gradient accumulation, then one actor and one critic optimizer step
   (gradient clipping; a non-finite loss or gradient skips the step);
6. learning-rate schedules step, the engine gets the new weights.

Optimization is manual (``automatic_optimization = False``): PPO takes several
optimizer steps per batch with two optimizers, and FSDP2 through Lightning's
``ModelParallelStrategy`` (the scaling path) supports manual optimization.
``trainer.global_step`` counts PPO iterations (one per ``training_step``),
so ``max_steps`` is the paper's number of training steps.

Regularizers (e.g. ``Ent``, ``TREK``, ``TREP``, ``MinEnt``, ``ForkingTokens``,
``KLCov``, ``ClipCov`` from ``tre_lightning.regularizers``) act on the
policy-loss pass; the module knows nothing about any particular one. With
every coefficient 0 the update is vanilla PPO.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from tre_lightning.training.config import EvalConfig, OptimConfig, PPOConfig, RolloutConfig
from tre_lightning.training.data import DataPosition, PromptBatches, prompt_loader
from tre_lightning.evaluation.protocol import build_eval_metrics, metric_name, score_batch, update_eval_metrics
from tre_lightning.models.critic import ValueHead, ValueModel
from tre_lightning.models.forward import policy_forward
from tre_lightning.models.fsdp import (
    FSDPConfig,
    gathered_for_generation,
    has_4bit_layers,
    is_sharded,
    save_hf_pretrained,
)
from tre_lightning.training.optim import build_optimizer, build_scheduler, clip_grad_norm
from tre_lightning.models.source import ModelSource, freeze
from tre_lightning.ppo import (
    aggregate_loss,
    clipped_policy_loss,
    clipped_value_loss,
    AllReduce,
    compute_gae,
    global_loss_normalizer,
    global_masked_whiten,
    kl_penalty,
    masked_mean,
    masked_var,
    process_group_all_reduce,
    token_level_rewards,
)
from tre_lightning.regularizers.base import PolicyContext, Regularizer, RegularizerOutput
from tre_lightning.regularizers.functional import log_probs_from_logits, token_stats
from tre_lightning.rollout.base import Rollout, RolloutEngine, SamplingParams
from tre_lightning.rollout.experience import Experience
from tre_lightning.rollout.hf import HFGenerateEngine
from tre_lightning.tasks.guard import RewardGuard, decode_responses
from tre_lightning.tasks.base import Example, Task

__all__ = ["NonFiniteError", "PPOModule"]

_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class _Means:
    """Weighted running means of scalar diagnostics, kept as tensors until ``result()``
    (no host synchronisation inside the loop)."""

    def __init__(self) -> None:
        self._sum: dict[str, Tensor] = {}
        self._weight: dict[str, float] = {}
        self._max: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor | float, weight: float = 1.0) -> None:
        v = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
        if name in self._sum:
            self._sum[name] = self._sum[name] + v.to(self._sum[name].device) * weight
        else:
            self._sum[name] = v * weight
        self._weight[name] = self._weight.get(name, 0.0) + weight

    def add_max(self, name: str, value: Tensor | float) -> None:
        v = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
        self._max[name] = torch.maximum(self._max[name], v.to(self._max[name].device)) if name in self._max else v

    def result(self) -> dict[str, float]:
        out = {k: float(self._sum[k]) / self._weight[k] for k in self._sum if self._weight[k] > 0}
        out.update({k: float(v) for k, v in self._max.items()})
        return out


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors, ints and lists only (loadable with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_seed(seed: int, step: int, rank: int) -> int:
    """A well-mixed 63-bit seed for (run seed, PPO iteration, process)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x % (1 << 63)


class PPOModule(LightningModule):
    """Actor-critic PPO with GAE for language models, with pluggable regularizers.

    Regularizers available in ``tre_lightning.regularizers`` (list several to
    combine them): ``Ent`` (entropy bonus), ``TREK`` (trust-region entropy,
    top-K), ``TREP`` (trust-region entropy, nucleus P), ``MinEnt`` (K = 1),
    ``ForkingTokens`` (surrogate on high-entropy tokens only), ``KLCov`` and
    ``ClipCov`` (covariance-selected tokens). Each takes its coefficient
    ``coef``; 0 gives vanilla PPO.

    Args:
        policy: where the actor comes from (a local HF folder via
            ``PretrainedSource`` or a random tiny model via ``TinyRandomSource``);
            its tokenizer (with chat template) renders the prompts.
        task: prompts and rewards (``MathTask``, ``CountdownTask``, ``HHTask``, …).
        regularizers: strategy objects acting on the policy-loss pass, from
            ``tre_lightning.regularizers``: Ent, TREK, TREP, MinEnt,
            ForkingTokens, KLCov, ClipCov (a list, or a dict name ->
            regularizer as Hydra composes it); None = vanilla PPO.
        critic: where the critic's backbone comes from; None = a fresh copy of
            ``policy`` (the paper: a value head on a copy of the base model).
        share_backbone: put the value head on the actor's last hidden state
            instead of a separate critic (one backward drives both; the critic
            optimizer holds the head only).
        reference: the frozen reference model for a KL in the reward
            (``ppo.kl_coef > 0``); None = a frozen copy of the initial actor.
        rollout: training sampling (n, temperature, top-p, lengths).
        ppo: the PPO update (batch sizes, clipping, GAE, aggregation, KL).
        optim: learning rates, warm-up and schedules of the two optimizers.
        evaluation: the validation protocol (n = 8, temperature 1.0, top-p 0.7).
        engine: the rollout engine; None = ``HFGenerateEngine`` on the actor.
        seed: seeds the data order and each iteration's sampling (from the seed,
            the iteration and the process rank), so a resumed run repeats the
            uninterrupted one exactly.
        gradient_checkpointing: recompute activations in backward for actor and critic
            (HF gradient checkpointing; under FSDP2 the non-reentrant per-layer
            activation checkpointing of ``fsdp``, whatever ``fsdp.activation_checkpointing`` says).
        fsdp: sharding options used under Lightning's ``ModelParallelStrategy``
            (FSDP2, data parallel): mixed precision, activation checkpointing,
            resharding, CPU offload (:class:`~tre_lightning.models.fsdp.FSDPConfig`);
            ignored without that strategy. None = the defaults.
    """

    def __init__(
        self,
        policy: ModelSource,
        task: Task,
        regularizers: Sequence[Regularizer] | Mapping[str, Regularizer] | None = None,
        critic: ModelSource | None = None,
        share_backbone: bool = False,
        reference: ModelSource | None = None,
        rollout: RolloutConfig | None = None,
        ppo: PPOConfig | None = None,
        optim: OptimConfig | None = None,
        evaluation: EvalConfig | None = None,
        engine: RolloutEngine | None = None,
        seed: int = 0,
        gradient_checkpointing: bool = False,
        fsdp: FSDPConfig | None = None,
    ) -> None:
        super().__init__()
        _require_objects(policy=policy, task=task, critic=critic, reference=reference, engine=engine,
                         regularizers=regularizers)
        rollout = _as_config(rollout, RolloutConfig, "rollout")
        ppo = _as_config(ppo, PPOConfig, "ppo")
        optim = _as_config(optim, OptimConfig, "optim")
        evaluation = _as_config(evaluation, EvalConfig, "evaluation")
        self.automatic_optimization = False
        self.policy_source = policy
        self.critic_source = critic
        self.reference_source = reference
        self.task = task
        self.regularizers: list[Regularizer] = _as_list(regularizers)
        self.share_backbone = share_backbone
        self.rollout_cfg = rollout if rollout is not None else RolloutConfig()
        self.ppo_cfg = ppo if ppo is not None else PPOConfig()
        self.optim_cfg = optim if optim is not None else OptimConfig()
        self.eval_cfg = evaluation if evaluation is not None else EvalConfig()
        self.ppo_cfg.check_micro_batch(self.rollout_cfg.n)
        if share_backbone and critic is not None:
            raise ValueError("share_backbone=True puts the value head on the actor: do not also give a critic source")
        self.engine: RolloutEngine = engine if engine is not None else HFGenerateEngine()
        self.seed = seed
        self.gradient_checkpointing = gradient_checkpointing
        self.fsdp_cfg: FSDPConfig = _as_config(fsdp, FSDPConfig, "fsdp") or FSDPConfig()
        self.tokenizer = policy.tokenizer()
        # plain values only, so that checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "policy": repr(policy),
                "task": repr(task),
                "regularizers": [repr(r) for r in self.regularizers] or None,
                "critic": None if critic is None else repr(critic),
                "share_backbone": share_backbone,
                "reference": None if reference is None else repr(reference),
                "rollout": dataclasses.asdict(self.rollout_cfg),
                "ppo": dataclasses.asdict(self.ppo_cfg),
                "optim": dataclasses.asdict(self.optim_cfg),
                "evaluation": dataclasses.asdict(self.eval_cfg),
                "seed": seed,
                "fsdp": dataclasses.asdict(self.fsdp_cfg),
            }
        )

        # built in configure_model (so that a sharding strategy can wrap them there)
        self.actor: nn.Module | None = None
        self.critic: ValueModel | None = None
        self.value_head: ValueHead | None = None
        self.ref: nn.Module | None = None

        self._data_position = DataPosition()
        self._nonfinite_total = 0
        self._nonfinite_in_a_row = 0
        self._pending_rng: dict[str, Any] | None = None
        self._val_rng: dict[str, Any] | None = None
        self.val_metrics = build_eval_metrics(task, self.eval_cfg)

    # ------------------------------------------------------------------ models

    def configure_model(self) -> None:
        """Build actor, critic (or shared head) and reference; idempotent."""
        if self.actor is not None:
            return
        for name, src in (("policy", self.policy_source), ("critic", self.critic_source)):
            if getattr(src, "load_in_4bit", False):
                raise ValueError(
                    f"the {name} source has load_in_4bit=True: 4-bit loading is for frozen models (the reference "
                    "model); the actor and the critic are trained in full precision"
                )
        self.actor = self.policy_source.causal_lm().train()
        source = self.critic_source if self.critic_source is not None else self.policy_source
        backbone = None if self.share_backbone else source.causal_lm()
        with torch.random.fork_rng(devices=[]):  # the value head's init depends on the seed only
            torch.manual_seed(self.seed)
            if self.share_backbone:
                self.value_head = ValueHead(int(self.actor.config.hidden_size))
            else:
                self.critic = ValueModel.from_causal_lm(backbone).train()
        if self.ppo_cfg.kl_coef > 0:
            ref = freeze(
                self.reference_source.causal_lm() if self.reference_source is not None else copy.deepcopy(self.actor)
            )
            if has_4bit_layers(ref):
                # a 4-bit frozen model (PretrainedSource(load_in_4bit=True)) is kept outside the module tree: it is
                # rebuilt from its source, so it is not checkpointed, not moved by Lightning (it was loaded on this
                # process's device) and not sharded (FSDP2 cannot shard bitsandbytes' Params4bit)
                object.__setattr__(self, "ref", ref)
            else:
                self.ref = ref
        if self.gradient_checkpointing and self.device_mesh is None:  # under FSDP2: shard_models' non-reentrant AC
            self.actor.gradient_checkpointing_enable()
            if self.critic is not None:
                self.critic.backbone.gradient_checkpointing_enable()
        self.shard_models()
        self.engine.sync_weights(self.actor)

    def shard_models(self) -> None:
        """FSDP2 data-parallel sharding under Lightning's ``ModelParallelStrategy``; a no-op without it.

        With the strategy's device mesh (``self.device_mesh``), actor and critic
        get one ``fully_shard`` per decoder layer (the layer class read from the
        HF model) and one for the root, over the ``data_parallel`` mesh
        dimension, with the options of ``self.fsdp_cfg`` (mixed precision,
        non-reentrant activation checkpointing when ``fsdp.activation_checkpointing``
        or ``gradient_checkpointing`` is set, resharding, CPU offload). A shared
        value head is sharded as one group; the reference model is sharded
        too (without activation checkpointing) unless it is 4-bit, which FSDP2
        cannot shard: every rank then holds the whole 4-bit copy. Tensor
        parallelism is not supported (``tensor_parallel_size`` must be 1).
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        from tre_lightning.models.fsdp import mixed_precision_policy, shard_model

        names = tuple(mesh.mesh_dim_names or ())
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "PPOModule shards data-parallel only (FSDP2); tensor parallelism is not supported: use "
                "ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1)"
            )
        dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        kwargs = self.fsdp_cfg.shard_kwargs()
        kwargs["activation_checkpointing"] = kwargs["activation_checkpointing"] or self.gradient_checkpointing
        assert self.actor is not None
        shard_model(self.actor, dp_mesh, **kwargs)
        if self.critic is not None:
            shard_model(self.critic, dp_mesh, **kwargs)
            # ValueModel returns a slice of the head's output; the module never modifies it in place
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPValueModel\) returned a view")
        if self.value_head is not None:  # a plain module: shard it whole so that its gradients are reduced
            fully_shard(self.value_head, mesh=dp_mesh, mp_policy=mixed_precision_policy(kwargs["mixed_precision"]),
                        reshard_after_forward=False)
        if self.ref is not None and not has_4bit_layers(self.ref):
            shard_model(self.ref, dp_mesh, **{**kwargs, "activation_checkpointing": False})

    def _generation_context(self) -> Any:
        """Around HF-engine generation with a sharded actor: keep its full weights gathered for the call."""
        if (
            self.actor is not None
            and self.fsdp_cfg.gather_for_generation
            and isinstance(self.engine, HFGenerateEngine)
            and is_sharded(self.actor)
        ):
            return gathered_for_generation(self.actor)
        return contextlib.nullcontext()

    def critic_parameters(self) -> list[nn.Parameter]:
        """Parameters the critic optimizer updates (the separate critic, or the shared head)."""
        module = self.value_head if self.share_backbone else self.critic
        assert module is not None
        return list(module.parameters())

    def configure_optimizers(self) -> Any:
        assert self.actor is not None, "configure_model() must run first"
        if self.trainer is not None and self.trainer.precision == "16-mixed":
            raise ValueError("precision='16-mixed' (fp16 with a grad scaler) is not supported; use bf16-mixed or 32")
        actor_opt = build_optimizer(self.actor.parameters(), self.optim_cfg.actor_lr, self.optim_cfg)
        critic_opt = build_optimizer(self.critic_parameters(), self.optim_cfg.critic_lr, self.optim_cfg)
        total = self._total_iterations()
        schedulers = [
            {"scheduler": build_scheduler(actor_opt, self.optim_cfg, total, critic=False), "interval": "step",
             "name": "lr/actor"},
            {"scheduler": build_scheduler(critic_opt, self.optim_cfg, total, critic=True), "interval": "step",
             "name": "lr/critic"},
        ]
        return [actor_opt, critic_opt], schedulers

    def _total_iterations(self) -> int | None:
        if self.optim_cfg.total_steps is not None:
            return self.optim_cfg.total_steps
        try:
            total = self.trainer.estimated_stepping_batches
        except (RuntimeError, AttributeError):
            return None
        return int(total) if math.isfinite(total) and total > 0 else None

    # -------------------------------------------------------------------- data

    def train_dataloader(self) -> Any:
        dataset = PromptBatches(
            self.task.train_examples(),
            self.task,
            self.tokenizer,
            self.ppo_cfg.batch_size,
            max_prompt_length=self.rollout_cfg.max_prompt_length,
            prompt_overflow=self.rollout_cfg.prompt_overflow,
            shuffle=True,
            drop_last=True,
            seed=self.seed,
            position=copy.copy(self._data_position),
        )
        if dataset.position.batch >= len(dataset):  # saved at the very end of an epoch
            dataset.position = DataPosition(dataset.position.epoch + 1, 0)
        return prompt_loader(dataset)

    def val_dataloader(self) -> Any:
        examples = self.task.val_examples()
        if self.eval_cfg.max_examples is not None:
            examples = examples[: self.eval_cfg.max_examples]
        dataset = PromptBatches(
            examples,
            self.task,
            self.tokenizer,
            self.eval_cfg.batch_size,
            max_prompt_length=self.rollout_cfg.max_prompt_length,
            prompt_overflow=self.rollout_cfg.prompt_overflow,
            shuffle=False,
            drop_last=False,
        )
        return prompt_loader(dataset)

    # -------------------------------------------------------------- training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """One PPO iteration over a batch of prompts (see the module docstring)."""
        generator = self._begin_iteration(batch)
        metrics = _Means()
        n = self.rollout_cfg.n

        # 1. rollout
        t0 = time.perf_counter()
        rollout = self.generate(batch["input_ids"], batch["attention_mask"], self.rollout_cfg.sampling())
        rollout_s = time.perf_counter() - t0

        # 2. reward
        examples = _repeat([self.task.train_examples()[i] for i in batch["index"].tolist()], n)
        responses = self.decode_responses(rollout)
        scores = self.score(examples, responses)

        # 3. old log-probs, values (+ reference log-probs)
        t1 = time.perf_counter()
        old_log_probs, old_values, ref_log_probs = self.score_rollout(rollout)
        mask = rollout.response_mask.to(old_log_probs.dtype)

        # 4. token rewards and GAE
        kl = kl_penalty(old_log_probs, ref_log_probs, self.ppo_cfg.kl_estimator) if ref_log_probs is not None else None
        token_rewards = token_level_rewards(scores, mask, kl=kl, kl_coef=self.ppo_cfg.kl_coef if kl is not None else 0.0)
        advantages, returns = compute_gae(token_rewards, old_values, mask, self.ppo_cfg.gamma, self.ppo_cfg.lam)
        if self.ppo_cfg.whiten_advantages:
            # over the valid tokens of the whole global batch (all data-parallel ranks)
            advantages = global_masked_whiten(advantages, mask, all_reduce=self._data_parallel()[0])
        experience = Experience.from_rollout(
            rollout, old_log_probs=old_log_probs, old_values=old_values, advantages=advantages, returns=returns
        )

        # 5. PPO epochs: shuffled mini-batches -> micro-batches -> optimizer steps
        for _ in range(self.ppo_cfg.ppo_epochs):
            for mini_batch in self.mini_batches(experience, generator):
                self.optimization_step(mini_batch, metrics)
        train_s = time.perf_counter() - t1

        # 6. schedules, engine weights, step counter
        for scheduler in self._schedulers():
            scheduler.step()
        self.engine.sync_weights(self.actor)
        self._count_iteration()

        self._rollout_metrics(metrics, rollout, scores, old_values, returns, advantages, mask, kl, batch)
        self._reward_failure_metrics(metrics)
        metrics.add("perf/rollout_tokens_per_s", float(rollout.response_lengths.sum()) / max(rollout_s, 1e-9))
        trained_tokens = float(experience.attention_mask.sum()) * self.ppo_cfg.ppo_epochs
        metrics.add("perf/train_tokens_per_s", trained_tokens / max(train_s, 1e-9))
        metrics.add("perf/rollout_s", rollout_s)
        metrics.add("perf/train_s", train_s)
        prompts = self.tokenizer.batch_decode(
            [ids[m.bool()] for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)],
            skip_special_tokens=False,
        )
        return {
            "metrics": metrics.result(),
            "samples": {"prompt": _repeat(prompts, n), "response": responses, "reward": scores.tolist()},
        }

    def _begin_iteration(self, batch: Mapping[str, Any]) -> torch.Generator:
        """Restore RNG after a resume, reseed this iteration, record the data position."""
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
        seed = _step_seed(self.seed, self.global_step, self.global_rank)
        torch.manual_seed(seed)
        self._data_position = DataPosition(epoch=int(batch["epoch"]), batch=int(batch["batch"]) + 1)
        return torch.Generator().manual_seed(seed ^ 0x5DEECE66D)

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams) -> Rollout:
        """Sample responses with the engine (no gradients)."""
        with torch.no_grad(), self._generation_context():
            return self.engine.generate(prompt_ids, prompt_mask, sampling)

    def decode_responses(self, rollout: Rollout) -> list[str]:
        """Response texts (valid tokens only, special tokens dropped); never raises (an undecodable row is "")."""
        texts, self._decode_failures = decode_responses(self.tokenizer, rollout.response_ids, rollout.response_lengths)
        return texts

    @property
    def reward_guard(self) -> RewardGuard:
        """Calls ``task.score`` isolated and bounded by ``rollout.score_timeout`` (tre_lightning.tasks.guard)."""
        guard = self.__dict__.get("_reward_guard")
        if guard is None or guard.task is not self.task:
            guard = RewardGuard(self.task, timeout=self.rollout_cfg.score_timeout)
            self.__dict__["_reward_guard"] = guard
        return guard

    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> Tensor:
        """Task rewards as an (N,) float32 tensor on the module's device, all finite.

        A failing reward function (raises, times out, wrong length, non-finite
        values) gives 0 to the affected responses, a warning and the
        ``reward/failures`` … metrics of the step; training goes on.
        """
        report = self.reward_guard.score(examples, responses)
        self._reward_report = report
        return torch.tensor(report.rewards, dtype=torch.float32, device=self.device)

    def _reward_failure_metrics(self, metrics: _Means) -> None:
        report = self.__dict__.get("_reward_report")
        if report is not None:
            for name, value in report.metrics().items():
                metrics.add(name, value)
        metrics.add("reward/decode_failures", float(self.__dict__.get("_decode_failures", 0)))

    @torch.no_grad()
    def score_rollout(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor | None]:
        """Behaviour log-probs, values and (with a KL) reference log-probs, (N, R) each, float32."""
        assert self.actor is not None
        exp = Experience.from_rollout(rollout)
        shape = rollout.response_ids.shape
        log_probs = torch.zeros(shape, dtype=torch.float32, device=self.device)
        values = torch.zeros(shape, dtype=torch.float32, device=self.device)
        ref = torch.zeros(shape, dtype=torch.float32, device=self.device) if self.ref is not None else None
        size = self.ppo_cfg.micro_batch_size
        temperature = self.rollout_cfg.temperature
        for start, mb in zip(range(0, len(exp), size), exp.micro_batches(size), strict=True):
            rows = slice(start, start + len(mb))
            width = mb.response_ids.shape[1]
            logits, hidden = policy_forward(
                self.actor, mb.input_ids, mb.attention_mask, width, temperature, return_hidden=self.share_backbone
            )
            log_probs[rows, :width] = log_probs_from_logits(logits, mb.response_ids).float()
            values[rows, :width] = self.compute_values(mb, hidden)
            if self.ref is not None:
                ref_logits, _ = policy_forward(self.ref, mb.input_ids, mb.attention_mask, width, temperature)
                ref[rows, :width] = log_probs_from_logits(ref_logits, mb.response_ids).float()
        mask = rollout.response_mask.bool()
        zero = torch.zeros((), device=self.device)
        return (
            torch.where(mask, log_probs, zero),
            torch.where(mask, values, zero),
            torch.where(mask, ref, zero) if ref is not None else None,
        )

    def compute_values(self, mb: Experience, hidden: Tensor | None) -> Tensor:
        """(B, R) values: from the shared head on ``hidden``, or from the separate critic."""
        if self.share_backbone:
            assert self.value_head is not None and hidden is not None
            return self.value_head(hidden)
        assert self.critic is not None
        return self.critic(mb.input_ids, mb.attention_mask, mb.response_ids.shape[1])

    def mini_batches(self, experience: Experience, generator: torch.Generator) -> list[Experience]:
        """One epoch of mini-batches of ``mini_batch_size × n`` sequences (shuffled if configured)."""
        n_rows = len(experience)
        if self.ppo_cfg.shuffle:
            order = torch.randperm(n_rows, generator=generator).to(experience.response_ids.device)
        else:
            order = torch.arange(n_rows, device=experience.response_ids.device)
        size = self.ppo_cfg.mini_batch_size * self.rollout_cfg.n
        return [experience.select(order[i : i + size]) for i in range(0, n_rows, size)]

    def optimization_step(self, mini_batch: Experience, metrics: _Means) -> None:
        """Gradient accumulation over micro-batches, then one step of each optimizer."""
        actor_opt, critic_opt = self._raw_optimizers()
        actor_opt.zero_grad(set_to_none=True)
        critic_opt.zero_grad(set_to_none=True)
        mode = self.ppo_cfg.loss_aggregation
        # the global mini-batch's denominator / W (W ranks average their gradients): see _data_parallel
        all_reduce, world = self._data_parallel()
        normalizer = global_loss_normalizer(mini_batch.response_mask.float(), mode, all_reduce=all_reduce,
                                            world_size=world)
        policy_total = torch.zeros((), device=self.device)
        value_total = torch.zeros((), device=self.device)
        for micro in mini_batch.micro_batches(self.ppo_cfg.micro_batch_size):
            weight = float(micro.response_mask.sum())
            policy_loss, hidden = self.policy_loss(micro, normalizer, metrics, weight)
            values = self.compute_values(micro, hidden)
            value_loss = self.value_loss(micro, values, normalizer, metrics, weight)
            if self.share_backbone:
                self.manual_backward(policy_loss + self.ppo_cfg.vf_coef * value_loss)
            else:
                self.manual_backward(policy_loss)
                self.manual_backward(self.ppo_cfg.vf_coef * value_loss)
            policy_total = policy_total + policy_loss.detach().float()
            value_total = value_total + value_loss.detach().float()
        metrics.add("train/policy_loss", policy_total)
        metrics.add("train/value_loss", value_total)
        actor_norm = clip_grad_norm(self.actor.parameters(), self.ppo_cfg.max_grad_norm)
        critic_norm = clip_grad_norm(self.critic_parameters(), self.ppo_cfg.max_grad_norm)
        metrics.add("train/grad_norm_actor", actor_norm)
        metrics.add("train/grad_norm_critic", critic_norm)
        metrics.add_max("train/grad_norm_actor_max", actor_norm)
        checks = torch.stack([policy_total, value_total, actor_norm.float().to(self.device),
                              critic_norm.float().to(self.device)])
        finite = self._all_ranks(bool(torch.isfinite(checks).all().item()))
        if finite:
            actor_opt.step()
            critic_opt.step()
            self._nonfinite_in_a_row = 0
        else:
            self._nonfinite_total += 1
            self._nonfinite_in_a_row += 1
            warnings.warn(
                f"non-finite loss or gradient at iteration {self.global_step}: optimizer step skipped "
                f"({self._nonfinite_in_a_row} in a row)",
                stacklevel=2,
            )
            if self._nonfinite_in_a_row >= self.ppo_cfg.max_consecutive_nonfinite:
                raise NonFiniteError(
                    f"{self._nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                    f"(PPOConfig.max_consecutive_nonfinite={self.ppo_cfg.max_consecutive_nonfinite}); "
                    "lower the learning rates or regularizer coefficients, or check the rewards"
                )
        actor_opt.zero_grad(set_to_none=True)
        critic_opt.zero_grad(set_to_none=True)
        metrics.add_max("train/nonfinite_skips", float(self._nonfinite_total))

    def policy_loss(
        self, micro: Experience, normalizer: Tensor, metrics: _Means, weight: float
    ) -> tuple[Tensor, Tensor | None]:
        """The micro-batch's share of the mini-batch policy loss (surrogate + regularizers)."""
        cfg = self.ppo_cfg
        mask = micro.response_mask.float()
        logits, hidden = policy_forward(
            self.actor,
            micro.input_ids,
            micro.attention_mask,
            micro.response_ids.shape[1],
            self.rollout_cfg.temperature,
            return_hidden=self.share_backbone,
        )
        log_probs = log_probs_from_logits(logits, micro.response_ids)
        pg = clipped_policy_loss(
            log_probs,
            micro.old_log_probs,
            micro.advantages,
            mask,
            clip_ratio_low=cfg.clip_ratio_low,
            clip_ratio_high=cfg.clip_ratio_high,
            dual_clip=cfg.dual_clip,
        )
        ctx = PolicyContext(
            logits=logits,
            log_probs=log_probs,
            old_log_probs=micro.old_log_probs,
            advantages=micro.advantages,
            mask=mask,
            clip_ratio_low=cfg.clip_ratio_low,
            clip_ratio_high=cfg.clip_ratio_high,
        )
        outputs = [(reg, reg(ctx)) for reg in self.regularizers]
        loss = compose_policy_loss(pg.per_token, mask, outputs, cfg.loss_aggregation, normalizer)

        with torch.no_grad():
            p_max, entropy = token_stats(logits.detach())
            metrics.add("policy/p_max", masked_mean(p_max.float(), mask), weight)
            metrics.add("policy/entropy", masked_mean(entropy.float(), mask), weight)
            metrics.add("policy/clipfrac", pg.clipfrac, weight)
            metrics.add("policy/clipfrac_lower", pg.clipfrac_lower, weight)
            metrics.add("policy/approx_kl", pg.approx_kl, weight)
            for _, out in outputs:
                for name, value in out.metrics.items():
                    metrics.add(name if "/" in name else f"policy/{name}", value, weight)
        return loss, hidden

    def value_loss(self, micro: Experience, values: Tensor, normalizer: Tensor, metrics: _Means, weight: float) -> Tensor:
        """The micro-batch's share of the mini-batch value loss."""
        mask = micro.response_mask.float()
        out = clipped_value_loss(
            values,
            micro.old_values,
            micro.returns,
            mask,
            clip_range=self.ppo_cfg.value_clip_range,
            scale=self.ppo_cfg.value_loss_scale,
        )
        loss = aggregate_loss(out.per_token, mask, self.ppo_cfg.loss_aggregation, normalizer=normalizer)
        metrics.add("value/clipfrac", out.vf_clipfrac, weight)
        metrics.add("value/loss", masked_mean(out.per_token.detach(), mask), weight)
        return loss

    def _rollout_metrics(
        self,
        metrics: _Means,
        rollout: Rollout,
        scores: Tensor,
        values: Tensor,
        returns: Tensor,
        advantages: Tensor,
        mask: Tensor,
        kl: Tensor | None,
        batch: Mapping[str, Any],
    ) -> None:
        lengths = rollout.response_lengths.float()
        metrics.add("reward/mean", scores.mean())
        metrics.add("reward/std", scores.std(unbiased=False) if scores.numel() > 1 else 0.0)
        metrics.add("reward/max", scores.max())
        metrics.add("reward/min", scores.min())
        metrics.add("train/response_length", lengths.mean())
        metrics.add("train/response_length_max", lengths.max())
        metrics.add("train/response_clip_ratio", (lengths >= self.rollout_cfg.max_new_tokens).float().mean())
        metrics.add("train/prompt_length", rollout.prompt_mask.float().sum(dim=1).mean())
        metrics.add("train/truncated_prompts", float(batch.get("truncated", 0)))
        var_returns = masked_var(returns, mask)
        # 1 - Var(R - V) / Var(R); undefined (logged as 0) when the returns are constant
        explained = 1.0 - masked_var(returns - values, mask) / var_returns if float(var_returns) > 1e-8 else 0.0
        metrics.add("value/explained_variance", explained)
        metrics.add("value/mean", masked_mean(values, mask))
        metrics.add("value/returns_mean", masked_mean(returns, mask))
        metrics.add("train/advantages_mean", masked_mean(advantages, mask))
        if kl is not None:
            metrics.add("train/ref_kl", masked_mean(kl, mask))

    # ---------------------------------------------------------- optimization

    def _raw_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        optimizers = self.optimizers(use_pl_optimizer=False)
        if not isinstance(optimizers, list) or len(optimizers) != 2:
            raise RuntimeError("PPOModule expects exactly two optimizers (actor, critic)")
        return optimizers[0], optimizers[1]

    def _schedulers(self) -> list[Any]:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return list(schedulers) if isinstance(schedulers, list) else [schedulers]

    def _count_iteration(self) -> None:
        """Make ``trainer.global_step`` count PPO iterations.

        The optimizers are stepped directly (several steps of two optimizers per
        iteration); Lightning's manual-optimization step counter is advanced once
        here instead, so ``max_steps``, checkpoint intervals and logging steps
        are in PPO iterations.
        """
        try:
            progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        except AttributeError as err:  # pragma: no cover - depends on Lightning internals
            raise RuntimeError("this Lightning version moved the manual-optimization step counter") from err
        progress.increment_ready()
        progress.increment_completed()

    def _data_parallel(self) -> tuple[AllReduce | None, int]:
        """(sum over the data-parallel ranks, their number W); (None, 1) in one process.

        Under FSDP2 (``ModelParallelStrategy``) the group of the mesh's
        ``data_parallel`` dimension, over which FSDP averages the gradients;
        under another multi-process strategy (DDP) the default group.
        Advantage whitening and the loss denominators use it to be global.
        """
        mesh = self.device_mesh
        if mesh is not None:
            names = tuple(mesh.mesh_dim_names or ())
            dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
            size = dp_mesh.size()
            return (process_group_all_reduce(dp_mesh.get_group()), size) if size > 1 else (None, 1)
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            return process_group_all_reduce(), self.trainer.world_size
        return None, 1

    def _all_ranks(self, flag: bool) -> bool:
        """True only if ``flag`` is True on every process (identical decisions everywhere)."""
        if self._trainer is None:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=True))

    # ------------------------------------------------------------ validation

    def on_validation_start(self) -> None:
        self._val_rng = _rng_state()
        torch.manual_seed(self.eval_cfg.seed + self.global_rank)

    def on_validation_epoch_start(self) -> None:
        # fresh metric states made in this loop's grad mode: a `trainer.validate` before `fit` runs under
        # inference mode, and states created there could not be updated by fit's (no-grad) validation
        for metric in self.val_metrics.values():
            metric.reset()

    def on_validation_end(self) -> None:
        if self._val_rng is not None:
            _set_rng_state(self._val_rng)
            self._val_rng = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The evaluation protocol on one batch of test prompts (same loop as ``tre-eval``)."""
        with self._generation_context():
            rewards, lengths = score_batch(self.engine, self.tokenizer, self.reward_guard.as_task(),
                                           self.task.val_examples(), batch, self.eval_cfg)
        update_eval_metrics(self.val_metrics, rewards, lengths)
        for key, metric in self.val_metrics.items():
            self.log(metric_name(key), metric, on_step=False, on_epoch=True)

    # ---------------------------------------------------------- checkpointing

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the data position, RNG states, counters, and what rebuilds the actor without a config
        (its HF config and the tokenizer files), all loadable with ``weights_only=True``."""
        checkpoint["tre_lightning"] = {
            "data_position": self._data_position.state_dict(),
            "rng": _rng_state(),
            "nonfinite_total": self._nonfinite_total,
            "nonfinite_in_a_row": self._nonfinite_in_a_row,
            "actor_config": self.actor.config.to_dict() if self.actor is not None else None,
            "tokenizer_files": tokenizer_files(self.tokenizer),
            "task_binary_reward": bool(self.task.binary_reward),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("tre_lightning")
        if state is None:
            return
        self._data_position = DataPosition.from_state_dict(state["data_position"])
        self._pending_rng = state.get("rng")
        self._nonfinite_total = int(state.get("nonfinite_total", 0))
        self._nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        # the data position is restored here (the loader restarts from it), so Lightning's
        # generic warning about non-resumable loaders does not apply
        warnings.filterwarnings("ignore", message=_RESUME_WARNING)

    def export_hf(self, path: str) -> None:
        """Save the actor as an ordinary HF model folder (``save_pretrained``) with the tokenizer.

        Written by the global-zero process only. A sharded (FSDP2) actor is
        gathered to full tensors first, a collective: call this on every
        process then (``tre-train`` does); rank 0 writes, and ``config.json``
        names the original architecture (``Qwen2ForCausalLM``).
        """
        assert self.actor is not None, "configure_model() must run first"
        if is_sharded(self.actor):
            save_hf_pretrained(self.actor, path, tokenizer=self.tokenizer)
            return
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        export_hf(self.actor, self.tokenizer, path)


def compose_policy_loss(
    surrogate: Tensor,
    mask: Tensor,
    outputs: Sequence[tuple[Regularizer, RegularizerOutput]],
    mode: str,
    normalizer: Tensor,
) -> Tensor:
    """Surrogate + regularizers for one micro-batch (shares of the mini-batch loss).

    Where any ``pg_detach`` is True the surrogate's gradient is stopped; the
    surrogate's mask is ``mask × Π pg_weight``. For ``token-mean`` the
    surrogate's denominator is the mini-batch token count scaled by the
    fraction of this micro-batch's weight that ``pg_weight`` keeps (exact for
    one micro-batch, and for selections that keep the same fraction of every
    micro-batch; data-parallel ranks act as further micro-batches, since
    ``normalizer`` is the global denominator / W); the seq-mean modes keep
    the mini-batch sequence count.
    Each regularizer adds ``coef × aggregate(loss, mask)``.
    """
    pg_mask = mask
    detach: Tensor | None = None
    for _, out in outputs:
        if out.pg_weight is not None:
            pg_mask = pg_mask * out.pg_weight.to(pg_mask.dtype)
        if out.pg_detach is not None:
            detach = out.pg_detach if detach is None else (detach | out.pg_detach)
    if detach is not None:
        surrogate = torch.where(detach, surrogate.detach(), surrogate)
    pg_normalizer = normalizer
    if pg_mask is not mask and mode == "token-mean":
        kept = pg_mask.sum() / mask.sum().clamp_min(1e-12)
        pg_normalizer = (normalizer * kept).clamp_min(1e-12)
    loss = aggregate_loss(surrogate, pg_mask, mode, normalizer=pg_normalizer)
    for reg, out in outputs:
        if out.loss is not None:
            loss = loss + reg.coef * aggregate_loss(out.loss, mask, mode, normalizer=normalizer)
    return loss


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The tokenizer's ``save_pretrained`` files as {name: text} (all tokenizer files are text)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(folder).iterdir() if p.is_file()}


def export_hf(actor: nn.Module, tokenizer: Any, path: str) -> None:
    """``actor.save_pretrained(path)`` and ``tokenizer.save_pretrained(path)``."""
    actor.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _require_objects(**objects: Any) -> None:
    """Objects arrive as objects; a string means a checkpoint's stored description (its repr)."""
    for name, value in objects.items():
        if isinstance(value, str) or (isinstance(value, list) and any(isinstance(v, str) for v in value)):
            raise TypeError(
                f"PPOModule got a string for `{name}` ({value!r}): checkpoints store the objects' descriptions "
                "only. Pass the objects again, e.g. PPOModule.load_from_checkpoint(path, policy=..., task=..., "
                "regularizers=[...]); the configs (rollout, ppo, optim, evaluation) come from the checkpoint."
            )


def _as_config(value: Any, cls: type, name: str) -> Any:
    """A config record, or a dict of its fields (as stored in a checkpoint's hyper-parameters)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**value)
    raise TypeError(f"`{name}` must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def _as_list(regularizers: Sequence[Regularizer] | Mapping[str, Regularizer] | None) -> list[Regularizer]:
    if regularizers is None:
        return []
    items = list(regularizers.values()) if isinstance(regularizers, Mapping) else list(regularizers)
    for reg in items:
        if not isinstance(reg, Regularizer):
            raise TypeError(f"{reg!r} is not a Regularizer (needs a `coef` and __call__(PolicyContext))")
    return items


def _repeat(items: Sequence[Any], n: int) -> list[Any]:
    return [item for item in items for _ in range(n)]
