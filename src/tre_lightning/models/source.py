"""Where models come from: the ModelSource seam and its two built-in sources.

A source hands out a tokenizer (with a chat template) and freshly built causal
LMs. Nothing downloads: :class:`PretrainedSource` reads a local folder only
(``local_files_only=True``); :class:`TinyRandomSource` builds a small Qwen2 with
seeded random weights (tests, benchmarks, the embedded task). A new source
(a warm start, LoRA, 4-bit) is one more class with the same two methods.

The module calls the source inside ``configure_model`` so that a sharding
strategy can wrap the models right after they are built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tre_lightning.checks import ConfigError, boolean, one_of, optional, text
from tre_lightning.models.tiny import DEFAULT_CHARS, char_tokenizer, tiny_qwen2_config

__all__ = ["ModelSource", "PretrainedSource", "TinyRandomSource", "load_tokenizer", "resolve_dtype"]

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype | Literal["auto"]:
    """``"auto" | "float32" | "bfloat16" | "float16"`` -> torch dtype (or ``"auto"``)."""
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *_DTYPES]}, got {name!r}")
    return _DTYPES[name]


@runtime_checkable
class ModelSource(Protocol):
    """Builds the tokenizer and new causal-LM instances.

    ``causal_lm()`` returns a *new* model each call (actor, critic backbone and
    reference are separate copies with the same initial weights).
    """

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer; must have a chat template, a pad token and an eos token."""
        ...

    def causal_lm(self) -> PreTrainedModel:
        """A new causal LM (``AutoModelForCausalLM``-like) with the source's initial weights."""
        ...


_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(folder: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(folder)``, except that a folder whose
    ``tokenizer_config.json`` declares a generic fast tokenizer
    (``TokenizersBackend`` / ``PreTrainedTokenizerFast``) is loaded as exactly that.

    transformers 5 otherwise picks the tokenizer class registered for the
    model type of a ``config.json`` in the same folder (``Qwen2Tokenizer`` for a
    Qwen2 model), whose own pre-tokenizer replaces the one in ``tokenizer.json``:
    the character tokenizer of the tiny models would then lose its spaces.
    """
    import json

    from transformers import PreTrainedTokenizerFast

    config_file = Path(folder) / "tokenizer_config.json"
    declared = None
    if config_file.is_file():
        declared = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
    if declared in _GENERIC_TOKENIZER_CLASSES and (Path(folder) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)


def _check_tokenizer(tok: PreTrainedTokenizerBase, where: str) -> PreTrainedTokenizerBase:
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(f"the tokenizer from {where} has no chat template; prompts are rendered with it")
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer from {where} has no eos token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # generation and padding need one; eos is the usual stand-in
    tok.padding_side = "left"
    return tok


class PretrainedSource:
    """A model folder on local disk (``save_pretrained`` layout); never downloads.

    Args:
        path: folder with config, weights and tokenizer files (``~`` expanded).
        tokenizer_path: tokenizer folder if different from ``path``.
        dtype: ``auto`` (as saved), ``float32``, ``bfloat16`` or ``float16``.
        attn_implementation: e.g. ``sdpa``, ``eager``, ``flash_attention_2``; None = default.
        trust_remote_code: allow custom modelling code shipped in the folder.
        load_in_4bit: load a *frozen* model in 4-bit NF4 with bitsandbytes (the
            ``quant`` extra; :func:`tre_lightning.models.quant.load_frozen_4bit`),
            on this process's GPU (CPU without one). For the reference model
            only (``PPOModule(reference=...)``): the actor and critic are
            trained and refuse it. ``dtype`` is the storage/compute dtype
            (``auto`` = bfloat16). Under FSDP2 a 4-bit model is not sharded:
            every process holds the whole 4-bit copy.
    """

    def __init__(
        self,
        path: str,
        tokenizer_path: str | None = None,
        dtype: DTypeName = "auto",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        load_in_4bit: bool = False,
    ) -> None:
        text("path", path)
        self.path = os.path.expanduser(path)
        self.tokenizer_path = os.path.expanduser(tokenizer_path) if tokenizer_path else self.path
        for name, folder in (("path", self.path), ("tokenizer_path", self.tokenizer_path)):
            if not Path(folder).is_dir():
                raise ConfigError(name, f"model folder {folder!r} does not exist; expected a local HF model folder "
                                        "(config.json, weights, tokenizer files); nothing is downloaded")
        if not (Path(self.path) / "config.json").is_file():
            raise ConfigError("path", f"{self.path!r} is not an HF model folder (no config.json in it)")
        self.dtype = one_of("dtype", dtype, ("auto", *_DTYPES))
        self.attn_implementation = optional(text, "attn_implementation", attn_implementation)
        self.trust_remote_code = boolean("trust_remote_code", trust_remote_code)
        self.load_in_4bit = boolean("load_in_4bit", load_in_4bit)

    def _require(self, folder: str) -> None:
        if not Path(folder).is_dir():
            raise FileNotFoundError(
                f"model folder {folder!r} does not exist; PretrainedSource reads local folders only "
                "(download once with `huggingface-cli download <repo> --local-dir <folder>`)"
            )

    def tokenizer(self) -> PreTrainedTokenizerBase:
        self._require(self.tokenizer_path)
        tok = load_tokenizer(self.tokenizer_path, trust_remote_code=self.trust_remote_code)
        return _check_tokenizer(tok, self.tokenizer_path)

    def causal_lm(self) -> PreTrainedModel:
        self._require(self.path)
        kwargs: dict[str, object] = {"local_files_only": True, "trust_remote_code": self.trust_remote_code,
                                     "dtype": resolve_dtype(self.dtype)}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.load_in_4bit:
            from tre_lightning.models.quant import load_frozen_4bit

            dtype = kwargs.pop("dtype")
            return load_frozen_4bit(self.path, dtype=torch.bfloat16 if dtype == "auto" else dtype, **kwargs)
        return AutoModelForCausalLM.from_pretrained(self.path, **kwargs)

    def __repr__(self) -> str:
        extra = ", load_in_4bit=True" if self.load_in_4bit else ""
        return f"PretrainedSource(path={self.path!r}, dtype={self.dtype!r}{extra})"


class TinyRandomSource:
    """A tiny Qwen2 with seeded random weights and a character tokenizer (no files).

    Every ``causal_lm()`` call returns the same weights (built under a private
    RNG seeded with ``seed``), so actor, critic backbone and reference start
    equal, as copies of one base model do.

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
            intermediate_size, max_position_embeddings: Qwen2 sizes (see
            :func:`tre_lightning.models.tiny.tiny_qwen2_config`).
        chars: characters with their own token (default: digits, letters,
            punctuation, space, newline).
        n_filler: unused extra tokens that enlarge the vocabulary, >= 0.
        seed: weight initialisation seed.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
        init_std: ``initializer_range`` of the config (std of the weights), > 0.
    """

    def __init__(
        self,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        intermediate_size: int = 128,
        max_position_embeddings: int = 512,
        chars: str = DEFAULT_CHARS,
        n_filler: int = 0,
        seed: int = 0,
        dtype: DTypeName = "float32",
        init_std: float = 0.02,
    ) -> None:
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std}")
        if dtype == "auto":
            dtype = "float32"
        resolve_dtype(dtype)
        self.chars = chars
        self.n_filler = n_filler
        self.seed = seed
        self.dtype = dtype
        self.init_std = init_std
        self._tokenizer = char_tokenizer(chars, n_filler=n_filler)
        self.config = tiny_qwen2_config(
            vocab_size=len(self._tokenizer),
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            pad_token_id=self._tokenizer.pad_token_id,
            eos_token_id=self._tokenizer.eos_token_id,
            initializer_range=init_std,
        )

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    def causal_lm(self) -> PreTrainedModel:
        from transformers import Qwen2ForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = Qwen2ForCausalLM(self.config)
        model.generation_config.pad_token_id = self._tokenizer.pad_token_id
        model.generation_config.eos_token_id = self._tokenizer.eos_token_id
        return model.to(_DTYPES[self.dtype])

    def __repr__(self) -> str:
        c = self.config
        return (f"TinyRandomSource(hidden_size={c.hidden_size}, num_hidden_layers={c.num_hidden_layers}, "
                f"vocab={c.vocab_size}, seed={self.seed})")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: for the reference model."""
    model.eval()
    model.requires_grad_(False)
    return model
