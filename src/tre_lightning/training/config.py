"""Plain, validated configuration records for the training core.

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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tre_lightning.rollout.base import SamplingParams

__all__ = ["EvalConfig", "OptimConfig", "PPOConfig", "RolloutConfig"]

PromptOverflow = Literal["truncate_left", "error"]
LossAggregationName = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLEstimatorName = Literal["k1", "abs", "k2", "k3"]
ScheduleName = Literal["constant", "linear", "cosine"]


def _fail(cls: str, name: str, allowed: str, value: object) -> ValueError:
    return ValueError(f"{cls}.{name} must be {allowed}, got {value!r}")


def _int_at_least(cls: str, name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(cls, name, f"an int >= {low}", value)


def _number(cls: str, name: str, value: object, low: float, high: float, *, low_open: bool = False,
            high_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise _fail(cls, name, f"a finite number in {left}{low}, {high}{right}", value)


def _sampling_params(cfg: Any) -> SamplingParams:
    """SamplingParams from a config's n / temperature / top_p / top_k / max_new_tokens."""
    return SamplingParams(
        n=cfg.n,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
    )


def _sampling(cls: str, cfg: Any) -> None:
    """The sampling fields shared by rollout and evaluation configs."""
    _int_at_least(cls, "n", cfg.n, 1)
    _number(cls, "temperature", cfg.temperature, 0.0, math.inf, low_open=True, high_open=True)
    _number(cls, "top_p", cfg.top_p, 0.0, 1.0, low_open=True)
    _int_at_least(cls, "top_k", cfg.top_k, 0)
    _int_at_least(cls, "max_new_tokens", cfg.max_new_tokens, 1)


def _choice(cls: str, name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _fail(cls, name, f"one of {list(allowed)}", value)


def _bool(cls: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(cls, name, "true or false", value)


def _list(cls: str, name: str, value: object) -> list:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise _fail(cls, name, "a list", value)
    return list(value)


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
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    max_prompt_length: int = 1024
    prompt_overflow: PromptOverflow = "truncate_left"
    score_timeout: float | None = 600.0

    def __post_init__(self) -> None:
        c = "RolloutConfig"
        _sampling(c, self)
        _int_at_least(c, "max_prompt_length", self.max_prompt_length, 1)
        _choice(c, "prompt_overflow", self.prompt_overflow, ("truncate_left", "error"))
        if self.score_timeout is not None:
            _number(c, "score_timeout", self.score_timeout, 0.0, math.inf, low_open=True, high_open=True)

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters for training rollouts."""
        return _sampling_params(self)


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
    loss_aggregation: LossAggregationName = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: KLEstimatorName = "k1"
    value_clip_range: float | None = 0.5
    value_loss_scale: float = 0.5
    vf_coef: float = 1.0
    max_grad_norm: float | None = 1.0
    max_consecutive_nonfinite: int = 5

    def __post_init__(self) -> None:
        c = "PPOConfig"
        _int_at_least(c, "batch_size", self.batch_size, 1)
        _int_at_least(c, "mini_batch_size", self.mini_batch_size, 1)
        _int_at_least(c, "micro_batch_size", self.micro_batch_size, 1)
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"PPOConfig.mini_batch_size must divide batch_size ({self.batch_size}), got {self.mini_batch_size}"
            )
        _int_at_least(c, "ppo_epochs", self.ppo_epochs, 1)
        _bool(c, "shuffle", self.shuffle)
        _bool(c, "whiten_advantages", self.whiten_advantages)
        _number(c, "clip_ratio_low", self.clip_ratio_low, 0.0, 1.0, high_open=True)
        _number(c, "clip_ratio_high", self.clip_ratio_high, 0.0, math.inf, high_open=True)
        if self.dual_clip is not None:
            _number(c, "dual_clip", self.dual_clip, 1.0, math.inf, low_open=True, high_open=True)
        _number(c, "gamma", self.gamma, 0.0, 1.0)
        _number(c, "lam", self.lam, 0.0, 1.0)
        _choice(c, "loss_aggregation", self.loss_aggregation,
                ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
        _number(c, "kl_coef", self.kl_coef, 0.0, math.inf, high_open=True)
        _choice(c, "kl_estimator", self.kl_estimator, ("k1", "abs", "k2", "k3"))
        if self.value_clip_range is not None:
            _number(c, "value_clip_range", self.value_clip_range, 0.0, math.inf, low_open=True, high_open=True)
        _number(c, "value_loss_scale", self.value_loss_scale, 0.0, math.inf, low_open=True, high_open=True)
        _number(c, "vf_coef", self.vf_coef, 0.0, math.inf, low_open=True, high_open=True)
        if self.max_grad_norm is not None:
            _number(c, "max_grad_norm", self.max_grad_norm, 0.0, math.inf, low_open=True, high_open=True)
        _int_at_least(c, "max_consecutive_nonfinite", self.max_consecutive_nonfinite, 1)

    def check_micro_batch(self, n: int) -> None:
        """Raise unless ``micro_batch_size`` divides a mini-batch of ``mini_batch_size × n`` sequences."""
        sequences = self.mini_batch_size * n
        if self.micro_batch_size > sequences or sequences % self.micro_batch_size:
            raise ValueError(
                f"PPOConfig.micro_batch_size must divide mini_batch_size × n = {self.mini_batch_size} × {n} = "
                f"{sequences} sequences (and so be <= it), got {self.micro_batch_size}"
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
        c = "OptimConfig"
        _number(c, "actor_lr", self.actor_lr, 0.0, math.inf, low_open=True, high_open=True)
        _number(c, "critic_lr", self.critic_lr, 0.0, math.inf, low_open=True, high_open=True)
        _number(c, "weight_decay", self.weight_decay, 0.0, math.inf, high_open=True)
        self.betas = _list(c, "betas", self.betas)
        if len(self.betas) != 2:
            raise _fail(c, "betas", "a pair [beta1, beta2]", self.betas)
        for i, b in enumerate(self.betas):
            _number(c, f"betas[{i}]", b, 0.0, 1.0, high_open=True)
        _number(c, "eps", self.eps, 0.0, math.inf, low_open=True, high_open=True)
        _number(c, "warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        if self.critic_warmup_ratio is not None:
            _number(c, "critic_warmup_ratio", self.critic_warmup_ratio, 0.0, 1.0, high_open=True)
        if self.warmup_steps is not None:
            _int_at_least(c, "warmup_steps", self.warmup_steps, 0)
        _choice(c, "schedule", self.schedule, ("constant", "linear", "cosine"))
        _number(c, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.total_steps is not None:
            _int_at_least(c, "total_steps", self.total_steps, 1)
        _bool(c, "eight_bit", self.eight_bit)

    def warmup_for(self, total_steps: int, critic: bool) -> int:
        """Warm-up length in PPO iterations for the actor or the critic."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        ratio = self.critic_warmup_ratio if critic and self.critic_warmup_ratio is not None else self.warmup_ratio
        return int(ratio * total_steps)


@dataclass
class EvalConfig:
    """The paper's evaluation protocol (section 6): n = 8, temperature 1.0, top-p 0.7.

    Attributes:
        n: samples per test prompt, >= 1.
        temperature: > 0.
        top_p: in (0, 1].
        top_k: 0 = off.
        max_new_tokens: >= 1.
        batch_size: test prompts per validation step, >= 1.
        pass_k: the k of the reported pass@k for binary tasks, each in [1, n]
            (Pass@1 is the paper's metric).
        seed: validation reseeds the RNG with this value (and restores the
            training RNG afterwards), so evaluation is reproducible and does
            not perturb training.
        max_examples: evaluate on the first ``max_examples`` test prompts, or
            None for all.
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = 0
    max_new_tokens: int = 512
    batch_size: int = 8
    pass_k: list[int] = field(default_factory=lambda: [1])
    seed: int = 1234
    max_examples: int | None = None

    def __post_init__(self) -> None:
        c = "EvalConfig"
        _sampling(c, self)
        _int_at_least(c, "batch_size", self.batch_size, 1)
        self.pass_k = _list(c, "pass_k", self.pass_k)
        if not self.pass_k:
            raise _fail(c, "pass_k", "a non-empty list of ints in [1, n]", self.pass_k)
        for k in self.pass_k:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n:
                raise _fail(c, "pass_k", f"a list of ints in [1, n={self.n}]", self.pass_k)
        _int_at_least(c, "seed", self.seed, 0)
        if self.max_examples is not None:
            _int_at_least(c, "max_examples", self.max_examples, 1)

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters for evaluation."""
        return _sampling_params(self)
