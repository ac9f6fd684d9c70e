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


def export_sharded_hf(actor: nn.Module, tokenizer: Any, path: str) -> None:
    """Export a sharded (FSDP2) actor as an ordinary HF folder: a collective, rank 0 writes.

    A LoRA (``peft``) actor's full weights are gathered one tensor at a
    time with the adapters merged (``W + scaling * B @ A``) under the HF
    model's own names (:func:`tre_lightning.rollout.vllm.gather_weights_for_vllm`,
    what the vLLM weight push uses); other actors go through
    :func:`tre_lightning.models.fsdp.save_hf_pretrained` unchanged.
    """
    from tre_lightning.models.fsdp import has_4bit_layers, save_hf_pretrained
    from tre_lightning.models.lora import is_peft_model

    if not is_peft_model(actor):
        save_hf_pretrained(actor, path, tokenizer=tokenizer)
        return
    if has_4bit_layers(actor):
        raise ValueError("export_hf: a sharded actor with a 4-bit base is not supported (4-bit layers are not "
                         "sharded, see docs/scaling.md); export from a single process")
    from tre_lightning.rollout.vllm import gather_weights_for_vllm

    state = {name: tensor.detach().cpu() for name, tensor in gather_weights_for_vllm(actor)}
    save_hf_pretrained(actor.get_base_model(), path, state_dict=state, tokenizer=tokenizer)
