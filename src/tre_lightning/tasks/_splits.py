"""Shared split handling of the file-backed tasks: size checks, seeded per-split loading."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from tre_lightning.checks import ConfigError
from tre_lightning.tasks.base import Example
from tre_lightning.tasks.data_io import subsample


def check_split_sizes(train_size: int | None, val_size: int | None) -> None:
    """``train_size`` / ``val_size``: None (all rows) or >= 1."""
    for name, value in (("train_size", train_size), ("val_size", val_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be None (all rows) or >= 1, got {value}")


class SplitSettings:
    """The split parameters every task takes: paths, sizes and the subsampling seed."""

    def _init_splits(self, train_path: str | None, val_path: str | None, train_size: int | None,
                     val_size: int | None, seed: int) -> None:
        check_split_sizes(train_size, val_size)
        self.train_path = train_path
        self.val_path = val_path
        self.train_size = train_size
        self.val_size = val_size
        self.seed = int(seed)


class PathSplits(SplitSettings):
    """Train / val examples read from ``train_path`` / ``val_path``, subsampled and cached.

    Subclasses set ``_owner`` (the name in messages), ``_path_hint`` (what a
    split path should name, for the error when it is unset) and implement
    :meth:`_read_split`.
    """

    _owner: ClassVar[str]
    _path_hint: ClassVar[str]

    def _init_splits(self, train_path: str | None, val_path: str | None, train_size: int | None,
                     val_size: int | None, seed: int) -> None:
        super()._init_splits(train_path, val_path, train_size, val_size, seed)
        self._cache: dict[str, list[dict[str, Any]]] = {}

    def _read_split(self, split: str, path: str) -> list[dict[str, Any]]:
        """All rows of one split's file or folder."""
        raise NotImplementedError

    def _load(self, split: str, path: str | None, size: int | None) -> list[dict[str, Any]]:
        if split not in self._cache:
            owner = self._owner
            if path is None:
                raise ConfigError(f"{split}_path", f"required for {owner}, not set ({self._path_hint})")
            rows = self._read_split(split, path)
            self._cache[split] = subsample(rows, size, self.seed, f"{owner} {split}_path {path}")
        return self._cache[split]

    def train_examples(self) -> Sequence[Example]:
        return self._load("train", self.train_path, self.train_size)

    def val_examples(self) -> Sequence[Example]:
        return self._load("val", self.val_path, self.val_size)
