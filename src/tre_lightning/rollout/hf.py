"""The default rollout engine: the actor itself (colocated, no copy), HF causal LMs.

Two backends, the same sampling:

- ``"loop"`` (default): :func:`~tre_lightning.rollout.decode.decode`, our own
  decode loop over the model's ``forward`` with the KV cache and the exact
  one-pass sampler of :mod:`~tre_lightning.rollout.sampling` (measured
  several times faster than ``generate`` on CPU at a 151,936-token
  vocabulary, see ``benchmarks/rollout.py``);
- ``"generate"``: HF ``model.generate``, kept for comparison and for models
  whose ``forward`` the loop cannot drive.

Both sample from softmax(z / T) restricted to the configured top-k / top-p
and nothing else: the loop reads nothing from the model's generation config,
and ``generate`` runs with the model's ``generation_config`` replaced, for
the call, by a neutral one built from our :class:`SamplingParams` alone (so a
``generation_config.json`` with ``top_k``, ``repetition_penalty``,
``min_new_tokens``, bad words, suppressed or forced tokens ... changes
nothing), with ``top_k=0`` passed when top-k is off (``None`` would fall back
to transformers' default top-50).

Batched generation of left-padded prompts; each prompt is repeated ``n``
times (rows ``i*n … i*n+n-1`` belong to prompt ``i``). A response ends at its
first eos (kept, and counted as a valid token) or at ``max_new_tokens``;
everything after is padding with mask 0.

Works when the actor is sharded with FSDP2: ``sync_weights`` registers
``generate`` as an FSDP forward method (``register_fsdp_forward_method``), so
the parameters are gathered for it as for ``forward`` (the loop calls
``forward`` itself). Under data parallelism every process must make the same
number of forward calls: both backends keep the ranks in lock-step when
``torch.distributed`` is initialised with more than one process (the loop
all-reduces "all finished" per step, ``generate`` uses ``synced_gpus``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from tre_lightning import checks
from tre_lightning.rollout.base import Rollout, SamplingParams
from tre_lightning.rollout.decode import decode
from tre_lightning.rollout.sampling import sample_next_tokens

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


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


BACKENDS = ("loop", "generate")


def neutral_generation_config(sampling: SamplingParams, eos: list[int], pad: int, use_cache: bool) -> GenerationConfig:
    """A ``GenerationConfig`` that samples from softmax(z / T) with our top-k / top-p only.

    Every processor-controlling field is set to its "off" value explicitly
    (``top_k=0``: ``None`` means transformers' default 50); fields whose "off"
    value is ``None`` (bad words, suppressed/forced tokens, sequence bias,
    ``min_p``, ...) stay ``None``, which is why ``generate`` must also run with
    a neutral ``model.generation_config`` (:func:`_neutral_model_config`):
    transformers fills every ``None`` from it.
    """
    sample = not sampling.greedy
    return GenerationConfig(
        do_sample=sample,
        temperature=sampling.temperature if sample else None,
        top_p=sampling.top_p if sample else None,
        top_k=sampling.top_k if sample else None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=0,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=use_cache,
        num_beams=1,
        num_return_sequences=1,
        renormalize_logits=False,
        remove_invalid_values=False,
    )


@contextlib.contextmanager
def _neutral_model_config(model: nn.Module) -> Iterator[None]:
    """Replace ``model.generation_config`` by a default one for the call (transformers merges it in)."""
    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


class HFGenerateEngine:
    """Rollouts on the actor itself (the :class:`RolloutEngine` protocol).

    Args:
        eos_token_ids: token ids that end a response; None = the model's
            generation config (and the pad id is the model's or the first eos).
        pad_token_id: id written after the end of a response; None = from the model.
        use_cache: use the KV cache (on by default).
        backend: ``"loop"`` (default: our decode loop and exact sampler) or
            ``"generate"`` (HF ``model.generate``, for comparison or for models
            the loop cannot drive). Both sample from the same distribution.
    """

    def __init__(
        self,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        backend: str = "loop",
    ) -> None:
        self.eos_token_ids = checks.optional(checks.int_list, "eos_token_ids", eos_token_ids, 0)
        self.pad_token_id = checks.optional(checks.integer, "pad_token_id", pad_token_id, 0)
        self.use_cache = checks.boolean("use_cache", use_cache)
        self.backend = checks.one_of("backend", backend, BACKENDS)
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
        sync = _distributed_world() > 1
        was_training = model.training
        model.eval()
        try:
            if self.backend == "loop":
                response = decode(
                    model, prompt_ids, prompt_mask, n=sampling.n, max_new_tokens=sampling.max_new_tokens,
                    sample=lambda logits: sample_next_tokens(logits, sampling), eos_token_ids=eos,
                    pad_token_id=pad, use_cache=self.use_cache, sync=sync,
                )
            else:
                response = self._hf_generate(model, ids, mask, sampling, eos, pad, sync)
        finally:
            model.train(was_training)
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

    def _hf_generate(self, model: nn.Module, ids: Tensor, mask: Tensor, sampling: SamplingParams,
                     eos: list[int], pad: int, sync: bool) -> Tensor:
        gen_config = neutral_generation_config(sampling, eos, pad, self.use_cache)
        with _neutral_model_config(model):
            out: Any = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config,
                                      synced_gpus=sync)
        sequences = out if isinstance(out, Tensor) else out.sequences
        return sequences[:, ids.shape[1] :]


def _register_generate_for_fsdp(model: nn.Module) -> None:
    """Under FSDP2, gather parameters for ``generate`` as for ``forward``."""
    try:
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    except ImportError:  # torch without distributed
        return
    if isinstance(model, FSDPModule):
        register_fsdp_forward_method(model, "generate")
