"""Hub model ids (``Qwen/Qwen2.5-1.5B-Instruct``) resolved through the standard Hugging Face cache.

A model path is a local folder when one exists at that path; otherwise a
Hub repo id (``org/name``), looked up in the cache that ``huggingface_hub``
uses (``HF_HOME`` / ``HF_HUB_CACHE``, the ``models--org--name/snapshots/<commit>``
layout, ``refs/<branch>``), at ``revision`` (a branch, tag or commit; None =
``main``). :func:`resolve_cached` never touches the network; a model that is
not cached is fetched by :func:`download` (``snapshot_download``) when the
hub is online, and refused in one line saying how to fetch it when it is
offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
from pathlib import Path

from tre_lightning.checks import ConfigError

__all__ = ["WEIGHT_PATTERNS", "download", "fetch_command", "is_hub_id", "is_offline", "not_cached_message",
           "resolve_cached"]

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
"""Weight file names of a model folder."""


def is_hub_id(path: str) -> bool:
    """``org/name`` (or ``name``) that is a valid Hub repo id and not a local path (``/``, ``.``, ``~``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not path or path.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(path)):
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, as the hub client reads it."""
    import huggingface_hub

    return bool(huggingface_hub.is_offline_mode()) or os.environ.get("TRANSFORMERS_OFFLINE", "0") in ("1", "true")


def fetch_command(repo_id: str, revision: str | None) -> str:
    """The shell command that puts ``repo_id`` into the cache."""
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo_id}{rev}"


def _has_weights(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS)


def resolve_cached(repo_id: str, revision: str | None, key: str, need_weights: bool = True) -> str | None:
    """The cached snapshot folder of ``repo_id`` at ``revision``, or None when it is not cached.

    A snapshot without ``config.json`` (or, with ``need_weights``, without
    weight files: a cache that only ever served a config) is refused with
    ``key`` and the fetch command.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    missing = "config.json" if not (folder / "config.json").is_file() else \
        "weights" if need_weights and not _has_weights(folder) else None
    if missing is not None:
        raise ConfigError(key, f"the cached snapshot of {repo_id!r} ({folder}) has no {missing}; "
                               f"fetch the whole model with `{fetch_command(repo_id, revision)}`")
    return str(folder)


def download(repo_id: str, revision: str | None, key: str) -> str:
    """``snapshot_download`` into the standard cache (online only); the snapshot folder."""
    from huggingface_hub import snapshot_download

    if is_offline():
        raise ConfigError(key, not_cached_message(repo_id, revision))
    try:
        return str(snapshot_download(repo_id, revision=revision))
    except Exception as err:  # noqa: BLE001 - network / auth / missing repo: one line with the cause
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(key, f"could not download {repo_id!r} ({first}); fetch it with "
                               f"`{fetch_command(repo_id, revision)}` or pass a local folder") from None


def not_cached_message(repo_id: str, revision: str | None) -> str:
    """The refusal of an uncached model id in offline mode."""
    from huggingface_hub import constants

    return (f"model {repo_id!r}{f' at revision {revision!r}' if revision else ''} is not in the Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; fetch it first with "
            f"`{fetch_command(repo_id, revision)}` (on a machine with network, same HF_HOME), or pass a local folder")
