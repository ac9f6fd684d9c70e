"""Config nodes → objects: the one build path of both entry points.

A node is a mapping with ``_target_`` (Hydra) or ``class_path`` / ``init_args``
(Lightning CLI) naming a class whose constructor arguments are the other keys,
1:1; a mapping without one is built as the dataclass its parameter is
annotated with (``rollout: {n: 4}``), or kept as a mapping of built values.
Children are built first, each under its own config key, so a constructor's
:class:`~tre_lightning.checks.ConfigError` (an argument check) becomes
``<node key>.<param>: <message>`` without parsing any message. Every object
is built exactly once.

Everything built here is cheap (configs, sources, the task, the module): model
weights are loaded later, in ``PPOModule.configure_model``, so a bad config is
refused before any weights are read.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tre_lightning.checks import ConfigError, join_key
from tre_lightning.cli.errors import missing_extra

__all__ = ["ObjectBuilder", "Run", "build_run", "locate"]

_TARGET = ("_target_", "class_path")


def locate(path: str, key: str) -> Any:
    """The object at a dotted path; an import failure is refused with the real error."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                continue  # a shorter prefix may be the module
            raise ConfigError(key, f"cannot import {path!r}: {type(err).__name__}: {err}") from None
        except Exception as err:  # noqa: BLE001 - an error inside the user's module: say which
            raise ConfigError(key, f"cannot import {path!r}: {type(err).__name__}: {err}") from None
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            offered = getattr(importlib.import_module(module_name), "__all__", None)
            hint = f" (it has: {', '.join(sorted(offered))})" if offered else ""
            raise ConfigError(key, f"cannot import {path!r}: {module_name} has no {'.'.join(parts[cut:])!r}{hint}") \
                from None
        return obj
    raise ConfigError(key, f"cannot import {path!r} (a dotted path to a class)")


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass an annotation names (``RolloutConfig | None`` → RolloutConfig), or None."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _parameters(cls: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """(parameters, resolved annotations, accepts **kwargs) of a constructor."""
    try:
        params = dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return {}, {}, True
    try:
        hints = typing.get_type_hints(cls.__init__ if inspect.isclass(cls) else cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations only lose the dataclass default
        hints = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    params = {k: p for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and k != "self"}
    return params, hints, var_kw


class ObjectBuilder:
    """Builds config nodes into objects, with errors keyed by the node being built."""

    def build(self, node: Any, key: str, annotation: Any = None, *, default: type | None = None,
              **extra: Any) -> Any:
        """The object of ``node`` (at config key ``key``).

        Args:
            annotation: the parameter's annotation (a dataclass in it builds a target-less mapping).
            default: the class of a target-less mapping (e.g. the Lightning CLI's ``trainer``).
            extra: already built constructor arguments.
        """
        if isinstance(node, Mapping):
            target = next((node[t] for t in _TARGET if t in node), None)
            if target is None:
                cls = default or _dataclass_in(annotation)
                if cls is None:
                    return {k: self.build(v, join_key(key, str(k))) for k, v in node.items()}
                return self._construct(cls, dict(node), key, extra)
            if not isinstance(target, str):
                raise ConfigError(join_key(key, "_target_"), f"must be a dotted class path, got {target!r}")
            args = dict(node.get("init_args") or {}) if "class_path" in node else {
                k: v for k, v in node.items() if k != "_target_"}
            return self._construct(locate(target, join_key(key, "_target_")), args, key, extra)
        if isinstance(node, list | tuple):
            item = typing.get_args(annotation)[0] if typing.get_args(annotation) else None
            return [self.build(v, f"{key}[{i}]", item) for i, v in enumerate(node)]
        return node

    def _construct(self, cls: Any, args: dict[str, Any], key: str, extra: Mapping[str, Any]) -> Any:
        params, hints, var_kw = _parameters(cls)
        unknown = [k for k in args if k not in params and not var_kw]
        if unknown:
            raise ConfigError(join_key(key, unknown[0]), f"unknown argument of {getattr(cls, '__name__', cls)}; "
                                                         f"allowed: {sorted(params)}")
        kwargs = {k: self.build(v, join_key(key, k), hints.get(k)) for k, v in args.items()}
        kwargs.update(extra)
        missing = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
        if missing:
            raise ConfigError(join_key(key, missing[0]), "required, not set")
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise err.under(key) from None
        except Exception as err:
            if missing_extra(err) is not None or not _is_argument_error(err):
                raise
            text = str(err).strip().splitlines()
            raise ConfigError(key, text[0] if text else type(err).__name__) from None


def _is_argument_error(err: BaseException) -> bool:
    """Errors a constructor raises for bad arguments (not bugs, not interrupts)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return isinstance(err, ValueError | TypeError | FileNotFoundError | NotADirectoryError | MisconfigurationException)


@dataclass
class Run:
    """The objects of one training run, built once by :func:`build_run`.

    The data module is made on first use (it reads the tokenizer, which
    building the run does not need).
    """

    module: Any
    trainer: Any

    @functools.cached_property
    def datamodule(self) -> Any:
        from tre_lightning.training import PromptDataModule

        return PromptDataModule.for_module(self.module)


def build_run(
    builder: ObjectBuilder,
    module_node: Mapping[str, Any],
    module_key: str,
    trainer_node: Mapping[str, Any],
    callbacks: Sequence[tuple[str, Any]],
    loggers: Sequence[tuple[str, Any]] | None,
    extra_callbacks: Sequence[Any] = (),
) -> Run:
    """Module, data and trainer of a run, in the order that refuses a bad run cheaply.

    The module and its parts are built first (constructors only: no weights),
    then the data is loaded and checked (a missing file, a bad row or too
    few examples stops here), then callbacks, loggers and the trainer (and
    what the module needs of it). No file but the task's data is read.

    Args:
        builder: builds the nodes.
        module_node: PPOModule's arguments as config nodes.
        module_key: the config key of the module node ("" for Hydra's root, "model" for the CLI).
        trainer_node: ``lightning.Trainer``'s arguments (without callbacks, logger, plugins).
        callbacks: (config key, node) of each callback.
        loggers: (config key, node) of each logger; an empty list logs nothing, None keeps
            Lightning's default logger.
        extra_callbacks: already built callbacks to add.
    """
    from lightning.pytorch import Trainer

    from tre_lightning.training import PPOModule
    from tre_lightning.training.checkpoint_io import with_atomic_checkpoint_io
    from tre_lightning.training.data import check_task_data
    from tre_lightning.training.trainer_args import check_trainer_args

    module = builder.build({**module_node, "_target_": f"{PPOModule.__module__}.PPOModule"}, module_key)
    try:
        check_task_data(module.task, module.ppo.batch_size)
    except ConfigError as err:
        raise err.under(module_key) from None
    built_callbacks = [builder.build(node, key) for key, node in callbacks if node is not None]
    built_callbacks.extend(extra_callbacks)
    node = dict(trainer_node)
    check_trainer_args(node)
    extra: dict[str, Any] = {}
    if loggers is not None:
        extra["logger"] = [builder.build(n, key) for key, n in loggers if n is not None] or False
    plugins = with_atomic_checkpoint_io(builder.build(node.pop("plugins", None), "trainer.plugins"))
    trainer = builder.build(node, "trainer", default=Trainer, callbacks=built_callbacks, plugins=plugins, **extra)
    return Run(module=module, trainer=trainer)
