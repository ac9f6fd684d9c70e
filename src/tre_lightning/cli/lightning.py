"""``tre-lightning``: the Lightning CLI entry point.

Builds the same classes as ``tre-train`` (Hydra) from ``class_path`` /
``init_args`` YAML::

    tre-lightning fit --config conf/lightning/example.yaml
    tre-lightning fit --config example.yaml --model.seed 1 --trainer.max_steps 20
    tre-lightning fit --print_config      # the full config with defaults
    tre-lightning fit --help              # every argument; lists the regularizers

Where the shipped example config is: ``python -c "from tre_lightning.cli.lightning import
EXAMPLE_CONFIG; print(EXAMPLE_CONFIG)"``.

Regularizers (``--model.regularizers``, a list of ``class_path`` entries from
``tre_lightning.regularizers``): Ent, TREK, TREP, MinEnt, ForkingTokens,
KLCov, ClipCov.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from tre_lightning.training.module import PPOModule
from tre_lightning.cli.train import quiet_warnings

__all__ = ["EXAMPLE_CONFIG", "TRECLI", "main", "run"]

def _conf_dir() -> Path:
    import tre_lightning.conf

    return Path(tre_lightning.conf.__file__).resolve().parent


EXAMPLE_CONFIG = _conf_dir() / "lightning" / "example.yaml"
"""The shipped example config (``tre_lightning/conf/lightning/example.yaml``)."""

_DESCRIPTION = (
    "tre-lightning: actor-critic PPO with GAE for language models on PyTorch Lightning, with pluggable "
    "exploration regularizers (tre_lightning.regularizers: Ent, TREK, TREP, MinEnt, ForkingTokens, KLCov, "
    "ClipCov; list them under --model.regularizers). Start from the example config: "
    "tre-lightning fit --config <tre_lightning/conf/lightning/example.yaml>."
)


class TRECLI(LightningCLI):
    """LightningCLI for :class:`~tre_lightning.training.module.PPOModule` (module-owned dataloaders).

    Reliability additions (docs/reliability.md): a parse error or an invalid
    config raises one :class:`~tre_lightning.cli.validation.ConfigError` naming
    the key and the allowed values, before any class is instantiated (so
    before any model or tokenizer is loaded); the task's data is loaded before
    the models are built; checkpoints are written atomically
    (:class:`~tre_lightning.training.checkpoint_io.AtomicCheckpointIO`, unless
    ``trainer.plugins`` brings a ``CheckpointIO``).
    """

    def init_parser(self, **kwargs):  # noqa: ANN003, ANN201 - LightningCLI signature
        kwargs.setdefault("description", _DESCRIPTION)
        kwargs.setdefault("exit_on_error", False)  # parse errors become ConfigError (see parse_arguments)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 - LightningCLI signature
        from argparse import ArgumentError

        from tre_lightning.cli.validation import explain_cli_error

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise explain_cli_error(str(err)) from None

    def before_instantiate_classes(self) -> None:
        from tre_lightning.cli.validation import validate_cli_config

        validate_cli_config(self.config[self.subcommand] if self.subcommand else self.config)

    def instantiate_classes(self) -> None:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from tre_lightning.tasks.data_io import DataError
        from tre_lightning.cli.validation import ConfigError, explain_instantiation_error

        try:
            super().instantiate_classes()
        except (ConfigError, DataError):
            raise
        except (ValueError, MisconfigurationException) as err:  # a callback's or the trainer's argument checks
            raise explain_instantiation_error(err) from None

    def instantiate_trainer(self, **kwargs):  # noqa: ANN003, ANN201 - LightningCLI signature
        from tre_lightning.training.checkpoint_io import with_atomic_checkpoint_io

        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        kwargs["plugins"] = with_atomic_checkpoint_io(plugins)
        return super().instantiate_trainer(**kwargs)

    def _check_data(self) -> None:
        from tre_lightning.cli.validation import check_task_data

        check_task_data(self.model.task, key="model.task", batch_size=self.model.ppo_cfg.batch_size)

    def before_fit(self) -> None:
        self._check_data()

    def before_validate(self) -> None:
        self._check_data()


def main(args: list[str] | None = None) -> None:
    """Console entry point ``tre-lightning``."""
    from tre_lightning.cli.errors import exit_on_missing_extra
    from tre_lightning.cli.validation import exit_on_config_error

    # a bad config or bad data: a one-line message, exit status 2, no traceback
    with exit_on_config_error("tre-lightning"), exit_on_missing_extra("tre-lightning"):
        run(args)


def run(args: list[str] | None = None, **kwargs) -> TRECLI:  # noqa: ANN003 - forwarded to LightningCLI
    """Build (and by default run) the CLI; ``args`` as on the command line."""
    quiet_warnings()
    return TRECLI(
        PPOModule,
        datamodule_class=None,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
        **kwargs,
    )


if __name__ == "__main__":
    main()
