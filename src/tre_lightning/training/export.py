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
    """``actor.save_pretrained(path)`` and ``tokenizer.save_pretrained(path)``.

    A LoRA (``peft``) actor is saved as an ordinary HF model: a copy with the
    adapters merged into the weights (the actor itself keeps its adapters).
    """
    from tre_lightning.models.lora import is_peft_model, merged_copy

    if is_peft_model(actor):
        actor = merged_copy(actor)
    actor.save_pretrained(path)
    tokenizer.save_pretrained(path)
