"""``tre-train``: the Hydra entry point.

Composes ``conf/train.yaml`` from its groups (model, task, regularizer,
rollout, ppo, optim, eval, trainer, strategy, logger, callbacks, experiment),
builds :class:`~tre_lightning.module.PPOModule` and a ``lightning.Trainer``
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

from omegaconf import DictConfig, OmegaConf

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
    from tre_lightning.module import PPOModule

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
    )


def build_trainer(cfg: DictConfig) -> Any:
    """lightning.Trainer from ``cfg.trainer`` with the callbacks and loggers by name."""
    from hydra.utils import instantiate

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers if loggers else False)


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit (optionally validate first), export the actor, return the final logged metrics."""
    import lightning as L

    quiet_warnings()
    L.seed_everything(int(cfg.seed), workers=True)
    output_dir = str(cfg.output_dir)
    module = build_module(cfg)
    trainer = build_trainer(cfg)
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
        OmegaConf.resolve(cfg)
        run(cfg)

    _main()


if __name__ == "__main__":
    main()
