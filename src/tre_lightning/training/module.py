"""PPOModule: the PPO loop of :mod:`tre_lightning.training.loop` under Lightning.

One ``training_step`` is one PPO iteration (:meth:`PPOLearner.iteration`:
rollout → reward → old log-probs and values → GAE → PPO epochs); the module
adds what Lightning owns: building the models (``configure_model``, where a
sharding strategy wraps them), the optimizers and schedules, logging through
``self.log``, validation with the paper's protocol, and checkpoints that
resume exactly. Optimization is manual: PPO takes several optimizer steps of
two optimizers per batch; ``trainer.global_step`` counts PPO iterations, so
``max_steps`` is the paper's number of training steps.

Data comes from :class:`~tre_lightning.training.data.PromptDataModule`
(``PromptDataModule.for_module(module)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule

from tre_lightning.checks import ArgumentError, ConfigError, integer
from tre_lightning.evaluation.config import EvalConfig
from tre_lightning.evaluation.protocol import build_eval_metrics, metric_name, score_batch, update_eval_metrics
from tre_lightning.models.actor_critic import ActorCritic
from tre_lightning.models.fsdp import is_sharded
from tre_lightning.ppo import AllReduce, process_group_all_reduce
from tre_lightning.regularizers.base import Regularizer
from tre_lightning.rollout.base import RolloutEngine
from tre_lightning.rollout.hf import HFGenerateEngine
from tre_lightning.tasks.base import Task
from tre_lightning.tasks.guard import RewardGuard
from tre_lightning.training.config import OptimConfig, PPOConfig, RolloutConfig
from tre_lightning.training.export import export_hf, export_sharded_hf, tokenizer_files
from tre_lightning.training.loop import PPOLearner, Runtime
from tre_lightning.training.optim import build_optimizer, build_scheduler
from tre_lightning.training.resume import ResumeState, rng_state, set_rng_state
from tre_lightning.training.trainer_args import check_trainer_args, trainer_settings

__all__ = ["PPOModule"]

class PPOModule(LightningModule):
    """Actor-critic PPO with GAE for language models, with pluggable regularizers.

    Args:
        model: actor, critic (or shared value head) and reference, from their
            sources (:class:`~tre_lightning.models.ActorCritic`).
        task: prompts and rewards (``MathTask``, ``CountdownTask``, ``HHTask``, …).
        regularizers: strategy objects acting on the policy-loss pass, from
            ``tre_lightning.regularizers`` (Ent, TREK, TREP, MinEnt,
            ForkingTokens, KLCov, ClipCov, or your own); a list, or a dict
            name -> regularizer as Hydra composes it; None = vanilla PPO.
        rollout: training sampling (n, temperature, top-p, lengths).
        ppo: the PPO update (batch sizes, clipping, GAE, aggregation, KL).
        optim: learning rates, warm-up and schedules of the two optimizers.
        evaluation: the validation protocol (n = 8, temperature 1.0, top-p 0.7).
        engine: the rollout engine; None = ``HFGenerateEngine`` on the actor.
        seed: seeds the data order and each iteration's sampling (from the
            seed, the iteration and the process rank), so a resumed run
            repeats the uninterrupted one exactly.
    """

    def __init__(
        self,
        model: ActorCritic,
        task: Task,
        regularizers: Sequence[Regularizer] | Mapping[str, Regularizer] | None = None,
        rollout: RolloutConfig | None = None,
        ppo: PPOConfig | None = None,
        optim: OptimConfig | None = None,
        evaluation: EvalConfig | None = None,
        engine: RolloutEngine | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _objects_required(model=model, task=task, engine=engine, regularizers=regularizers)
        if not isinstance(model, ActorCritic):
            raise ArgumentError("model", "an ActorCritic (tre_lightning.models.ActorCritic)", model)
        try:
            model.bind_task(task)
        except ConfigError as err:
            raise err.under("model") from None
        self.model = model
        rollout, ppo = _config(rollout, RolloutConfig, "rollout"), _config(ppo, PPOConfig, "ppo")
        self.optim = _config(optim, OptimConfig, "optim")
        self.evaluation = _config(evaluation, EvalConfig, "evaluation")
        self.seed = integer("seed", seed, 0, 2**32 - 1)
        ppo.check_micro_batch(rollout.n)
        self.automatic_optimization = False
        guard = RewardGuard(task, timeout=rollout.score_timeout, isolation=rollout.score_isolation)
        self.learner = PPOLearner(model, engine if engine is not None else HFGenerateEngine(), guard,
                                  _as_list(regularizers), rollout, ppo)
        self.resume = ResumeState(self.seed)
        self.val_metrics = build_eval_metrics(task, self.evaluation)
        self._val_rng: dict[str, Any] | None = None
        # plain values only, so that checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({
            "model": repr(model), "task": repr(task), "regularizers": [repr(r) for r in self.regularizers] or None,
            "seed": self.seed,
            **{name: dataclasses.asdict(getattr(self, name)) for name in ("rollout", "ppo", "optim", "evaluation")},
        })

    # what the loop runs with, read-only (an assignment would not reach the loop): build a new module instead
    task = property(lambda self: self.learner.guard.task, doc="The task (prompts and rewards).")
    guard = property(lambda self: self.learner.guard, doc="The reward guard around ``task.score``.")
    engine = property(lambda self: self.learner.engine, doc="The rollout engine.")
    regularizers = property(lambda self: self.learner.regularizers, doc="The regularizers.")
    rollout = property(lambda self: self.learner.rollout, doc="The training sampling settings.")
    ppo = property(lambda self: self.learner.ppo, doc="The PPO update settings.")
    tokenizer = property(lambda self: self.model.tokenizer, doc="The policy's tokenizer.")

    # ------------------------------------------------------------------ models and optimizers

    def setup(self, stage: str) -> None:
        check_trainer_args(trainer_settings(self.trainer))

    def on_fit_start(self) -> None:
        self.guard.start()  # a task that cannot run in the reward worker is found before the first rollout

    def teardown(self, stage: str) -> None:
        self.guard.close()

    def configure_model(self) -> None:
        """Build actor, critic (or shared head) and reference, sharded under FSDP2; idempotent."""
        if self.model.built:
            return
        self.model.build(with_reference=self.ppo.kl_coef > 0, seed=self.seed, device_mesh=self.device_mesh)
        self.engine.sync_weights(self.model.actor)

    def configure_optimizers(self) -> Any:
        actor_opt = build_optimizer(self.model.actor.parameters(), self.optim.actor_lr, self.optim)
        critic_opt = build_optimizer(self.model.critic_parameters(), self.optim.critic_lr, self.optim)
        total = self._total_iterations()
        schedulers = [
            {"scheduler": build_scheduler(opt, self.optim, total, critic=critic), "interval": "step", "name": name}
            for opt, critic, name in ((actor_opt, False, "lr/actor"), (critic_opt, True, "lr/critic"))
        ]
        return [actor_opt, critic_opt], schedulers

    def _total_iterations(self) -> int | None:
        if self.optim.total_steps is not None:
            return self.optim.total_steps
        try:
            total = self.trainer.estimated_stepping_batches
        except (RuntimeError, AttributeError):
            return None
        return int(total) if math.isfinite(total) and total > 0 else None

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """One PPO iteration; returns ``{"metrics", "samples", "rollout"}`` for the callbacks."""
        generator = self.resume.begin_iteration(self.global_step, self.global_rank)
        optimizers = self.optimizers(use_pl_optimizer=False)
        result = self.learner.iteration(batch, (optimizers[0], optimizers[1]), generator, self._runtime())
        for scheduler in self.lr_schedulers():
            scheduler.step()
        self._count_iteration()
        for name, value in result.metrics.items():
            self.log(name, value, on_step=True, on_epoch=False, batch_size=1)
        return {"metrics": result.metrics, "samples": result.samples, "rollout": result.rollout}

    def _runtime(self) -> Runtime:
        all_reduce, world = self._data_parallel()
        return Runtime(device=self.device, backward=self.manual_backward, all_reduce=all_reduce, world_size=world,
                       all_ranks=lambda flag: bool(self.trainer.strategy.reduce_boolean_decision(flag, all=True)),
                       iteration=self.global_step)

    def _data_parallel(self) -> tuple[AllReduce | None, int]:
        """(sum over the data-parallel ranks, their number W); (None, 1) in one process.

        Under FSDP2 the group of the mesh's ``data_parallel`` dimension (over
        which FSDP averages gradients); under another multi-process strategy
        the default group. Whitening and the loss denominators use it.
        """
        mesh = self.device_mesh
        if mesh is not None:
            names = tuple(mesh.mesh_dim_names or ())
            dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
            size = dp_mesh.size()
            return (process_group_all_reduce(dp_mesh.get_group()), size) if size > 1 else (None, 1)
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            return process_group_all_reduce(), self.trainer.world_size
        return None, 1

    def _count_iteration(self) -> None:
        """Make ``trainer.global_step`` count PPO iterations: the optimizers are stepped directly,
        so Lightning's manual-optimization step counter is advanced once per iteration here."""
        try:
            progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        except AttributeError as err:  # pragma: no cover - depends on Lightning internals
            raise RuntimeError("this Lightning version moved the manual-optimization step counter") from err
        progress.increment_ready()
        progress.increment_completed()

    # ------------------------------------------------------------------ validation

    def on_validation_start(self) -> None:
        self._val_rng = rng_state()
        torch.manual_seed(self.evaluation.seed + self.global_rank)

    def on_validation_epoch_start(self) -> None:
        # fresh states made in this loop's grad mode (a validate() before fit runs under inference mode)
        for metric in self.val_metrics.values():
            metric.reset()

    def on_validation_end(self) -> None:
        if self._val_rng is not None:
            set_rng_state(self._val_rng)
            self._val_rng = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The evaluation protocol on one batch of test prompts (the same loop as ``tre-eval``)."""
        with self.model.generation_context(self.engine):
            rewards, lengths = score_batch(self.engine, self.tokenizer, self.guard.as_task(), batch,
                                           self.evaluation)
        update_eval_metrics(self.val_metrics, rewards, lengths)
        for key, metric in self.val_metrics.items():
            self.log(metric_name(key), metric, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the RNG states and counters, and what rebuilds the actor without a config (its HF
        config and the tokenizer files), all loadable with ``weights_only=True``."""
        actor = self.model.actor
        checkpoint["tre_lightning"] = {
            **self.resume.state_dict(),
            **self.learner.state_dict(),
            "actor_config": actor.config.to_dict() if actor is not None else None,
            "tokenizer_files": tokenizer_files(self.tokenizer),
            "task_binary_reward": bool(self.task.binary_reward),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("tre_lightning")
        if state is not None:
            self.resume.load_state_dict(state)
            self.learner.load_state_dict(state)

    def export_hf(self, path: str) -> None:
        """Save the actor as an ordinary HF model folder (``save_pretrained``) with the tokenizer.

        Written by the global-zero process only. A sharded (FSDP2) actor is
        gathered to full tensors first, a collective: call this on every
        process then (``tre-train`` does).
        """
        actor = self.model.actor
        assert actor is not None, "configure_model() must run first"
        if is_sharded(actor):
            export_sharded_hf(actor, self.tokenizer, path)
        elif self._trainer is None or self.trainer.is_global_zero:
            export_hf(actor, self.tokenizer, path)


def _objects_required(**objects: Any) -> None:
    """A string where an object belongs is a checkpoint's stored description (its repr)."""
    for name, value in objects.items():
        if isinstance(value, str) or (isinstance(value, list) and any(isinstance(v, str) for v in value)):
            raise TypeError(
                f"PPOModule got a string for `{name}` ({value!r}): checkpoints store the objects' descriptions "
                "only. Pass the objects again, e.g. PPOModule.load_from_checkpoint(path, model=ActorCritic(...), "
                "task=..., regularizers=[...]); the configs (rollout, ppo, optim, evaluation) come from the checkpoint."
            )


def _config(value: Any, cls: type, name: str) -> Any:
    """A config record: the default, the record itself, or a dict of its fields (a checkpoint's hparams)."""
    if value is None:
        return cls()
    if isinstance(value, Mapping):
        return cls(**value)
    if not isinstance(value, cls):
        raise ArgumentError(name, f"a {cls.__name__}", value)
    return value


def _as_list(regularizers: Sequence[Regularizer] | Mapping[str, Regularizer] | None) -> list[Regularizer]:
    if regularizers is None:
        return []
    named = (list(regularizers.items()) if isinstance(regularizers, Mapping)
             else [(f"[{i}]", reg) for i, reg in enumerate(regularizers)])
    for name, reg in named:
        if not isinstance(reg, Regularizer):
            key = f"regularizers{name}" if name.startswith("[") else f"regularizers.{name}"
            raise ArgumentError(key, "a regularizer (a `name` and __call__(PolicyContext) -> RegularizerOutput)", reg)
    return [reg for _, reg in named]
