"""A plain decode loop over a HF causal LM's ``forward``: what ``generate`` does, minus its overhead.

Per step: one forward of the new token with the KV cache (only the last
position's logits are computed), one call of the sampler, a vectorised eos
check. Nothing is read from the model's ``generation_config``: the sampler
alone decides the distribution. The prompt is run once per prompt and its KV
cache repeated for the ``n`` samples (HF ``generate`` runs it ``n`` times).

Under data parallelism (``torch.distributed`` with more than one process)
every rank must make the same number of forward calls (FSDP all-gathers the
parameters inside each one): when ``sync`` is on, the ranks all-reduce
"unfinished rows" after every step and stop together, finished rows being
fed the pad token meanwhile (as HF ``generate(synced_gpus=True)`` does).

Position ids follow HF ``generate`` for left padding (``cumsum(mask) - 1``,
1 on padding), so greedy tokens equal ``generate``'s for the same model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["decode"]


def _forward_kwargs(model: nn.Module) -> tuple[str, bool]:
    """(name of the KV-cache argument of ``model.forward``, whether it takes ``logits_to_keep``)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    params = inspect.signature(base.forward).parameters  # a peft model's forward passes these on (**kwargs)
    if "cache" in params:  # transformers >= 5
        name = "cache"
    elif "past_key_values" in params:
        name = "past_key_values"
    else:
        raise TypeError(
            f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`: the decode loop needs a "
            "HF causal LM; use HFGenerateEngine(backend='generate') for other models"
        )
    return name, "logits_to_keep" in params


def _new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _all_finished(finished: Tensor, sync: bool) -> bool:
    if not sync:
        return bool(finished.all())
    unfinished = (~finished).sum().to(torch.float32).reshape(1)
    torch.distributed.all_reduce(unfinished)  # SUM over ranks
    return bool(unfinished.item() == 0)


@torch.no_grad()
def decode(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    n: int,
    max_new_tokens: int,
    sample: Callable[[Tensor], Tensor],
    eos_token_ids: list[int],
    pad_token_id: int,
    use_cache: bool = True,
    sync: bool = False,
) -> Tensor:
    """Sample responses for left-padded prompts; rows ``i*n … i*n+n-1`` belong to prompt ``i``.

    Args:
        model: a HF causal LM (``forward(input_ids, attention_mask, position_ids, cache / past_key_values,
            use_cache, logits_to_keep)`` returning ``.logits``), in eval mode.
        prompt_ids, prompt_mask: (B, P) left-padded.
        n: samples per prompt.
        max_new_tokens: at most this many tokens per row.
        sample: (N, V) logits of the next token -> (N,) token ids.
        eos_token_ids: a row ends after its first token in this list.
        pad_token_id: written after a row's end (and fed to the model for finished rows).
        use_cache: with the KV cache; without, every step recomputes the whole sequence.
        sync: all-reduce "all finished" across ``torch.distributed`` ranks every step.

    Returns:
        (B * n, T) int64 response ids, pad after each row's first eos; T = the longest response
        (eos included), as HF ``generate`` returns (with ``sync``, other ranks may have run longer).
    """
    cache_arg, has_keep = _forward_kwargs(model)
    b, p = prompt_ids.shape
    rows = b * n
    device = prompt_ids.device
    mask = prompt_mask.long()
    full_mask = torch.ones((rows, p + max_new_tokens), dtype=torch.long, device=device)
    full_mask[:, :p] = mask.repeat_interleave(n, dim=0)
    positions = (mask.cumsum(dim=1) - 1).masked_fill_(mask == 0, 1)
    keep = {"logits_to_keep": 1} if has_keep else {}
    eos = torch.tensor(eos_token_ids, dtype=prompt_ids.dtype, device=device)
    pad = torch.full((), pad_token_id, dtype=prompt_ids.dtype, device=device)
    out = torch.full((rows, max_new_tokens), pad_token_id, dtype=prompt_ids.dtype, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)

    if use_cache:
        cache = _new_cache(model)
        first = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                      **{cache_arg: cache}, **keep)
        cache = _returned_cache(first)
        if cache is None:
            raise TypeError(f"{type(model).__name__} returned no KV cache; pass use_cache=False")
        if n > 1:
            cache.batch_repeat_interleave(n)
        logits = first.logits[:, -1].repeat_interleave(n, dim=0) if n > 1 else first.logits[:, -1]
        position = positions[:, -1:].repeat_interleave(n, dim=0) + 1
    else:
        seq = prompt_ids.repeat_interleave(n, dim=0)
        seq_pos = positions.repeat_interleave(n, dim=0)
        logits = model(input_ids=seq, attention_mask=full_mask[:, :p], position_ids=seq_pos, use_cache=False,
                       **keep).logits[:, -1]
    length = torch.zeros(rows, dtype=torch.long, device=device)  # tokens up to and including eos
    for t in range(max_new_tokens):
        length += ~finished  # this step's token counts for rows still running
        token = torch.where(finished, pad, sample(logits))
        out[:, t] = token
        finished |= torch.isin(token, eos)
        if t + 1 == max_new_tokens or _all_finished(finished, sync):
            break
        step_ids = token.unsqueeze(1)
        if use_cache:
            logits = model(input_ids=step_ids, attention_mask=full_mask[:, : p + t + 1], position_ids=position,
                           use_cache=True, **{cache_arg: cache}, **keep).logits[:, -1]
            position = position + 1
        else:
            seq = torch.cat([seq, step_ids], dim=1)
            seq_pos = torch.cat([seq_pos, seq_pos[:, -1:] + 1], dim=1)
            logits = model(input_ids=seq, attention_mask=full_mask[:, : p + t + 1], position_ids=seq_pos,
                           use_cache=False, **keep).logits[:, -1]
    return out[:, : int(length.max())]
