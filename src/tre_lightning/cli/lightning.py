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
KLCov, ClipCov. Short or full class names, one or a comma-separated list
(``--model.regularizers TREK``, ``--model.regularizers TREP,KLCov``,
``--model.regularizers tre_lightning.regularizers.TREK``; a bare value is made
the one-element list jsonargparse expects), a YAML list with arguments
(``--model.regularizers '[{class_path: TREK, init_args: {coef: 0.01}}]'``), or
``--model.regularizers+=TREK`` to append to the config file's list.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from tre_lightning.cli.train import quiet_warnings
from tre_lightning.training import PPOModule

__all__ = ["EXAMPLE_CONFIG", "TRECLI", "main", "regularizer_list_args", "run"]


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

        from tre_lightning.training.checkpoint_io import check_resume_path

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise parse_error(str(err)) from None
        subcommand = self.config.get("subcommand")
        if subcommand:  # before LightningCLI reads the checkpoint's hyperparameters (torch.load of the file)
            check_resume_path(self.config[subcommand].get("ckpt_path"), "ckpt_path")

    def instantiate_classes(self) -> None:
        from tre_lightning.cli.build import ObjectBuilder, build_run
        from tre_lightning.training.auto_resume import is_auto, resolve_auto_resume
        from tre_lightning.training.checkpoint_io import check_resume_path
        from tre_lightning.training.wandb_resume import continue_wandb_runs

        config = self.config[self.subcommand] if self.subcommand else self.config
        tree = config.as_dict()
        if not is_auto(tree.get("ckpt_path")):
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
        if is_auto(tree.get("ckpt_path")):  # the newest checkpoint of the trainer's ModelCheckpoint folders
            config.ckpt_path = resolve_auto_resume(tree["ckpt_path"], self.trainer, "ckpt_path")
            check_resume_path(config.ckpt_path, "ckpt_path")
        continue_wandb_runs(self.trainer.loggers, config.get("ckpt_path"))
        self.datamodule = None

    def _with_data(self) -> None:
        from tre_lightning.checks import ConfigError
        from tre_lightning.training.data import check_prompt_lengths

        self.datamodule = self._run.datamodule  # reads the tokenizer: only when a subcommand runs
        try:
            check_prompt_lengths(self.datamodule)
        except ConfigError as err:
            raise err.under("model") from None

    before_fit = before_validate = before_test = before_predict = _with_data


def main(args: list[str] | None = None) -> None:
    """Console entry point ``tre-lightning``."""
    from tre_lightning.cli.errors import exit_on_error

    with exit_on_error("tre-lightning"):
        run(args)


_REGULARIZERS_FLAG = "--model.regularizers"
_NAMES = re.compile(r"^[A-Za-z_][\w.]*(,[A-Za-z_][\w.]*)*$")


def regularizer_list_args(args: list[str]) -> list[str]:
    """``--model.regularizers NAME[,NAME...]`` (or ``=NAME...``) -> ``--model.regularizers [NAME,...]``.

    jsonargparse reads a bare value of a list-typed argument as the path of a config file
    ("Expected a path but TREK either not accessible or invalid"); class names, short or
    full, are made the list they mean. Existing files, YAML lists/dicts and ``+=`` are left alone.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == _REGULARIZERS_FLAG and i + 1 < len(args):
            value, joined = args[i + 1], False
        elif arg.startswith(_REGULARIZERS_FLAG + "="):
            value, joined = arg[len(_REGULARIZERS_FLAG) + 1:], True
        else:
            out.append(arg)
            i += 1
            continue
        if _NAMES.match(value) and not Path(value).exists():
            value = f"[{value}]"
        out.extend([f"{_REGULARIZERS_FLAG}={value}"] if joined else [_REGULARIZERS_FLAG, value])
        i += 1 if joined else 2
    return out


def run(args: list[str] | None = None, **kwargs: Any) -> TRECLI:
    """Build (and by default run) the CLI; ``args`` as on the command line."""
    import sys

    from tre_lightning.cli.logging_setup import setup_logging

    quiet_warnings()
    setup_logging()
    args = regularizer_list_args(list(sys.argv[1:] if args is None else args))
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
