"""``tre-train``: the Hydra entry point.

Composes ``conf/train.yaml`` from its groups (model, task, regularizer,
rollout, ppo, optim, eval, trainer, strategy, logger, callbacks, experiment),
builds :class:`~tre_lightning.training.module.PPOModule` and a ``lightning.Trainer``
from it and fits. ``tre-train --help`` lists the groups and options;
``tre-train --cfg job`` prints the composed config.

Each run writes to its own folder (``outputs/<date>/<time>/``; a ``-m``
sweep: ``multirun/<date>/<time>/<job>_<overrides>/``): the composed config
(``.hydra/``), CSV metrics, samples, checkpoints and the exported HF model.

Sweeps run their jobs one after another in this process, on one device each.
Lightning starts extra processes for multi-device runs by re-running
``sys.argv``, which under ``-m`` would re-run the sweep; launch multi-device
runs with ``torchrun`` (one run per launch) instead, see docs/training.md.
"""

from __future__ import annotations

import warnings
from typing import Any

from omegaconf import DictConfig

__all__ = ["build_module", "build_trainer", "main", "run"]

# Lightning's generic advice that does not apply to these loaders (one process, whole batches)
_QUIET = [
    r"Your `IterableDataset` has `__len__` defined",
    r"The '(train|val)_dataloader' does not have many workers",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
]


def quiet_warnings() -> None:
    """Silence Lightning warnings that do not apply to the PPO module's loaders."""
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)


def _instantiate(node: Any) -> Any:
    from hydra.utils import instantiate

    return None if node is None else instantiate(node, _convert_="all")


def build_module(cfg: DictConfig) -> Any:
    """PPOModule from the composed config (one group per constructor argument)."""
    from tre_lightning.training.module import PPOModule

    regularizers = _instantiate(cfg.get("regularizers")) or {}
    return PPOModule(
        policy=_instantiate(cfg.model.policy),
        task=_instantiate(cfg.task),
        regularizers=list(regularizers.values()),
        critic=_instantiate(cfg.model.get("critic")),
        share_backbone=bool(cfg.model.get("share_backbone", False)),
        reference=_instantiate(cfg.model.get("reference")),
        rollout=_instantiate(cfg.rollout),
        ppo=_instantiate(cfg.ppo),
        optim=_instantiate(cfg.optim),
        evaluation=_instantiate(cfg.eval),
        engine=_instantiate(cfg.get("engine")),
        seed=int(cfg.seed),
        gradient_checkpointing=bool(cfg.model.get("gradient_checkpointing", False)),
        fsdp=_instantiate(cfg.get("fsdp")),  # set by strategy=fsdp (FSDPConfig); used under ModelParallelStrategy
    )


def build_trainer(cfg: DictConfig) -> Any:
    """lightning.Trainer from ``cfg.trainer`` with the callbacks and loggers by name.

    Checkpoints are written atomically (:class:`~tre_lightning.training.checkpoint_io.AtomicCheckpointIO`)
    unless ``trainer.plugins`` brings its own ``CheckpointIO``.
    """
    from hydra.utils import instantiate

    from tre_lightning.training.checkpoint_io import with_atomic_checkpoint_io

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    plugins = with_atomic_checkpoint_io(instantiate(cfg.trainer.get("plugins"), _convert_="all"))
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers if loggers else False, plugins=plugins)


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit (optionally validate first), export the actor, return the final logged metrics.

    The whole config is validated first (:func:`tre_lightning.cli.validation.validate_config`:
    a :class:`~tre_lightning.cli.validation.ConfigError` before anything is built), and the
    task's data is loaded before the trainer builds the models.
    """
    import lightning as L

    from tre_lightning.cli.validation import check_task_data, guard, validate_config

    quiet_warnings()
    validate_config(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    output_dir = str(cfg.output_dir)
    module = build_module(cfg)
    check_task_data(module.task, batch_size=module.ppo_cfg.batch_size)
    trainer = guard("trainer", lambda: build_trainer(cfg))  # trainer, callbacks, loggers: still no model built
    if trainer.is_global_zero:
        print(f"[tre-train] run folder: {output_dir}", flush=True)
    if cfg.get("validate_first", False) and cfg.get("ckpt_path") is None:
        trainer.validate(module)
    trainer.fit(module, ckpt_path=cfg.get("ckpt_path"))
    export = cfg.get("export_hf")
    if export:
        module.export_hf(str(export))
        if trainer.is_global_zero:
            print(f"[tre-train] exported the actor (HF format) to {export}", flush=True)
    if trainer.is_global_zero:
        print(f"[tre-train] done; metrics, samples and checkpoints are in {output_dir}", flush=True)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def main() -> None:
    """Console entry point ``tre-train`` (Hydra parses the command line)."""
    import hydra

    @hydra.main(version_base="1.3", config_path="pkg://tre_lightning.conf", config_name="train")
    def _main(cfg: DictConfig) -> None:
        from tre_lightning.cli.errors import exit_on_missing_extra
        from tre_lightning.cli.validation import exit_on_config_error, resolve

        # a bad config or bad data: a one-line message, exit status 2, no traceback
        with exit_on_config_error("tre-train"):
            resolve(cfg)
            with exit_on_missing_extra("tre-train"):  # vLLM / bitsandbytes chosen but missing: message, no traceback
                run(cfg)

    _main()


if __name__ == "__main__":
    main()
