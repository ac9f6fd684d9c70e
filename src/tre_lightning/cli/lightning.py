"""``tre-lightning``: the Lightning CLI entry point.

Parses ``class_path`` / ``init_args`` YAML and flags with Lightning's CLI
(jsonargparse), then builds the run with the same
:func:`tre_lightning.cli.build.build_run` as ``tre-train``::

    tre-lightning fit --config conf/lightning/example.yaml
    tre-lightning fit --config example.yaml --model.seed 1 --trainer.max_steps 20
    tre-lightning fit --print_config      # the full config with defaults
    tre-lightning fit --help              # every argument

Where the shipped example config is: ``python -c "from tre_lightning.cli.lightning import
EXAMPLE_CONFIG; print(EXAMPLE_CONFIG)"``.

Regularizers (``--model.regularizers``, a list of ``class_path`` entries from
``tre_lightning.regularizers``): Ent, TREK, TREP, MinEnt, ForkingTokens,
KLCov, ClipCov.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from tre_lightning.cli.train import quiet_warnings
from tre_lightning.training import PPOModule

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


_PARSER_KEY = re.compile(r'Parser key "([^"]+)":')
_NOT_ACCEPTED = re.compile(r"Option '(\w+)' is not accepted")
_REQUIRED = re.compile(r"the following arguments are required: ([\w.]+)")
_NOISE = ("Problem with given class_path", "Does not validate", "Subtypes:", "Errors:", "Given value")


def parse_error(message: str) -> Any:
    """jsonargparse's own refusal (a wrong type, an unknown option) as one keyed :class:`ConfigError`.

    Its message is an indented tree of ``Parser key "<key>":`` lines (keys
    relative below the first) leading to the innermost reason: the config
    key is their join, the reason the first line below the innermost key.
    """
    from tre_lightning.checks import ConfigError

    subcommands = ("fit", "validate", "test", "predict")
    parts: list[str] = []
    reason: str | None = None
    for line in (raw.strip(" -") for raw in message.splitlines()):
        if not line:
            continue
        if (key := _PARSER_KEY.match(line)) is not None:
            parts.append(key.group(1))
            reason = None
        elif (named := _NOT_ACCEPTED.match(line) or _REQUIRED.search(line)) is not None:
            parts.append(named.group(1))
            reason = "unknown argument" if named.re is _NOT_ACCEPTED else "required, not set"
            break
        elif reason is None and not line.startswith(_NOISE):
            reason = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", line)
            reason = re.sub(r"^Expected a (.+?)\. Got value: (.*)$", lambda m: f"expected {m[1]}, got {m[2]!r}",
                            reason)
    key = ".".join(parts)
    for sub in subcommands:
        key = key.removeprefix(f"{sub}.").removeprefix(sub)
    return ConfigError(key, reason or message.strip().splitlines()[0])


def _items(value: Any, key: str) -> list[tuple[str, Any]]:
    """A callbacks / logger value (one node, a list of nodes, or None) as (key, node) pairs."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [(f"{key}[{i}]", v) for i, v in enumerate(values)]


class TRECLI(LightningCLI):
    """LightningCLI for :class:`~tre_lightning.training.PPOModule`.

    jsonargparse parses and type-checks the command line; the objects are
    built by :func:`~tre_lightning.cli.build.build_run`, the same code as
    ``tre-train``: each once, the data checked before the trainer is built,
    no model weights loaded before ``fit``, argument errors keyed by their
    config key, checkpoints written atomically.
    """

    def init_parser(self, **kwargs):  # noqa: ANN003, ANN201 - LightningCLI signature
        kwargs.setdefault("description", _DESCRIPTION)
        kwargs.setdefault("exit_on_error", False)  # parse errors: one line (see parse_arguments)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 - LightningCLI signature
        from argparse import ArgumentError

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise parse_error(str(err)) from None

    def instantiate_classes(self) -> None:
        from tre_lightning.cli.build import ObjectBuilder, build_run
        from tre_lightning.training.checkpoint_io import check_resume_path

        config = self.config[self.subcommand] if self.subcommand else self.config
        tree = config.as_dict()
        check_resume_path(tree.get("ckpt_path"), "ckpt_path")
        trainer = dict(tree.get("trainer") or {})
        callbacks = _items(trainer.pop("callbacks", None), "trainer.callbacks")
        logger = trainer.pop("logger", None)  # None / true: Lightning's default logger; false: none
        loggers = None if logger is None or logger is True else [] if logger is False else _items(
            logger, "trainer.logger")
        extra = []
        if self.save_config_callback and not trainer.get("fast_dev_run", False):
            extra.append(self.save_config_callback(self._parser(self.subcommand), config, **self.save_config_kwargs))
        built = build_run(ObjectBuilder(), tree.get("model") or {}, "model", trainer, callbacks,
                          loggers, extra_callbacks=extra)
        self.config_init = self.config
        self.model, self.trainer, self._run = built.module, built.trainer, built
        self.datamodule = None

    def _with_data(self) -> None:
        self.datamodule = self._run.datamodule  # reads the tokenizer: only when a subcommand runs

    before_fit = before_validate = before_test = before_predict = _with_data


def main(args: list[str] | None = None) -> None:
    """Console entry point ``tre-lightning``."""
    from tre_lightning.cli.errors import exit_on_error

    with exit_on_error("tre-lightning"):
        run(args)


def run(args: list[str] | None = None, **kwargs: Any) -> TRECLI:
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
