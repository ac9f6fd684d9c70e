"""The quickstart's tokenizer: characters plus thousands of filler tokens.

The useful vocabulary is tiny (digits, lowercase letters, space, newline and
four special tokens: 42 tokens); the rest of the vocabulary is filled with
never-used tokens ``<|f0|>`` … so that, as in an LLM with a 150k vocabulary,
almost every token is invalid at almost every step. A policy that leaks
probability mass into this tail produces unparsable answers: the tail-risk
setting of section 4 of the paper, in miniature.
"""

from __future__ import annotations

import string

from transformers import PreTrainedTokenizerFast

from tre_lightning.models.tiny import char_tokenizer

__all__ = ["QUICKSTART_CHARS", "N_SPECIAL", "is_filler", "quickstart_tokenizer", "useful_token_ids"]

QUICKSTART_CHARS = string.digits + string.ascii_lowercase + " \n"
"""Characters with their own token (the chat template needs the letters of its role names)."""

N_SPECIAL = 4
"""pad, eos (``<|im_end|>``), ``<|im_start|>``, unk."""


def quickstart_tokenizer(vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """The character tokenizer with ChatML template, padded to ``vocab_size`` tokens.

    Args:
        vocab_size: total vocabulary, >= the 42 useful tokens; the difference
            is made of filler tokens.
    """
    useful = N_SPECIAL + len(QUICKSTART_CHARS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < useful:
        raise ValueError(f"vocab_size must be an int >= {useful} (the useful tokens), got {vocab_size!r}")
    tok = char_tokenizer(QUICKSTART_CHARS, n_filler=vocab_size - useful)
    assert len(tok) == vocab_size
    return tok


def is_filler(token: str) -> bool:
    """True for the never-used filler tokens ``<|f0|>``, ``<|f1|>``, …"""
    return token.startswith("<|f") and token.endswith("|>") and token[3:-2].isdigit()


def useful_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids of the non-filler tokens (specials and characters), sorted."""
    vocab = tokenizer.get_vocab()
    return sorted(i for t, i in vocab.items() if not is_filler(t))
