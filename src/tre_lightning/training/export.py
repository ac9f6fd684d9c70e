"""Saving the trained actor as an ordinary HF model folder, and the tokenizer as plain text.

The folder must load with the plain ``AutoTokenizer`` / ``AutoModelForCausalLM`` and answer as
the trained model did. transformers 5's ``AutoTokenizer`` builds the tokenizer class registered
for the model type of ``config.json`` (``Qwen2Tokenizer``: a byte-level BPE pipeline rebuilt from
the vocabulary), not the generic fast tokenizer the folder declares; for the character-level
tokenizers of the embedded quickstart and the tiny models that pipeline drops spaces and
newlines. :func:`auto_loadable_tokenizer` rewrites such a tokenizer as the equivalent byte-level
BPE (same ids, same text), which every loader reads the same way; :func:`export_hf` checks the
round trip and warns when it does not hold.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["auto_loadable_tokenizer", "export_hf", "round_trip_probe", "tokenizer_files"]


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The tokenizer's ``save_pretrained`` files as {name: text} (all tokenizer files are text)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(folder).iterdir() if p.is_file()}


def auto_loadable_tokenizer(tokenizer: Any) -> Any:
    """A character-level ``WordLevel`` fast tokenizer whose characters are single bytes, rewritten as
    the byte-level BPE with the same ids (no merges: one token per character, as before), the same
    special tokens and chat template; any other tokenizer is returned unchanged.

    Characters outside the vocabulary differ: the character tokenizer maps each to ``unk``, the
    byte-level one (as ``Qwen2Tokenizer`` rebuilds it) drops them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "WordLevel":
        return tokenizer
    special = set(tokenizer.all_special_tokens)
    chars = [t for t in model["vocab"] if t not in special and len(t) == 1]
    if not chars or any(len(c.encode("utf-8")) != 1 for c in chars):
        return tokenizer
    to_unicode = bytes_to_unicode()
    vocab = {(to_unicode[t.encode("utf-8")[0]] if t in chars else t): i for t, i in model["vocab"].items()}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=tokenizer.unk_token))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    extra = [t for t in tokenizer.all_special_tokens
             if t not in (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token)]
    out = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=tokenizer.pad_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        bos_token=tokenizer.bos_token,
        additional_special_tokens=extra,
        padding_side=tokenizer.padding_side,
    )
    out.chat_template = tokenizer.chat_template
    return out


def round_trip_probe(tokenizer: Any) -> str:
    """A text that exercises the chat template, spaces, newlines and every character token (characters
    the tokenizer maps to ``unk`` are left out: they are the documented difference)."""
    vocab = tokenizer.get_vocab()
    chars = "".join(sorted(t for t in vocab if len(t) == 1 and t not in tokenizer.all_special_tokens))
    unk = getattr(tokenizer, "unk_token_id", None)
    body = "".join(c for c in f"12 + 3 = 15\nthe answer is  7 {chars}"
                   if unk is None or tokenizer(c, add_special_tokens=False)["input_ids"] != [unk])
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                 add_generation_prompt=True)) + "ok 1\n2"
    return body


def export_hf(actor: nn.Module, tokenizer: Any, path: str) -> None:
    """``actor.save_pretrained(path)`` and the tokenizer (:func:`auto_loadable_tokenizer`), then check
    that ``AutoTokenizer.from_pretrained(path)`` encodes a probe text like ``tokenizer`` (warns if not).

    A LoRA (``peft``) actor is saved as an ordinary HF model: a copy with the
    adapters merged into the weights (the actor itself keeps its adapters).
    """
    from tre_lightning.models.lora import is_peft_model, merged_copy

    if is_peft_model(actor):
        actor = merged_copy(actor)
    actor.save_pretrained(path)
    auto_loadable_tokenizer(tokenizer).save_pretrained(path)
    check_tokenizer_round_trip(tokenizer, path)


def check_tokenizer_round_trip(tokenizer: Any, path: str) -> None:
    """Warn when ``AutoTokenizer.from_pretrained(path)`` does not encode a probe text like ``tokenizer``."""
    from transformers import AutoTokenizer

    probe = round_trip_probe(tokenizer)
    try:
        loaded = AutoTokenizer.from_pretrained(path, local_files_only=True)
        same = loaded(probe)["input_ids"] == tokenizer(probe)["input_ids"]
    except Exception as err:  # noqa: BLE001 - any failure to load is reported, the export stays
        same, loaded = False, err
    if not same:
        warnings.warn(
            f"export_hf: AutoTokenizer.from_pretrained({path!r}) ({type(loaded).__name__}) does not encode "
            "text like the training tokenizer; load the folder with "
            "tre_lightning.models.source.load_tokenizer instead",
            stacklevel=3,
        )


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
        save_hf_pretrained(actor, path, tokenizer=auto_loadable_tokenizer(tokenizer))
        return
    if has_4bit_layers(actor):
        raise ValueError("export_hf: a sharded actor with a 4-bit base is not supported (4-bit layers are not "
                         "sharded, see docs/scaling.md); export from a single process")
    from tre_lightning.rollout.vllm import gather_weights_for_vllm

    state = {name: tensor.detach().cpu() for name, tensor in gather_weights_for_vllm(actor)}
    save_hf_pretrained(actor.get_base_model(), path, state_dict=state, tokenizer=auto_loadable_tokenizer(tokenizer))
