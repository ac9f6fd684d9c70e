"""Plain, validated configuration records of the PPO run (rollout, update, optimizers).

Every field is a plain value (int, float, str, bool, None or a list of ints),
so the same classes are built from Hydra YAML (``_target_``), from the
Lightning CLI (``class_path`` / ``init_args``) and from Python. Each class
checks its fields in ``__post_init__`` and raises ``ValueError`` naming the
field and the allowed range. Defaults are the paper's (appendix A.1, Table 2,
and the run settings in ``reference/anchor-notes.md``) unless stated.

Units: ``PPOConfig.batch_size`` and ``mini_batch_size`` count *prompts* (each
brings its ``RolloutConfig.n`` responses, as in verl and the paper's Table 2);
``micro_batch_size`` counts *sequences* (one forward/backward pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tre_lightning.checks import ArgumentError, boolean, integer, one_of, optional, real
from tre_lightning.ppo import KL_ESTIMATORS, LOSS_AGGREGATIONS, KLEstimator, LossAggregation
from tre_lightning.rollout.base import SamplingParams, sampling_of

__all__ = ["OptimConfig", "PPOConfig", "RolloutConfig"]

PromptOverflow = Literal["truncate_left", "error"]
ScheduleName = Literal["constant", "linear", "cosine"]


@dataclass
class RolloutConfig:
    """How training responses are sampled (paper: n = 8, temperature 1.0, top-p 1.0).

    Attributes:
        n: responses per prompt, >= 1.
        temperature: sampling temperature, > 0; the training log-probs use the
            same temperature (logits / temperature), as verl does.
        top_p: nucleus sampling, in (0, 1] (1.0 = off; anything else makes the
            behaviour policy differ from π_θ).
        top_k: 0 = off, else >= 1.
        max_new_tokens: response length cap, >= 1 (paper: 8192 MATH, 512
            Countdown, 1024 HH).
        max_prompt_length: prompts longer than this (in tokens) overflow, >= 1.
        prompt_overflow: ``truncate_left`` keeps the last ``max_prompt_length``
            tokens (counted, with a warning); ``error`` raises.
        score_timeout: seconds one ``task.score`` call on a batch of responses
            may take, > 0, or None (no bound). Past it every response of the
            call scores 0 (counted as ``reward/score_timeouts``, with a warning)
            and training goes on; the call is abandoned in its worker thread.
            A backstop against a hung reward function: the tasks' graders
            bound each check themselves (e.g. MATH's 5 s per check).
        score_isolation: where ``task.score`` runs: ``process`` (a worker
            process, killed at the time limit whatever the reward does),
            ``thread`` (bounds only hangs that release the GIL; for rewards
            that need the trainer's GPU, e.g. HH's reward model) or ``auto``
            (the task's own ``score_isolation``, else a process). See
            :class:`~tre_lightning.tasks.guard.RewardGuard`.
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    max_prompt_length: int = 1024
    prompt_overflow: PromptOverflow = "truncate_left"
    score_timeout: float | None = 600.0
    score_isolation: Literal["auto", "process", "thread"] = "auto"

    def __post_init__(self) -> None:
        sampling_of(self)
        integer("max_prompt_length", self.max_prompt_length, 1)
        one_of("prompt_overflow", self.prompt_overflow, ("truncate_left", "error"))
        optional(real, "score_timeout", self.score_timeout, 0.0, low_open=True)
        one_of("score_isolation", self.score_isolation, ("auto", "process", "thread"))
        if self.score_isolation == "process" and self.score_timeout is None:
            raise ArgumentError("score_isolation", "'thread' or 'auto' when score_timeout is null (a worker "
                                "process is there to be killed at the time limit)", self.score_isolation)

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters for training rollouts."""
        return sampling_of(self)


@dataclass
class PPOConfig:
    """The PPO update (defaults: the paper's Table 2 and verl run settings).

    Attributes:
        batch_size: prompts per PPO iteration per process, >= 1 (the paper's
            global 512 = batch_size × number of data-parallel processes).
        mini_batch_size: prompts per optimizer step, >= 1, must divide
            ``batch_size`` (paper: 64); a mini-batch holds
            ``mini_batch_size × n`` sequences.
        micro_batch_size: sequences per forward/backward pass, >= 1, must
            divide ``mini_batch_size × n`` (checked by the module, which knows n).
        ppo_epochs: passes over the rollout batch, >= 1 (paper: 1).
        shuffle: shuffle sequences before splitting into mini-batches.
        clip_ratio_low: ε_low in [0, 1) (paper 0.2).
        clip_ratio_high: ε_high >= 0 (paper 0.2).
        dual_clip: dual-clip constant c > 1, or None (verl runs: 3.0).
        gamma: GAE discount in [0, 1] (paper 1.0).
        lam: GAE λ in [0, 1] (paper 1.0).
        whiten_advantages: whiten advantages over the batch's valid tokens (verl: yes).
        loss_aggregation: one of token-mean (paper), seq-mean-token-sum,
            seq-mean-token-mean, seq-mean-token-sum-norm.
        kl_coef: coefficient of the reference-model KL in the reward, >= 0
            (paper: 0.0, no reference model is built).
        kl_estimator: k1, abs, k2 or k3.
        value_clip_range: clip of the value loss around the rollout values, > 0,
            or None (verl 0.5).
        value_loss_scale: factor of the squared error in the value loss, > 0 (verl 0.5).
        vf_coef: weight of the value loss, > 0 (matters for the shared backbone,
            where one loss drives both).
        max_grad_norm: gradient-norm clip for each model, > 0, or None (verl 1.0).
        max_consecutive_nonfinite: skipped optimizer steps (non-finite loss or
            gradient) in a row before training stops with an error, >= 1.
    """

    batch_size: int = 512
    mini_batch_size: int = 64
    micro_batch_size: int = 8
    ppo_epochs: int = 1
    shuffle: bool = True
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    dual_clip: float | None = 3.0
    gamma: float = 1.0
    lam: float = 1.0
    whiten_advantages: bool = True
    loss_aggregation: LossAggregation = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k1"
    value_clip_range: float | None = 0.5
    value_loss_scale: float = 0.5
    vf_coef: float = 1.0
    max_grad_norm: float | None = 1.0
    max_consecutive_nonfinite: int = 5

    def __post_init__(self) -> None:
        integer("batch_size", self.batch_size, 1)
        integer("mini_batch_size", self.mini_batch_size, 1)
        integer("micro_batch_size", self.micro_batch_size, 1)
        if self.batch_size % self.mini_batch_size:
            raise ArgumentError("mini_batch_size", f"a divisor of batch_size ({self.batch_size})",
                                self.mini_batch_size)
        integer("ppo_epochs", self.ppo_epochs, 1)
        boolean("shuffle", self.shuffle)
        boolean("whiten_advantages", self.whiten_advantages)
        real("clip_ratio_low", self.clip_ratio_low, 0.0, 1.0, high_open=True)
        real("clip_ratio_high", self.clip_ratio_high, 0.0)
        optional(real, "dual_clip", self.dual_clip, 1.0, low_open=True)
        real("gamma", self.gamma, 0.0, 1.0)
        real("lam", self.lam, 0.0, 1.0)
        one_of("loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)
        real("kl_coef", self.kl_coef, 0.0)
        one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        optional(real, "value_clip_range", self.value_clip_range, 0.0, low_open=True)
        real("value_loss_scale", self.value_loss_scale, 0.0, low_open=True)
        real("vf_coef", self.vf_coef, 0.0, low_open=True)
        optional(real, "max_grad_norm", self.max_grad_norm, 0.0, low_open=True)
        integer("max_consecutive_nonfinite", self.max_consecutive_nonfinite, 1)

    def check_micro_batch(self, n: int) -> None:
        """Raise unless ``micro_batch_size`` divides a mini-batch of ``mini_batch_size × n`` sequences
        (the one check that needs the rollout's ``n``; the module calls it)."""
        sequences = self.mini_batch_size * n
        if self.micro_batch_size > sequences or sequences % self.micro_batch_size:
            raise ArgumentError(
                "ppo.micro_batch_size",
                f"a divisor of ppo.mini_batch_size × rollout.n = {self.mini_batch_size} × {n} = {sequences}",
                self.micro_batch_size,
            )


@dataclass
class OptimConfig:
    """AdamW for the actor and the critic, each with warm-up and a schedule.

    Attributes:
        actor_lr: actor learning rate, > 0 (paper 1e-6).
        critic_lr: critic (or shared value-head) learning rate, > 0 (paper 1e-5).
        weight_decay: AdamW weight decay, >= 0 (verl 0.01).
        betas: AdamW betas, each in [0, 1).
        eps: AdamW epsilon, > 0.
        warmup_ratio: fraction of the run's PPO iterations spent in linear
            warm-up, in [0, 1) (verl runs: actor 0.0, critic 0.05 via
            ``critic_warmup_ratio``). Ignored when ``warmup_steps`` is set.
        critic_warmup_ratio: the critic's warm-up fraction, in [0, 1), or None
            (= ``warmup_ratio``).
        warmup_steps: warm-up length in PPO iterations, >= 0, or None (use the ratios).
        schedule: after warm-up: constant (paper), linear or cosine decay to
            ``min_lr_ratio`` × lr.
        min_lr_ratio: floor of the decaying schedules, in [0, 1].
        total_steps: PPO iterations of the run for the schedule, >= 1, or None
            (= the trainer's estimate: ``max_steps`` or epochs × batches).
        eight_bit: 8-bit AdamW from bitsandbytes (the ``quant`` extra) for both
            optimizers, also under FSDP2.
    """

    actor_lr: float = 1e-6
    critic_lr: float = 1e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.0
    critic_warmup_ratio: float | None = 0.05
    warmup_steps: int | None = None
    schedule: ScheduleName = "constant"
    min_lr_ratio: float = 0.0
    total_steps: int | None = None
    eight_bit: bool = False

    def __post_init__(self) -> None:
        real("actor_lr", self.actor_lr, 0.0, low_open=True)
        real("critic_lr", self.critic_lr, 0.0, low_open=True)
        real("weight_decay", self.weight_decay, 0.0)
        if isinstance(self.betas, str | bytes) or not isinstance(self.betas, Sequence) or len(self.betas) != 2:
            raise ArgumentError("betas", "a pair [beta1, beta2]", self.betas)
        self.betas = [real(f"betas[{i}]", b, 0.0, 1.0, high_open=True) for i, b in enumerate(self.betas)]
        real("eps", self.eps, 0.0, low_open=True)
        real("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        optional(real, "critic_warmup_ratio", self.critic_warmup_ratio, 0.0, 1.0, high_open=True)
        optional(integer, "warmup_steps", self.warmup_steps, 0)
        one_of("schedule", self.schedule, ("constant", "linear", "cosine"))
        real("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        optional(integer, "total_steps", self.total_steps, 1)
        boolean("eight_bit", self.eight_bit)

    def warmup_for(self, total_steps: int, critic: bool) -> int:
        """Warm-up length in PPO iterations for the actor or the critic."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        ratio = self.critic_warmup_ratio if critic and self.critic_warmup_ratio is not None else self.warmup_ratio
        return int(ratio * total_steps)
