"""``tre-lightning``: the Lightning CLI entry point.

Builds the same classes as ``tre-train`` (Hydra) from ``class_path`` /
``init_args`` YAML::

    tre-lightning fit --config conf/lightning/example.yaml
    tre-lightning fit --config example.yaml --model.seed 1 --trainer.max_steps 20
    tre-lightning fit --print_config      # the full config with defaults
    tre-lightning fit --help              # every argument; lists the regularizers

Where the shipped example config is: ``python -c "from tre_lightning.cli import
EXAMPLE_CONFIG; print(EXAMPLE_CONFIG)"``.

Regularizers (``--model.regularizers``, a list of ``class_path`` entries from
``tre_lightning.regularizers``): Ent, TREK, TREP, MinEnt, ForkingTokens,
KLCov, ClipCov.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from tre_lightning.module import PPOModule
from tre_lightning.train import quiet_warnings

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
    """LightningCLI for :class:`~tre_lightning.module.PPOModule` (module-owned dataloaders)."""

    def init_parser(self, **kwargs):  # noqa: ANN003, ANN201 - LightningCLI signature
        kwargs.setdefault("description", _DESCRIPTION)
        return super().init_parser(**kwargs)


def main(args: list[str] | None = None) -> None:
    """Console entry point ``tre-lightning``."""
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
