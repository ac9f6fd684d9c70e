"""Saving the trained actor as an ordinary HF model folder, and the tokenizer as plain text."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["export_hf", "tokenizer_files"]


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The tokenizer's ``save_pretrained`` files as {name: text} (all tokenizer files are text)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(folder).iterdir() if p.is_file()}


def export_hf(actor: nn.Module, tokenizer: Any, path: str) -> None:
    """``actor.save_pretrained(path)`` and ``tokenizer.save_pretrained(path)``."""
    actor.save_pretrained(path)
    tokenizer.save_pretrained(path)
