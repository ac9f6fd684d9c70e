"""Cheap checks of a local HF model folder, so a broken folder is refused before any weights are read.

:func:`check_model_folder` reads ``config.json`` and the headers of the
weight files, never the tensors: a ``config.json`` that is not a JSON object,
a ``model_type`` that transformers does not know, a ``.safetensors`` file
shorter than the offsets its header declares (a truncated copy or download),
a sharded index naming a missing shard, or a ``.bin`` file whose zip directory
cannot be read is a :class:`~tre_lightning.checks.ConfigError` naming the file.

Not checked here (left to loading): a folder without weight files, a
``config.json`` without ``model_type`` (transformers then guesses the type
from the folder's name), bytes corrupted inside a file of the right length.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from tre_lightning.checks import ConfigError

__all__ = ["check_model_folder"]

_HEADER_LIMIT = 100_000_000  # safetensors' own bound on the JSON header


def _read_config(folder: Path, key: str) -> dict:
    file = folder / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(key, f"{str(file)!r} is not valid JSON ({err})") from None
    except OSError as err:
        raise ConfigError(key, f"cannot read {str(file)!r} ({err.strerror or err})") from None
    if not isinstance(config, dict):
        raise ConfigError(key, f"{str(file)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def _check_model_type(config: dict, file: Path, key: str, trust_remote_code: bool) -> None:
    if "model_type" not in config:
        return
    model_type = config["model_type"]
    if trust_remote_code and "auto_map" in config:
        return  # custom modelling code in the folder defines its own type
    from transformers import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ConfigError(key, f"{str(file)!r}: model_type {model_type!r} is not known to this transformers "
                               "version (a model type such as 'qwen2' or 'llama'; a folder with its own code "
                               "needs trust_remote_code=true and auto_map)")


def _safetensors_problem(file: Path) -> str | None:
    """Why ``file`` is not a complete safetensors file, or None (reads the header only)."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"has {size} bytes, fewer than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > _HEADER_LIMIT or 8 + length > size:
            return f"has {size} bytes, but its header declares {length} bytes of header (truncated or not safetensors)"
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return "has a header that is not JSON (not a safetensors file)"
    if not isinstance(header, dict):
        return "has a header that is not a JSON object (not a safetensors file)"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets") or ()) == 2]
    need = 8 + length + max(ends, default=0)
    if size < need:
        return f"has {size} bytes, but its header declares {need} (truncated: copy or download it again)"
    return None


def _shards(folder: Path, index: Path, key: str) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ConfigError(key, f"{str(index)!r} is not a valid shard index (a JSON object with a "
                               "weight_map)") from None
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ConfigError(key, f"{str(index)!r} names {len(missing)} missing shard(s), the first "
                               f"{missing[0]!r} (an incomplete copy or download)")
    return [folder / n for n in names]


def check_model_folder(folder: str | Path, key: str = "path", trust_remote_code: bool = False) -> None:
    """Refuse a local model folder that cannot load, without loading it.

    Args:
        folder: an existing folder with a ``config.json``.
        key: the setting that named the folder (the error's key).
        trust_remote_code: whether the folder's own modelling code may define an unknown ``model_type``.

    Raises:
        ConfigError: keyed ``key``, naming the file and what is wrong with it.
    """
    folder = Path(folder)
    config = _read_config(folder, key)
    _check_model_type(config, folder / "config.json", key, trust_remote_code)
    files = sorted(folder.glob("*.safetensors"))
    for index in sorted(folder.glob("*.safetensors.index.json")):
        files.extend(f for f in _shards(folder, index, key) if f not in files)
    for file in files:
        problem = _safetensors_problem(file)
        if problem is not None:
            raise ConfigError(key, f"weights file {str(file)!r} {problem}")
    for file in sorted(folder.glob("*.bin")):
        with file.open("rb") as handle:
            if handle.read(1) == b"\x80":
                continue  # the legacy (pre-zip) torch format: a pickle stream, no directory to check
        try:
            with zipfile.ZipFile(file):
                pass
        except zipfile.BadZipFile:
            raise ConfigError(key, f"weights file {str(file)!r} is truncated or not a torch file "
                                   f"({file.stat().st_size} bytes)") from None
