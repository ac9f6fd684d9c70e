"""Whole-config validation for the entry points, before any model is built.

``tre-train`` (Hydra) and ``tre-lightning`` (Lightning CLI) call this first:
it builds the *cheap* objects of a run (the config records, the regularizers,
the task, the model sources: constructors only, which validate their own
arguments; nothing is downloaded, loaded or trained) and checks what no
single constructor can see (``micro_batch_size`` against ``mini_batch_size ×
n``, a model folder that does not exist, a task without its data files, a
precision the module refuses, ...). Any problem is one :class:`ConfigError`
naming the config key and the allowed values; the entry points print it
(no traceback) and exit with status 2. Models and tokenizers are built later,
in ``PPOModule.configure_model`` (the module's constructor reads only the
tokenizer).

:func:`check_task_data` is the second, data-level gate: it loads the task's
train and validation splits (cached by the task, so nothing is read twice)
after the module is built and before the trainer builds the models, so a
missing file, a wrong column or an empty split (a :class:`DataError` naming
the file, the row and the column) also stops the run before any model exists.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "available_regularizers",
    "check_components",
    "check_task_data",
    "exit_on_config_error",
    "explain_cli_error",
    "explain_instantiation_error",
    "guard",
    "resolve",
    "validate_cli_config",
    "validate_config",
]

_REGULARIZER_BASE = {"PolicyContext", "Regularizer", "RegularizerOutput"}
_UNSUPPORTED_PRECISION = {"16-mixed", "16", 16, "16-true"}


class ConfigError(ValueError):
    """A configuration problem found before anything heavy is built.

    Attributes:
        key: the config key (``ppo.mini_batch_size``, ``model.policy.path``, ...).
        message: what is wrong and what is allowed.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def available_regularizers() -> list[str]:
    """The regularizer classes shipped in :mod:`tre_lightning.regularizers`."""
    import tre_lightning.regularizers as regs

    return sorted(name for name in regs.__all__ if name not in _REGULARIZER_BASE)


def _regularizer_options() -> list[str]:
    """The Hydra options of the ``regularizer`` group (``conf/regularizer/*.yaml``)."""
    import tre_lightning.conf

    folder = Path(tre_lightning.conf.__file__).resolve().parent / "regularizer"
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _unknown_regularizer(target: str) -> str:
    return (
        f"unknown regularizer {target!r}; available: "
        + ", ".join(f"tre_lightning.regularizers.{n}" for n in available_regularizers())
        + f" (Hydra: regularizer={'|'.join(_regularizer_options())})"
    )


# --------------------------------------------------------------------------- errors from constructors

_FIELD = re.compile(r"^(?:[A-Za-z_]\w*\.)?([A-Za-z_]\w*)(?:\[\d+\])?\b(?= must| is | should|:)")


def _root_cause(err: BaseException) -> BaseException:
    """Hydra wraps constructor errors in ``InstantiationException``: the original error."""
    from hydra.errors import InstantiationException

    seen: set[int] = set()
    while isinstance(err, InstantiationException) and err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


def _field_key(key: str, message: str, fields: Sequence[str] = ()) -> str:
    """``key.<field>`` when the message starts with a field name of the object (``top_p must be ...``)."""
    match = _FIELD.match(message)
    if match and (not fields or match.group(1) in fields):
        return f"{key}.{match.group(1)}"
    return key


def _as_config_error(key: str, err: BaseException, fields: Sequence[str] = ()) -> ConfigError:
    hydra_key = _HYDRA_FULL_KEY.search(str(err))
    if hydra_key:  # the node whose constructor failed (absolute: nodes stay attached to the root config)
        key = hydra_key.group(1)
    err = _root_cause(err)
    if isinstance(err, ConfigError):
        return err
    message = str(err).strip() or type(err).__name__
    full_key = getattr(err, "full_key", None)
    if full_key and (not key or str(full_key).startswith(key)):
        key = str(full_key)
        message = message.splitlines()[0]
    if isinstance(err, TypeError) and "unexpected keyword argument" in message:
        name = re.search(r"argument '(\w+)'", message)
        bad = name.group(1) if name else "?"
        return ConfigError(f"{key}.{bad}", f"unknown argument {bad!r}" + (f"; allowed: {sorted(fields)}" if fields
                                                                               else ""))
    if isinstance(err, TypeError) and "missing" in message and "required" in message:
        name = re.search(r"argument: '(\w+)'", message)
        if name:
            return ConfigError(f"{key}.{name.group(1)}", "required, not set")
    return ConfigError(_field_key(key, message, fields), message)


_HYDRA_FULL_KEY = re.compile(r"full_key: ([\w.\[\]]+)")


def _expected() -> tuple[type[BaseException], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return (ValueError, TypeError, ImportError, AttributeError, FileNotFoundError, KeyError,
            MisconfigurationException)


def _guard(key: str, fn: Callable[[], Any], fields: Sequence[str] = ()) -> Any:
    """``fn()``, with any argument error turned into a :class:`ConfigError` under ``key``."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return fn()
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, *_expected()) as err:
        from tre_lightning.cli.errors import missing_extra

        if missing_extra(err) is not None:  # vLLM / bitsandbytes missing: the entry points' own message
            raise
        raise _as_config_error(key, err, fields) from None


def guard(key: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` (e.g. building the trainer and its callbacks) with argument errors as a :class:`ConfigError`
    under ``key`` (or the Hydra node that failed)."""
    return _guard(key, fn)


# --------------------------------------------------------------------------- cross-field checks


def _check_source(key: str, source: Any) -> None:
    """A model source that reads a local folder: the folder must exist (nothing is downloaded)."""
    if source is None:
        return
    for attr in ("path", "tokenizer_path"):
        value = getattr(source, attr, None)
        if not isinstance(value, str | Path) or (attr == "tokenizer_path" and value == getattr(source, "path", None)):
            continue
        folder = Path(value).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"{key}.{attr}",
                f"model folder {str(value)!r} does not exist; expected a local HF model folder "
                "(config.json, weights, tokenizer files); nothing is downloaded",
            )
        if attr == "path" and not (folder / "config.json").is_file():
            raise ConfigError(f"{key}.{attr}", f"{str(value)!r} is not an HF model folder (no config.json in it)")


_REQUIRED_TASK_PATHS = {
    "MathTask": ("train_path", "val_path"),
    "HHTask": ("train_path", "val_path", "reward_model_path"),
}


def _check_task(key: str, task: Any) -> None:
    for name in ("train_examples", "val_examples", "messages", "score"):
        if not callable(getattr(task, name, None)):
            raise ConfigError(key, f"{type(task).__name__} is not a task (the Task protocol needs {name}())")
    for attr in _REQUIRED_TASK_PATHS.get(type(task).__name__, ()):
        if getattr(task, attr, None) is None:
            raise ConfigError(f"{key}.{attr}", f"required for {type(task).__name__}: a local file or folder, got null")
    for attr in ("train_path", "val_path", "reward_model_path"):
        value = getattr(task, attr, None)
        if isinstance(value, str | Path) and not Path(value).expanduser().exists():
            raise ConfigError(f"{key}.{attr}", f"{str(value)!r} does not exist (a local file or folder)")


def check_components(parts: Mapping[str, Any], keys: Mapping[str, str]) -> None:
    """Checks across the built cheap objects of a run.

    Args:
        parts: ``rollout``, ``ppo``, ``optim``, ``evaluation`` (config records
            or None for the defaults), ``regularizers`` (a list of
            ``(key, object)``), ``task``, ``policy``, ``critic``,
            ``reference`` (sources or None), ``share_backbone``, ``seed`` and
            optionally ``precision``.
        keys: the config key of each part, as the entry point spells it.
    """
    from tre_lightning.training.config import PPOConfig, RolloutConfig
    from tre_lightning.regularizers.base import Regularizer

    rollout = parts.get("rollout") or RolloutConfig()
    ppo = parts.get("ppo") or PPOConfig()
    try:
        ppo.check_micro_batch(rollout.n)
    except ValueError as err:
        raise ConfigError(f"{keys['ppo']}.micro_batch_size", str(err)) from None
    for key, reg in parts.get("regularizers", []):
        if not isinstance(reg, Regularizer):
            raise ConfigError(key, f"{type(reg).__name__} is not a regularizer (needs `coef` and __call__); "
                                   + _unknown_regularizer(type(reg).__name__))
    _check_task(keys["task"], parts["task"])
    for name in ("policy", "critic", "reference"):
        _check_source(keys[name], parts.get(name))
    share = parts.get("share_backbone", False)
    if not isinstance(share, bool):
        raise ConfigError(keys["share_backbone"], f"must be true or false, got {share!r}")
    if share and parts.get("critic") is not None:
        raise ConfigError(keys["share_backbone"], "true puts the value head on the actor: leave the critic null")
    seed = parts.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(keys["seed"], f"must be an int in [0, 2**32), got {seed!r}")
    precision = parts.get("precision")
    if precision in _UNSUPPORTED_PRECISION:
        raise ConfigError(keys["precision"], f"{precision!r} (fp16 with a grad scaler) is not supported; "
                                             "allowed: 32-true, bf16-mixed, bf16-true")


# --------------------------------------------------------------------------- Hydra


def _missing(cfg: Any, prefixes: Sequence[str]) -> list[str]:
    from omegaconf import OmegaConf

    found = []
    for key in sorted(OmegaConf.missing_keys(cfg)):
        if key.split(".")[0] in prefixes or key.split("[")[0] in prefixes:
            found.append(key)
    return found


def _hydra_fields(node: Any) -> list[str]:
    from omegaconf import DictConfig

    return [str(k) for k in node.keys() if not str(k).startswith("_")] if isinstance(node, DictConfig) else []


def _target_fields(node: Any) -> list[str]:
    """The constructor's parameter names of a ``_target_`` node (for 'unknown argument' messages)."""
    import inspect

    try:
        return [p for p in inspect.signature(_import(str(node["_target_"]))).parameters if p != "self"]
    except Exception:  # noqa: BLE001 - best effort, only used to name fields
        return _hydra_fields(node)


def _hydra_build(cfg: Any, key: str, default: type | None = None) -> Any:
    """Instantiate the node at ``key`` (``_target_``), or None when it is null/absent."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    node = _guard(key, lambda: OmegaConf.select(cfg, key, throw_on_missing=True))
    if node is None:
        return None
    if isinstance(node, DictConfig) and "_target_" not in node:
        if default is None:
            raise ConfigError(key, "needs a `_target_` (the class to build)")
        fields = list(getattr(default, "__dataclass_fields__", {}))
        return _guard(key, lambda: default(**OmegaConf.to_container(node, resolve=True)), fields)
    if isinstance(node, DictConfig):
        target = str(node["_target_"])
        _guard(f"{key}._target_", lambda: _locate(target, key))
        return _guard(key, lambda: instantiate(node, _convert_="all"), _target_fields(node))
    raise ConfigError(key, f"must be a config node with `_target_`, got {node!r}")


def _locate(target: str, key: str) -> Any:
    try:
        return _import(target)
    except Exception:  # noqa: BLE001 - any import failure is a bad target
        if key.split(".")[0] == "regularizers":
            raise ConfigError(key, _unknown_regularizer(target)) from None
        raise ConfigError(f"{key}._target_", f"cannot import {target!r} (a dotted path to a class)") from None


def validate_config(cfg: Any) -> dict[str, Any]:
    """Validate a composed ``tre-train`` config; raise :class:`ConfigError` on the first problem.

    Builds the config records, the regularizers, the task and the model
    sources (constructors only) and runs :func:`check_components`. Returns the
    built parts (nothing in them has loaded a model or read data).
    """
    from omegaconf import DictConfig, OmegaConf

    from tre_lightning.training.config import EvalConfig, OptimConfig, PPOConfig, RolloutConfig

    for key in ("model", "task"):
        if OmegaConf.select(cfg, key, throw_on_missing=False) is None:
            raise ConfigError(key, "required: choose one (e.g. model=tiny_random task=countdown)")
    missing = _missing(cfg, ("model", "task", "regularizers", "rollout", "ppo", "optim", "eval", "engine", "fsdp",
                             "trainer", "seed"))
    if missing:
        key = missing[0]
        hint = " (a local HF model folder, e.g. model.policy.path=~/models/Qwen2.5-1.5B-Instruct)" if \
            key.endswith(".path") else ""
        raise ConfigError(key, f"required, not set (???){hint}")

    parts: dict[str, Any] = {
        "rollout": _hydra_build(cfg, "rollout", RolloutConfig),
        "ppo": _hydra_build(cfg, "ppo", PPOConfig),
        "optim": _hydra_build(cfg, "optim", OptimConfig),
        "evaluation": _hydra_build(cfg, "eval", EvalConfig),
    }
    regs = _guard("regularizers", lambda: OmegaConf.select(cfg, "regularizers"))
    parts["regularizers"] = []
    if regs is not None:
        if not isinstance(regs, DictConfig):
            raise ConfigError("regularizers", f"must be a mapping name -> regularizer node, got {regs!r}; "
                                              f"choose with regularizer=[{','.join(_regularizer_options())}]")
        for name in regs:
            key = f"regularizers.{name}"
            if regs[name] is None:
                continue
            if not isinstance(regs[name], DictConfig) or "_target_" not in regs[name]:
                raise ConfigError(key, "needs a `_target_`: " + _unknown_regularizer(str(regs[name])))
            parts["regularizers"].append((key, _hydra_build(cfg, key)))
    parts["task"] = _hydra_build(cfg, "task")
    for name in ("policy", "critic", "reference"):
        parts[name] = _hydra_build(cfg, f"model.{name}")
    if parts["policy"] is None:
        raise ConfigError("model.policy", "required: a model source (e.g. model=tiny_random or model=pretrained)")
    for name in ("share_backbone", "gradient_checkpointing"):
        value = _guard(f"model.{name}", lambda n=name: OmegaConf.select(cfg, f"model.{n}", default=False))
        if not isinstance(value, bool):
            raise ConfigError(f"model.{name}", f"must be true or false, got {value!r}")
        parts[name] = value
    engine = _guard("engine", lambda: OmegaConf.select(cfg, "engine"))
    if isinstance(engine, DictConfig) and "_target_" in engine:
        _locate(str(engine["_target_"]), "engine")
    if OmegaConf.select(cfg, "fsdp") is not None:
        parts["fsdp"] = _hydra_build(cfg, "fsdp")
    parts["seed"] = _guard("seed", lambda: OmegaConf.select(cfg, "seed", default=0))
    ckpt = _guard("ckpt_path", lambda: OmegaConf.select(cfg, "ckpt_path"))
    if ckpt is not None and str(ckpt) not in ("last", "best", "hpc", "registry") and "://" not in str(ckpt) \
            and not Path(str(ckpt)).expanduser().exists():
        raise ConfigError("ckpt_path",
                          f"checkpoint {str(ckpt)!r} does not exist (a .ckpt file to resume from, or null)")
    parts["precision"] = _guard("trainer.precision", lambda: OmegaConf.select(cfg, "trainer.precision"))
    keys = {"ppo": "ppo", "task": "task", "policy": "model.policy", "critic": "model.critic",
            "reference": "model.reference", "share_backbone": "model.share_backbone", "seed": "seed",
            "precision": "trainer.precision"}
    check_components(parts, keys)
    return parts


# --------------------------------------------------------------------------- Lightning CLI


def _ns_dict(value: Any) -> Any:
    """jsonargparse Namespaces -> plain dicts (recursively)."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        return value.as_dict()
    if isinstance(value, list):
        return [_ns_dict(v) for v in value]
    return value


def _import(path: str) -> Any:
    """The object at a dotted path (``package.module.Class`` or ``package.module.Class.attr``)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"{path!r} is not an importable dotted path")


def _cli_build(key: str, node: Any, default: type | None = None) -> Any:
    """Build a ``class_path`` / ``init_args`` node (or a dataclass's field dict) with errors under ``key``."""
    import inspect

    node = _ns_dict(node)
    if node is None:
        return None
    if isinstance(node, dict) and "class_path" in node:
        path = str(node["class_path"])
        try:
            cls = _import(path)
        except (ImportError, AttributeError, ValueError):
            if "regularizers" in key:
                raise ConfigError(key, _unknown_regularizer(path)) from None
            raise ConfigError(f"{key}.class_path", f"cannot import {path!r}") from None
        init = dict(node.get("init_args") or {})
        init = {k: _cli_value(f"{key}.{k}", v) for k, v in init.items()}
        try:
            fields = [p for p in inspect.signature(cls).parameters]
        except (TypeError, ValueError):
            fields = list(init)
        return _guard(key, lambda: cls(**init), fields)
    if isinstance(node, dict) and default is not None:
        fields = list(getattr(default, "__dataclass_fields__", {}))
        return _guard(key, lambda: default(**node), fields)
    return node


def _cli_value(key: str, value: Any) -> Any:
    if isinstance(value, dict) and "class_path" in value:
        return _cli_build(key, value)
    if isinstance(value, list):
        return [_cli_value(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return value


def validate_cli_config(config: Any) -> dict[str, Any]:
    """Validate a parsed Lightning CLI config (the subcommand's namespace) before instantiation.

    Same checks as :func:`validate_config`, keys spelled as on the CLI
    (``model.ppo.micro_batch_size``, ``model.regularizers[0].top_p``).
    """
    from tre_lightning.training.config import EvalConfig, OptimConfig, PPOConfig, RolloutConfig

    model = _ns_dict(config.get("model") if hasattr(config, "get") else config["model"]) or {}
    trainer = _ns_dict(config.get("trainer") if hasattr(config, "get") else None) or {}
    parts: dict[str, Any] = {
        "rollout": _cli_build("model.rollout", model.get("rollout"), RolloutConfig),
        "ppo": _cli_build("model.ppo", model.get("ppo"), PPOConfig),
        "optim": _cli_build("model.optim", model.get("optim"), OptimConfig),
        "evaluation": _cli_build("model.evaluation", model.get("evaluation"), EvalConfig),
    }
    regs = model.get("regularizers")
    items: list[tuple[str, Any]] = []
    if isinstance(regs, dict) and "class_path" not in regs:
        items = [(f"model.regularizers.{k}", v) for k, v in regs.items()]
    elif isinstance(regs, list):
        items = [(f"model.regularizers[{i}]", v) for i, v in enumerate(regs)]
    elif regs is not None:
        items = [("model.regularizers[0]", regs)]
    parts["regularizers"] = [(k, _cli_build(k, v)) for k, v in items if v is not None]
    parts["task"] = _cli_build("model.task", model.get("task"))
    if parts["task"] is None:
        raise ConfigError("model.task", "required: a task (e.g. tre_lightning.tasks.CountdownTask)")
    for name in ("policy", "critic", "reference"):
        parts[name] = _cli_build(f"model.{name}", model.get(name))
    if parts["policy"] is None:
        raise ConfigError("model.policy", "required: a model source (e.g. tre_lightning.models.PretrainedSource)")
    engine = model.get("engine")
    if isinstance(engine, dict) and "class_path" in engine:
        _guard("model.engine.class_path", lambda: _import(str(engine["class_path"])))
    if model.get("fsdp") is not None:
        from tre_lightning.models.fsdp import FSDPConfig

        parts["fsdp"] = _cli_build("model.fsdp", model.get("fsdp"), FSDPConfig)
    parts["share_backbone"] = model.get("share_backbone", False)
    parts["seed"] = model.get("seed", 0)
    parts["precision"] = trainer.get("precision")
    keys = {"ppo": "model.ppo", "task": "model.task", "policy": "model.policy", "critic": "model.critic",
            "reference": "model.reference", "share_backbone": "model.share_backbone", "seed": "model.seed",
            "precision": "trainer.precision"}
    check_components(parts, keys)
    return parts


_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_OUTER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_INNER = re.compile(r'Parser key "([^"]+)":\s*\n\s*Expected a (.+?)\. Got value: (.*)')
_NOT_ACCEPTED = re.compile(r"Option '(\w+)' is not accepted")
_REQUIRED = re.compile(r"the following arguments are required: ([\w., ]+)")
_NO_ATTR = re.compile(r"(?:has no attribute '(\w+)'|Expected a path but (\S+) either not accessible)")


def explain_cli_error(message: str) -> ConfigError:
    """A short :class:`ConfigError` from a jsonargparse parse error (type errors, unknown classes, missing args).

    For a wrong type the allowed range comes from the class's own validation
    (``PPOConfig(batch_size='abc')`` says "an int >= 1").
    """
    keys = [k for k in _OUTER_KEY.findall(message) if k not in _SUBCOMMANDS]
    key = keys[0] if keys else ""
    for sub in _SUBCOMMANDS:
        key = key.removeprefix(f"{sub}.")
    class_path = _CLASS_PATH.search(message)
    inner = _INNER.search(message)
    if inner is not None:
        name, expected, value = inner.group(1), inner.group(2), inner.group(3).strip()
        full = f"{key}.{name}" if key and not key.endswith(name) else (key or name)
        detail = f"expected {expected.replace('<class ', '').replace('>', '')}, got {value!r}"
        cls = _class_for(key, class_path.group(1) if class_path else None)
        if cls is not None:
            try:
                cls(**{name: value})
            except (ValueError, TypeError) as err:
                text = str(err)
                if name in text and "required" not in text and "missing" not in text:
                    detail = text
            except Exception:  # noqa: BLE001 - best effort
                pass
        return ConfigError(full, detail)
    unknown = _NOT_ACCEPTED.search(message)
    if unknown is not None:
        name = unknown.group(1)
        cls = _class_for(key, class_path.group(1) if class_path else None)
        allowed = ""
        if cls is not None:
            import inspect

            try:
                allowed = "; allowed: " + str(sorted(p for p in inspect.signature(cls).parameters if p != "self"))
            except (TypeError, ValueError):
                pass
        return ConfigError(f"{key}.{name}" if key else name, f"unknown argument {name!r}{allowed}")
    required = _REQUIRED.search(message)
    if required is not None:
        names = [n.strip() for n in required.group(1).split(",")]
        for sub in _SUBCOMMANDS:
            names = [n.removeprefix(f"{sub}.") for n in names]
        hint = " (a local HF model folder)" if names == ["path"] else ""
        return ConfigError(f"{key}.{names[0]}" if key else names[0], f"required, not set{hint}")
    no_attr = _NO_ATTR.search(message)
    if no_attr is not None or (class_path and "No module named" in message):
        target = class_path.group(1) if class_path else (no_attr.group(2) or no_attr.group(1))
        if "regularizers" in key:
            return ConfigError(key, _unknown_regularizer(target))
        return ConfigError(key, f"cannot import {target!r}")
    lines = [ln.strip(" -") for ln in message.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Subtypes:", "Given value", "Errors:", "Does not validate"))]
    return ConfigError(key, "; ".join(useful[1:4] if len(useful) > 1 else useful) or message)


def explain_instantiation_error(err: BaseException) -> ConfigError:
    """A :class:`ConfigError` from an error raised while the Lightning CLI instantiates its classes
    (a callback's or the trainer's own argument checks)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    message = str(err)
    if isinstance(err, MisconfigurationException):
        return ConfigError("trainer", message.strip().splitlines()[0])
    class_path = re.search(r"class_path='([^']+)'", message)
    errors = [ln.strip()[2:] for ln in message.splitlines()
              if ln.strip().startswith("- ") and not ln.strip()[2:].startswith(("Expected a", "Not a valid",
                                                                               "Problem with", "a dict", "a class"))]
    detail = errors[0] if errors else message.strip().splitlines()[0]
    where = class_path.group(1) if class_path else ""
    key = "trainer.callbacks" if "callbacks" in where or "Callback" in message else ""
    field_key = _field_key(key, detail) if key else ""
    return ConfigError(field_key or key, f"{detail}" + (f" ({where})" if where else ""))


def _class_for(key: str, class_path: str | None) -> type | None:
    from tre_lightning.training.config import EvalConfig, OptimConfig, PPOConfig, RolloutConfig

    if class_path:
        try:
            return _import(class_path)
        except Exception:  # noqa: BLE001
            return None
    return {"model.rollout": RolloutConfig, "model.ppo": PPOConfig, "model.optim": OptimConfig,
            "model.evaluation": EvalConfig}.get(key)


# --------------------------------------------------------------------------- data


def check_task_data(task: Any, key: str = "task", batch_size: int | None = None) -> None:
    """Load the task's train and validation splits now (cached by the task) and require both non-empty.

    Raises the task's :class:`~tre_lightning.tasks.data_io.DataError` (file,
    row, column) as it is; a missing path, an empty split or fewer training
    examples than one batch of ``batch_size`` prompts becomes a
    :class:`ConfigError` under ``key``.
    """
    from tre_lightning.tasks.data_io import DataError

    for split in ("train", "val"):
        try:
            rows = getattr(task, f"{split}_examples")()
        except DataError:
            raise
        except FileNotFoundError as err:
            raise ConfigError(f"{key}.{split}_path", str(err)) from None
        except ValueError as err:
            raise ConfigError(key, f"{split} split: {err}") from None
        if rows is None or len(rows) == 0:
            raise ConfigError(key, f"the {split} split is empty (at least 1 example needed)")
        if split == "train" and batch_size is not None and len(rows) < batch_size:
            raise ConfigError(key, f"the train split has {len(rows)} examples, fewer than one batch "
                                   f"(ppo.batch_size={batch_size}); allowed: batch_size <= {len(rows)}")


# --------------------------------------------------------------------------- entry points


@contextlib.contextmanager
def exit_on_config_error(prog: str) -> Iterator[None]:
    """Print ``<prog>: error: <message>`` to stderr and exit with status 2 on a
    :class:`ConfigError` or a :class:`~tre_lightning.tasks.data_io.DataError` (no traceback)."""
    from tre_lightning.tasks.data_io import DataError

    try:
        yield
    except (ConfigError, DataError) as err:
        kind = "invalid configuration" if isinstance(err, ConfigError) else "invalid data"
        print(f"{prog}: error: {kind}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def resolve(cfg: Any) -> None:
    """``OmegaConf.resolve(cfg)`` with a bad interpolation reported as a :class:`ConfigError`."""
    from omegaconf import OmegaConf

    _guard("", lambda: OmegaConf.resolve(cfg))

