"""Tiny, download-free models and tokenizers built from code.

Used by the tests, the embedded quickstart task and the notebooks: a
character-level tokenizer with a chat template (optionally padded with unused
"filler" tokens so that the vocabulary is much larger than the set of useful
tokens, the paper's tail-risk setting in miniature) and small Qwen2 configs.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast, Qwen2Config

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|im_end|>"
BOS_CHAT_TOKEN = "<|im_start|>"
UNK_TOKEN = "<|unk|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"


def char_tokenizer(chars: Iterable[str] = DEFAULT_CHARS, n_filler: int = 0) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with ChatML-style special tokens.

    Args:
        chars: the characters that get their own token (duplicates ignored).
        n_filler: extra never-used tokens ``<|f0|>`` … appended to the
            vocabulary to make it large (>= 0).

    Returns:
        A ``PreTrainedTokenizerFast`` with pad/eos/unk set, left padding and
        a chat template; ``save_pretrained`` / ``from_pretrained`` round-trip.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if n_filler < 0:
        raise ValueError(f"n_filler must be >= 0, got {n_filler}")
    specials = [PAD_TOKEN, EOS_TOKEN, BOS_CHAT_TOKEN, UNK_TOKEN]
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(specials)}
    for ch in chars:
        if len(ch) != 1:
            raise ValueError(f"chars must be single characters, got {ch!r}")
        vocab.setdefault(ch, len(vocab))
    for i in range(n_filler):
        vocab[f"<|f{i}|>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[BOS_CHAT_TOKEN],
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_qwen2_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.02,
) -> Qwen2Config:
    """A small Qwen2 config (random weights once built); validates sizes."""
    for name, value in {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
    }.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
        )
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({num_attention_heads}) must be divisible by "
            f"num_key_value_heads ({num_key_value_heads})"
        )
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
    )
