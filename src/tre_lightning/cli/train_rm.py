"""``tre-train-rm``: train the HH reward model from Hydra (``conf/train_rm.yaml``).

Usage: ``tre-train-rm model_path=PATH train_path=PATH save_dir=PATH [key=value ...]``;
``tre-train-rm --help`` explains every key. The same objects can be built by
the Lightning CLI: ``python -m tre_lightning.training.reward_model fit --help``.
"""

from __future__ import annotations

from typing import Any


def train(cfg: Any) -> dict[str, float]:
    """Build module, data and trainer from a composed config, fit, return the final metrics.

    ``cfg`` is the ``train_rm`` config (an OmegaConf ``DictConfig``).
    """
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from tre_lightning.cli.build import ObjectBuilder

    pl.seed_everything(int(cfg.seed), workers=True)
    tree = OmegaConf.to_container(cfg, resolve=True)
    builder = ObjectBuilder()
    module, datamodule, trainer = (builder.build(tree[key], key) for key in ("module", "data", "trainer"))
    trainer.fit(module, datamodule=datamodule)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def main() -> None:
    """Console entry point (``tre-train-rm``)."""
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path="pkg://tre_lightning.conf", config_name="train_rm")
    def _run(cfg: DictConfig) -> None:
        from tre_lightning.cli.errors import exit_on_error

        with exit_on_error("tre-train-rm"):
            metrics = train(cfg)
        for key in sorted(metrics):
            print(f"{key}: {metrics[key]:.4f}")

    _run()


if __name__ == "__main__":  # pragma: no cover
    main()
