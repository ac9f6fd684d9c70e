"""The default rollout engine: HF ``generate`` on the actor itself (colocated, no copy).

Batched generation of left-padded prompts with the KV cache; each prompt is
repeated ``n`` times (rows ``i*n … i*n+n-1`` belong to prompt ``i``). A
response ends at its first eos (kept, and counted as a valid token) or at
``max_new_tokens``; everything after is padding with mask 0.

Works when the actor is sharded with FSDP2: ``sync_weights`` registers
``generate`` as an FSDP forward method (``register_fsdp_forward_method``), so
the parameters are gathered for it as for ``forward``. Under data parallelism
every process must call ``generate`` the same number of times: ranks stop
together because HF ``generate`` synchronises finished sequences
(``synced_gpus``) when ``torch.distributed`` is initialised with more than one
process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from tre_lightning.rollout.base import Rollout, SamplingParams

__all__ = ["HFGenerateEngine", "response_mask_from_eos"]


def response_mask_from_eos(response_ids: Tensor, eos_token_ids: list[int]) -> Tensor:
    """(N, R) 1 up to and including the first eos of each row, 0 after it.

    A row without eos (truncated at ``max_new_tokens``) is valid throughout.
    """
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= response_ids == eos
    # eos seen strictly before position t  <=>  cumsum up to t-1 > 0
    seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~seen_before).long()


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class HFGenerateEngine:
    """Rollouts with ``model.generate`` (the :class:`RolloutEngine` protocol).

    Args:
        eos_token_ids: token ids that end a response; None = the model's
            generation config (and the pad id is the model's or the first eos).
        pad_token_id: id written after the end of a response; None = from the model.
        use_cache: use the KV cache (on by default).
    """

    def __init__(
        self,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
    ) -> None:
        if eos_token_ids is not None:
            if isinstance(eos_token_ids, str | bytes) or not isinstance(eos_token_ids, Sequence) or not eos_token_ids \
                    or not all(_is_token_id(t) for t in eos_token_ids):
                raise ValueError(f"eos_token_ids must be None or a non-empty list of ints >= 0, got {eos_token_ids!r}")
        if pad_token_id is not None and not _is_token_id(pad_token_id):
            raise ValueError(f"pad_token_id must be None or an int >= 0, got {pad_token_id!r}")
        if not isinstance(use_cache, bool):
            raise ValueError(f"use_cache must be true or false, got {use_cache!r}")
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else None
        self.pad_token_id = pad_token_id
        self.use_cache = use_cache
        self._model: nn.Module | None = None

    def sync_weights(self, actor: nn.Module) -> None:
        """Generate with ``actor`` itself (colocated: no copy is made)."""
        if actor is not self._model:
            _register_generate_for_fsdp(actor)
        self._model = actor

    def _ids(self, model: nn.Module) -> tuple[list[int], int]:
        eos = self.eos_token_ids
        gen_cfg = getattr(model, "generation_config", None)
        if eos is None:
            raw = getattr(gen_cfg, "eos_token_id", None)
            if raw is None:
                raw = getattr(getattr(model, "config", None), "eos_token_id", None)
            if raw is None:
                raise ValueError("no eos token id: pass eos_token_ids to HFGenerateEngine")
            eos = [raw] if isinstance(raw, int) else list(raw)
        pad = self.pad_token_id
        if pad is None:
            pad = getattr(gen_cfg, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        if pad is None:
            pad = eos[0]
        return eos, int(pad)

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams) -> Rollout:
        """prompt_ids/prompt_mask: (B, P) left-padded; returns B × n rows, grouped by prompt."""
        model = self._model
        if model is None:
            raise RuntimeError("HFGenerateEngine.generate called before sync_weights(actor)")
        if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
            raise ValueError(
                f"prompt_ids and prompt_mask must both be (B, P), got {tuple(prompt_ids.shape)} "
                f"and {tuple(prompt_mask.shape)}"
            )
        if bool((prompt_mask[:, -1] == 0).any()):
            raise ValueError("prompts must be left-padded (prompt_mask[:, -1] must be 1 on every row)")
        eos, pad = self._ids(model)
        ids = prompt_ids.repeat_interleave(sampling.n, dim=0)
        mask = prompt_mask.repeat_interleave(sampling.n, dim=0)
        gen_config = GenerationConfig(
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_p=sampling.top_p if not sampling.greedy else None,
            top_k=sampling.top_k if (sampling.top_k > 0 and not sampling.greedy) else None,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            use_cache=self.use_cache,
            num_beams=1,
        )
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=gen_config,
                synced_gpus=_distributed_world() > 1,
            )
        finally:
            model.train(was_training)
        sequences = out if isinstance(out, Tensor) else out.sequences
        response = sequences[:, ids.shape[1] :]
        if response.shape[1] == 0:  # cannot happen with max_new_tokens >= 1, kept for safety
            response = torch.full((ids.shape[0], 1), pad, dtype=ids.dtype, device=ids.device)
        response_mask = response_mask_from_eos(response, eos)
        response = torch.where(response_mask.bool(), response, torch.full_like(response, pad))
        return Rollout(
            prompt_ids=ids,
            prompt_mask=mask.long(),
            response_ids=response,
            response_mask=response_mask,
            response_lengths=response_mask.sum(dim=1),
        )


def _register_generate_for_fsdp(model: nn.Module) -> None:
    """Under FSDP2, gather parameters for ``generate`` as for ``forward``."""
    try:
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    except ImportError:  # torch without distributed
        return
    if isinstance(model, FSDPModule):
        register_fsdp_forward_method(model, "generate")
