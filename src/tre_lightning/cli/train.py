"""``tre-train``: the Hydra entry point.

Composes ``conf/train.yaml`` from its groups and builds the run with
:func:`tre_lightning.cli.build.build_run`. The top-level keys map 1:1 onto
the constructor arguments of :class:`~tre_lightning.training.PPOModule`
(``model``, ``task``, ``regularizers``, ``rollout``, ``ppo``, ``optim``,
``evaluation``, ``engine``, ``seed``) and of ``lightning.Trainer``
(``trainer``, ``callbacks``, ``logger``); the rest says what to do with the
run (``ckpt_path``, ``export_hf``, ``validate_first``, ``output_dir``).
``tre-train --help`` lists the groups; ``tre-train --cfg job`` prints the
composed config.

Each run writes to its own folder (``outputs/<date>/<time>/``; a ``-m``
sweep: ``multirun/<date>/<time>/<job>_<overrides>/``). Sweeps run their jobs
one after another in this process; launch multi-device runs with
``torchrun`` (one run per launch), see docs/training.md.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from omegaconf import DictConfig

__all__ = ["RUN_KEYS", "build", "main", "quiet_warnings", "run"]

RUN_KEYS = ("trainer", "callbacks", "logger", "output_dir", "ckpt_path", "export_hf", "validate_first", "hydra")
"""Top-level keys that are not PPOModule arguments."""

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


def build(cfg: DictConfig) -> Any:
    """The run (module, data, trainer) of a composed config; every object built once."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from tre_lightning.checks import ConfigError
    from tre_lightning.cli.build import ObjectBuilder, build_run
    from tre_lightning.training import PPOModule

    params = [p for p in inspect.signature(PPOModule).parameters]
    for key in sorted(OmegaConf.missing_keys(cfg)):
        hint = " (a local HF model folder, e.g. model.policy.path=~/models/Qwen2.5-1.5B-Instruct)" \
            if key.endswith(".path") else ""
        raise ConfigError(key, f"required, not set (???){hint}")
    unknown = [k for k in cfg if k not in params and k not in RUN_KEYS]
    if unknown:
        raise ConfigError(str(unknown[0]), "unknown top-level key (a regularizer belongs under `regularizers`: "
                                           "conf/regularizers/<name>.yaml); allowed: " + ", ".join(params))
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(str(getattr(err, "full_key", "") or ""), str(err).splitlines()[0]) from None
    builder = ObjectBuilder()
    module_node = {p: resolved[p] for p in params if p in resolved}
    return build_run(builder, module_node, "", resolved["trainer"],
                     [(f"callbacks.{k}", v) for k, v in (resolved.get("callbacks") or {}).items()],
                     [(f"logger.{k}", v) for k, v in (resolved.get("logger") or {}).items()])


def run(cfg: DictConfig) -> dict[str, float]:
    """Build, (optionally) validate first, fit, export the actor; returns the final logged metrics."""
    import lightning as L

    from tre_lightning.training.checkpoint_io import check_resume_path

    quiet_warnings()
    ckpt_path = cfg.get("ckpt_path")
    check_resume_path(ckpt_path, "ckpt_path")
    L.seed_everything(int(cfg.seed), workers=True)
    built = build(cfg)
    trainer, module, data = built.trainer, built.module, built.datamodule
    output_dir = str(cfg.output_dir)
    if trainer.is_global_zero:
        print(f"[tre-train] run folder: {output_dir}", flush=True)
    if cfg.get("validate_first", False) and ckpt_path is None:
        trainer.validate(module, datamodule=data)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
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
        from tre_lightning.cli.errors import exit_on_error

        with exit_on_error("tre-train"):
            run(cfg)

    _main()


if __name__ == "__main__":
    main()
