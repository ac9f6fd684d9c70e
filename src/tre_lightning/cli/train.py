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
import sys
import warnings
from typing import Any

from omegaconf import DictConfig

__all__ = ["RUN_KEYS", "build", "main", "quiet_warnings", "register_resolvers", "run", "run_folder_name"]

RUN_KEYS = ("trainer", "callbacks", "logger", "output_dir", "ckpt_path", "export_hf", "validate_first", "hydra")
"""Top-level keys that are not PPOModule arguments."""

# Lightning's generic advice that does not apply to these loaders (one process, whole batches)
_QUIET = [
    r"Your `IterableDataset` has `__len__` defined",
    r"The '(train|val)_dataloader' does not have many workers",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
]


def _split_overrides(overrides: str) -> list[str]:
    """Hydra's ``override_dirname`` items (``key=value`` joined by ``,``; commas inside ``[]``/``{}`` kept)."""
    items, depth, current = [], 0, []
    for ch in str(overrides):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if current:
        items.append("".join(current))
    return [i for i in items if i]


def _readable(value: str) -> str:
    return value.replace("[", "").replace("]", "").replace(",", "+").replace("/", "-").replace("\\", "-")


def run_folder_name(overrides: str, choice: Any = None) -> str:
    """A sweep job's readable folder name: its regularizers (the ``regularizers`` override, or else the
    group's ``choice``; a combination joined by ``+``) followed by its ``regularizers.*`` overrides,
    e.g. ``tre_p+kl_cov,regularizers.tre_p.coef=0.01``; at most 120 characters.

    Registered as the OmegaConf resolver ``tre_run_name`` for ``hydra.sweep.subdir``, which
    interpolated ``hydra.runtime.choices.regularizers`` into a string before and failed when it was a
    list (a combination). Every override is in the job's ``.hydra/overrides.yaml`` (what tre-plot
    groups by); the job number in front keeps folders distinct when other keys are swept.
    """
    items = _split_overrides(overrides)
    regs = next((v for k, _, v in (i.partition("=") for i in items) if k.lstrip("+~") == "regularizers"), None)
    if regs is None:
        regs = str(choice or "") if choice is None or isinstance(choice, str) else "+".join(map(str, choice))
    parts = [_readable(regs) or "none"]
    parts += [_readable(i) for i in items if i.lstrip("+~").startswith("regularizers.")]
    return ",".join(parts)[:120]


def register_resolvers() -> None:
    """The OmegaConf resolvers ``conf/train.yaml`` uses (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("tre_run_name"):
        OmegaConf.register_new_resolver("tre_run_name", run_folder_name)


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
        hint = " (a Hub model id or a local HF model folder, e.g. model.policy.path=Qwen/Qwen2.5-1.5B-Instruct)" \
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

    from tre_lightning.cli.logging_setup import setup_logging
    from tre_lightning.training.auto_resume import is_auto, resolve_auto_resume
    from tre_lightning.training.checkpoint_io import check_resume_path
    from tre_lightning.training.data import check_prompt_lengths
    from tre_lightning.training.wandb_resume import continue_wandb_runs

    quiet_warnings()
    setup_logging()
    ckpt_path = cfg.get("ckpt_path")
    auto = is_auto(ckpt_path)
    if not auto:
        check_resume_path(ckpt_path, "ckpt_path")
    L.seed_everything(int(cfg.seed), workers=True)
    built = build(cfg)
    trainer, module, data = built.trainer, built.module, built.datamodule
    check_prompt_lengths(data)
    output_dir = str(cfg.output_dir)
    if auto:
        ckpt_path = resolve_auto_resume(ckpt_path, trainer, "ckpt_path")
        check_resume_path(ckpt_path, "ckpt_path")
    continue_wandb_runs(trainer.loggers, ckpt_path)
    if trainer.is_global_zero:
        print(f"[tre-train] run folder: {output_dir}", flush=True)
        if auto:
            found = f"resuming from {ckpt_path}" if ckpt_path else "no checkpoint yet, starting fresh"
            print(f"[tre-train] ckpt_path=auto: {found}", flush=True)
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
    """Console entry point ``tre-train`` (Hydra parses the command line).

    Hydra reports its own errors (an unknown key, an unknown group option, a
    missing ``+``) with exit status 1 before the run starts; they are
    configuration errors, so they exit with status 2 like ours
    (:func:`tre_lightning.cli.errors.hydra_exit_status`).
    """
    import hydra

    from tre_lightning.cli.errors import exit_on_error, hydra_exit_status

    register_resolvers()
    started: list[bool] = []

    @hydra.main(version_base="1.3", config_path="pkg://tre_lightning.conf", config_name="train")
    def _main(cfg: DictConfig) -> None:
        import logging

        started.append(True)
        logging.raiseExceptions = False  # a full disk: one line (the checkpoint's), not a traceback per log record
        with exit_on_error("tre-train"):
            run(cfg)

    try:
        _main()
    except SystemExit as exit_:
        code = hydra_exit_status(exit_.code, started=bool(started))
        if code != exit_.code:
            print("tre-train: error: invalid configuration: Hydra could not compose the config or create "
                  "the run folder (its message is above)", file=sys.stderr, flush=True)
        raise SystemExit(code) from None


if __name__ == "__main__":
    main()
