"""Colocated vLLM rollout engine (optional GPU extra: ``pip install 'tre-lightning[vllm]'``).

One vLLM engine per training process, on that process's GPU, next to the
(FSDP2-sharded) actor: it takes ``gpu_memory_utilization`` of the GPU for
its weights and KV cache, optionally sleeps (frees that memory) while the
PPO update runs, and gets the actor's weights pushed in after every update.
``vllm`` is imported only when the engine is built; choosing the engine
without vLLM or without CUDA raises :class:`VLLMUnavailableError` with what to
do, not an import traceback.

Everything except ``LLM`` itself is plain Python/torch and tested on CPU:

- :func:`to_hf_checkpoint_names` maps the actor's parameter names (FSDP,
  ``torch.compile``, activation-checkpoint, DDP and PEFT-LoRA wrappers) to
  the HF checkpoint names that vLLM's ``model.load_weights`` takes (vLLM
  fuses ``q/k/v_proj`` -> ``qkv_proj`` and ``gate/up_proj`` ->
  ``gate_up_proj`` itself, from checkpoint names), merging LoRA
  ``W + scaling * B @ A`` on the way;
- :func:`gather_weights_for_vllm` yields ``(checkpoint name, full tensor)``
  from a possibly sharded (``DTensor``) actor, one parameter at a time;
- :func:`request_outputs_to_rollout` converts vLLM ``RequestOutput``s into the
  same :class:`~tre_lightning.rollout.base.Rollout` as the HF engine.

vLLM APIs used (from the vLLM docs "Sleep Mode" and "Offline Inference" and
the ``LLM`` class, v0.10-v0.11 era; the ``vllm`` extra pins ``vllm>=0.10``):
``LLM(model=..., gpu_memory_utilization=..., enable_sleep_mode=..., seed=...,
dtype=..., max_model_len=..., distributed_executor_backend=...)``,
``LLM.generate(prompts, sampling_params, use_tqdm=False)`` with
``{"prompt_token_ids": [...]}`` prompts, ``LLM.sleep(level=1|2)`` (level 2
drops weights and KV cache: the docs' mode for RLHF weight updates),
``LLM.wake_up(tags=["weights"])`` before loading weights and
``LLM.wake_up(tags=["kv_cache"])`` after, ``LLM.reset_prefix_cache()``, and
the in-process model's ``load_weights(iterable of (name, tensor))`` reached
through ``llm.llm_engine.model_executor.driver_worker.worker.model_runner.model``
(the path TRL and verl use for colocated engines), else through
``LLM.apply_model``. Newer vLLM also has a "weight transfer" API
(``init_weight_transfer_engine`` / ``update_weights``, IPC backend for
colocated engines); it is not used here.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tre_lightning.rollout.base import Rollout, SamplingParams

__all__ = [
    "VLLMEngine",
    "VLLMUnavailableError",
    "check_vllm_available",
    "gather_weights_for_vllm",
    "lora_scalings",
    "request_outputs_to_rollout",
    "to_hf_checkpoint_names",
    "to_vllm_sampling_kwargs",
]


class VLLMUnavailableError(RuntimeError):
    """The vLLM engine was chosen but vLLM or a CUDA GPU is missing.

    The message says what is missing and how to fix it; entry points print it
    and exit instead of showing a traceback.
    """


def check_vllm_available() -> None:
    """Raise :class:`VLLMUnavailableError` unless ``vllm`` is importable and CUDA is available."""
    problems = []
    if importlib.util.find_spec("vllm") is None:
        problems.append(
            "the `vllm` package is not installed (GPU-only optional extra: pip install 'tre-lightning[vllm]'; "
            "it pins its own torch/transformers, see docs/scaling.md)"
        )
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible (torch.cuda.is_available() is False; vLLM has no CPU build here)")
    if problems:
        raise VLLMUnavailableError(
            "rollout engine 'vllm' cannot be used: "
            + "; and ".join(problems)
            + ". Use the HF engine instead, which runs everywhere: leave the engine unset "
            "(Hydra: drop +engine=vllm, engine=null is the default; Lightning CLI: no --model.engine; "
            "tre-eval: --engine hf)."
        )


# --------------------------------------------------------------------------- #
# names: our parameters -> HF checkpoint names (what vLLM's load_weights takes)
# --------------------------------------------------------------------------- #

_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_LEADING_PREFIXES = ("module.", "base_model.model.")
_DEFAULT_EXCLUDE = ("value_head.", "v_head.")
_LORA_RE = re.compile(r"^(?P<mod>.*)\.lora_(?P<ab>A|B)\.(?P<adapter>[^.]+)\.weight$")
_LORA_OTHER = re.compile(r"\.lora_(embedding_[AB]|magnitude_vector|dropout)\b")


def _strip(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    changed = True
    while changed:
        changed = False
        for prefix in _LEADING_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def lora_scalings(model: nn.Module, adapter: str = "default") -> dict[str, float]:
    """``{stripped module name: scaling}`` of the PEFT-style LoRA layers in ``model``.

    A LoRA layer is a module with ``lora_A``/``lora_B`` ``ModuleDict``s and a
    ``scaling`` dict (PEFT's ``LoraLayer``: ``lora_alpha / r``, or
    ``lora_alpha / sqrt(r)`` with rsLoRA).
    """
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and isinstance(scaling, Mapping):
            if adapter in scaling:
                out[_strip(name + ".")[:-1] if name else name] = float(scaling[adapter])
    return out


def to_hf_checkpoint_names(
    named_tensors: Iterable[tuple[str, Tensor]],
    *,
    lora_scaling: float | Mapping[str, float] = 1.0,
    adapter: str = "default",
    exclude: Sequence[str] = _DEFAULT_EXCLUDE,
) -> Iterator[tuple[str, Tensor]]:
    """Map parameter names to HF checkpoint names, merging LoRA adapters.

    - removes wrapper parts: ``_fsdp_wrapped_module.``,
      ``_checkpoint_wrapped_module.``, ``_orig_mod.`` (torch.compile), and
      leading ``module.`` (DDP) / ``base_model.model.`` (PEFT);
    - PEFT LoRA: ``x.base_layer.weight`` + ``x.lora_A.<adapter>.weight`` (r, in)
      + ``x.lora_B.<adapter>.weight`` (out, r) -> ``x.weight`` =
      ``W + scaling * B @ A`` (in float32, cast back to W's dtype);
      ``x.base_layer.bias`` -> ``x.bias``; ``modules_to_save.<adapter>.`` is
      unwrapped and its ``original_module`` copy dropped;
    - drops names starting with any of ``exclude`` (a value head sharing the
      actor) and LoRA tensors of other adapters.

    Streams: a LoRA layer is emitted when its three tensors have been seen.

    Args:
        named_tensors: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``
            or :func:`~tre_lightning.models.fsdp.iter_full_parameters`.
        lora_scaling: one scaling for every layer, or ``{module name: scaling}``
            (see :func:`lora_scalings`; module names as after stripping).
        adapter: the PEFT adapter name to merge.
        exclude: name prefixes (after stripping) to drop.

    Raises:
        NotImplementedError: LoRA on embeddings, DoRA (magnitude vectors).
        ValueError: a LoRA layer with a missing piece at the end.
    """
    pending: dict[str, dict[str, Tensor]] = {}
    for raw, tensor in named_tensors:
        name = _strip(raw)
        if any(name.startswith(p) for p in exclude):
            continue
        if _LORA_OTHER.search(name):
            raise NotImplementedError(
                f"cannot merge {raw!r}: only LoRA on linear layers (lora_A/lora_B) is supported, not "
                "embedding LoRA or DoRA"
            )
        if ".original_module." in name:
            continue
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
        match = _LORA_RE.match(name)
        if match:
            if match["adapter"] != adapter:
                continue
            mod = match["mod"]
            pending.setdefault(mod, {})[match["ab"]] = tensor
        elif name.endswith(".base_layer.weight"):
            mod = name[: -len(".base_layer.weight")]
            pending.setdefault(mod, {})["W"] = tensor
        elif ".base_layer." in name:
            yield name.replace(".base_layer.", "."), tensor
            continue
        else:
            yield name, tensor
            continue
        parts = pending[mod]
        if len(parts) == 3:
            del pending[mod]
            scale = lora_scaling if isinstance(lora_scaling, (int, float)) else lora_scaling.get(mod)
            if scale is None:
                raise ValueError(f"no LoRA scaling for {mod!r}; pass lora_scaling (see lora_scalings())")
            yield mod + ".weight", _merge_lora(parts["W"], parts["A"], parts["B"], float(scale))
    for mod, parts in pending.items():
        if set(parts) == {"W"}:  # a base layer without this adapter: plain weight
            yield mod + ".weight", parts["W"]
        else:
            raise ValueError(f"incomplete LoRA layer {mod!r}: got {sorted(parts)} of W, A, B")


def _merge_lora(weight: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """W (out, in) + scaling * B (out, r) @ A (r, in), computed in float32."""
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
        raise ValueError(
            f"LoRA shapes do not fit: W {tuple(weight.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}"
        )
    delta = (b.float() @ a.float()) * scaling
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def gather_weights_for_vllm(
    actor: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    adapter: str = "default",
    exclude: Sequence[str] = _DEFAULT_EXCLUDE,
) -> Iterator[tuple[str, Tensor]]:
    """``(HF checkpoint name, full tensor)`` for every actor weight, LoRA merged.

    Gathers ``DTensor`` (FSDP2) shards one parameter at a time, so it is a
    collective: every rank must iterate to the end, in the same order (each
    rank of a colocated setup feeds its own vLLM engine). Tied weights appear
    once (``named_parameters`` de-duplicates; vLLM re-ties them).

    Args:
        actor: the HF causal LM (possibly sharded, compiled, PEFT-wrapped).
        dtype: cast each tensor (the engine's dtype) after merging.
        device: move each tensor there.
        adapter, exclude: see :func:`to_hf_checkpoint_names`.
    """
    from tre_lightning.models.fsdp import iter_full_parameters

    scalings = lora_scalings(actor, adapter)
    for name, tensor in to_hf_checkpoint_names(
        iter_full_parameters(actor), lora_scaling=scalings, adapter=adapter, exclude=exclude
    ):
        if dtype is not None or device is not None:
            tensor = tensor.to(device=device, dtype=dtype)
        yield name, tensor


# --------------------------------------------------------------------------- #
# sampling parameters and outputs
# --------------------------------------------------------------------------- #


def to_vllm_sampling_kwargs(
    sampling: SamplingParams,
    *,
    logprobs: bool,
    eos_token_ids: Sequence[int] = (),
    seed: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` (v0.10-v0.11) for our :class:`SamplingParams`.

    ``temperature``, ``top_p``, ``top_k`` (0 = off: vLLM's "off" value since
    v0.9, -1 still accepted), ``max_new_tokens`` -> ``max_tokens``; greedy ->
    ``temperature=0`` and ``n=1`` (vLLM refuses greedy with ``n > 1``; the
    engine repeats the completion). Every other processor vLLM has is set to
    its "off" value explicitly (penalties, ``min_p``, ``min_tokens``), and the
    response ends exactly at ``eos_token_ids``: ``ignore_eos=True`` with
    ``stop_token_ids=eos_token_ids``, because otherwise vLLM also stops at the
    tokenizer's eos and at every ``eos_token_id`` of the model's
    ``generation_config.json``. ``logprobs=0`` asks for the log-prob of the
    sampled token only.
    """
    kwargs: dict[str, Any] = {
        "n": 1 if sampling.greedy else sampling.n,
        "temperature": 0.0 if sampling.greedy else sampling.temperature,
        "top_p": 1.0 if sampling.greedy else sampling.top_p,
        "top_k": 0 if sampling.greedy else sampling.top_k,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "min_tokens": 0,
        "max_tokens": sampling.max_new_tokens,
        "ignore_eos": True,
        "stop_token_ids": [int(t) for t in eos_token_ids],
        "logprobs": 0 if logprobs else None,
        "detokenize": False,
    }
    if seed is not None:
        kwargs["seed"] = seed
    return kwargs


def repeat_rollout(rollout: Rollout, n: int) -> Rollout:
    """Each row of ``rollout`` repeated ``n`` times in place (rows ``i*n … i*n+n-1`` = old row ``i``)."""
    def rep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.repeat_interleave(n, dim=0)

    return Rollout(
        prompt_ids=rep(rollout.prompt_ids), prompt_mask=rep(rollout.prompt_mask),  # type: ignore[arg-type]
        response_ids=rep(rollout.response_ids), response_mask=rep(rollout.response_mask),  # type: ignore[arg-type]
        response_lengths=rep(rollout.response_lengths), log_probs=rep(rollout.log_probs),  # type: ignore[arg-type]
    )


def _logprob_value(entry: Any) -> float:
    return float(getattr(entry, "logprob", entry))


def request_outputs_to_rollout(
    outputs: Sequence[Any],
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    n: int,
    pad_token_id: int,
    eos_token_ids: Sequence[int] = (),
    with_log_probs: bool = False,
) -> Rollout:
    """Convert vLLM ``RequestOutput``s (one per prompt, in prompt order) to a :class:`Rollout`.

    Each output has ``.outputs``: ``n`` completions with ``.index``,
    ``.token_ids`` and (when requested) ``.logprobs``, a per-position mapping
    ``{token id: Logprob(logprob=...)}`` that holds the sampled token. Rows are
    grouped by prompt (prompt ``i`` -> rows ``i*n … i*n+n-1``, completion
    ``index`` order). Responses are right-padded with ``pad_token_id`` to the
    longest one; the mask is 1 up to and including the first eos (vLLM keeps
    the eos token in ``token_ids``); log-probs are 0 on padding.

    Args:
        outputs: ``B`` request outputs.
        prompt_ids, prompt_mask: (B, P) the left-padded prompts that were sent.
        n: completions per prompt.
        pad_token_id: written after each response.
        eos_token_ids: end-of-response ids (tokens after the first are masked).
        with_log_probs: fill ``Rollout.log_probs`` (requires ``.logprobs``).
    """
    from tre_lightning.rollout.hf import response_mask_from_eos

    if len(outputs) != prompt_ids.shape[0]:
        raise ValueError(f"got {len(outputs)} request outputs for {prompt_ids.shape[0]} prompts")
    rows: list[list[int]] = []
    row_logprobs: list[list[float]] = []
    for i, request in enumerate(outputs):
        completions = sorted(request.outputs, key=lambda c: getattr(c, "index", 0))
        if len(completions) != n:
            raise ValueError(f"prompt {i}: expected {n} completions, got {len(completions)}")
        for completion in completions:
            ids = list(completion.token_ids)
            rows.append(ids)
            if with_log_probs:
                lps = completion.logprobs
                if lps is None:
                    raise ValueError("with_log_probs=True but the completion has no logprobs")
                if len(lps) < len(ids):
                    raise ValueError(f"prompt {i}: {len(lps)} logprob entries for {len(ids)} tokens")
                row_logprobs.append([_logprob_value(lps[t][tok]) for t, tok in enumerate(ids)])
    device = prompt_ids.device
    width = max(1, max((len(r) for r in rows), default=1))
    response = torch.full((len(rows), width), pad_token_id, dtype=prompt_ids.dtype)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    log_probs = torch.zeros((len(rows), width), dtype=torch.float32) if with_log_probs else None
    for r, ids in enumerate(rows):
        if ids:
            response[r, : len(ids)] = torch.tensor(ids, dtype=prompt_ids.dtype)
            if log_probs is not None:
                log_probs[r, : len(ids)] = torch.tensor(row_logprobs[r], dtype=torch.float32)
        lengths[r] = len(ids)
    valid = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    if eos_token_ids:
        valid &= response_mask_from_eos(response, list(eos_token_ids)).bool()
    response_mask = valid.long()
    response = torch.where(valid, response, torch.full_like(response, pad_token_id))
    if log_probs is not None:
        log_probs = log_probs * response_mask
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(n, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(n, dim=0).long(),
        response_ids=response.to(device),
        response_mask=response_mask.to(device),
        response_lengths=response_mask.sum(dim=1).to(device),
        log_probs=log_probs.to(device) if log_probs is not None else None,
    )


# --------------------------------------------------------------------------- #
# the engine
# --------------------------------------------------------------------------- #

_MODEL_PATHS = (
    ("llm_engine", "model_executor", "driver_worker", "worker", "model_runner", "model"),
    ("llm_engine", "model_executor", "driver_worker", "model_runner", "model"),
    ("llm_engine", "engine_core", "engine_core", "model_executor", "driver_worker", "worker", "model_runner", "model"),
)


def _resolve(obj: Any, path: Sequence[str]) -> Any:
    for attr in path:
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def _dist_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class VLLMEngine:
    """Colocated vLLM generation (the :class:`RolloutEngine` protocol).

    Built lazily (on the first ``generate``/``sync_weights``) and once per
    process, on that process's current CUDA device. Call ``sync_weights(actor)``
    once before the first rollout when the actor does not start from
    ``model`` (random init, LoRA) and after every PPO update.

    Args:
        model: local HF model folder vLLM loads at start (the actor's initial
            weights; its config/tokenizer define the architecture).
        tokenizer: tokenizer folder if not ``model``.
        dtype: vLLM weight/compute dtype (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"auto"``).
        gpu_memory_utilization: fraction of the GPU vLLM may take (weights + KV
            cache); colocated with training, keep it well below 1 (0.3-0.5).
        enable_sleep_mode: free vLLM's GPU memory after every rollout, while
            the PPO update runs (``LLM.sleep``); the next ``generate`` or
            ``sync_weights`` wakes it.
        sleep_level: 1 = weights offloaded to CPU memory, KV cache dropped (a
            rollout without a weight push in between, e.g. validation, just
            wakes it); 2 = weights dropped too (no CPU copy; a
            ``sync_weights`` must come before the next ``generate``).
        max_model_len: prompt + response length cap (default: the model's).
        seed: sampling seed; rank ``r`` uses ``seed + r`` so data-parallel
            ranks draw different samples.
        enforce_eager: no CUDA graphs (less memory, slower decoding).
        enable_prefix_caching: reuse KV of shared prompt prefixes (the n
            samples of a prompt); reset after every weight push.
        tensor_parallel_size: vLLM TP degree (1 for the colocated setup).
        distributed_executor_backend: ``"auto"`` -> ``"external_launcher"``
            when ``torch.distributed`` is initialised (each rank owns an
            in-process engine, as under torchrun/SLURM), else vLLM's default.
        return_log_probs: fill ``Rollout.log_probs`` with vLLM's log-probs of
            the sampled tokens (see ``logprobs_mode``).
        logprobs_mode: passed to vLLM when given (e.g.
            ``"processed_logprobs"`` for log-probs after temperature/top-p;
            vLLM's default is the raw model log-probs).
        pad_token_id: written after responses (default: the tokenizer's pad, else eos).
        eos_token_ids: end-of-response ids (default: the tokenizer's eos).
        sync_chunk_bytes: weights are pushed in chunks of about this size.
        engine_kwargs: extra ``vllm.LLM`` keyword arguments.

    Raises:
        VLLMUnavailableError: at construction, when vLLM or CUDA is missing.
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.4,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        tensor_parallel_size: int = 1,
        distributed_executor_backend: str | None = "auto",
        return_log_probs: bool = True,
        logprobs_mode: str | None = None,
        pad_token_id: int | None = None,
        eos_token_ids: list[int] | None = None,
        sync_chunk_bytes: int = 512 * 2**20,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if sync_chunk_bytes < 1:
            raise ValueError(f"sync_chunk_bytes must be >= 1, got {sync_chunk_bytes}")
        check_vllm_available()
        self.model = os.path.expanduser(model)
        self.tokenizer = os.path.expanduser(tokenizer) if tokenizer else None
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.max_model_len = max_model_len
        self.seed = seed
        self.enforce_eager = enforce_eager
        self.enable_prefix_caching = enable_prefix_caching
        self.tensor_parallel_size = tensor_parallel_size
        self.distributed_executor_backend = distributed_executor_backend
        self.return_log_probs = return_log_probs
        self.logprobs_mode = logprobs_mode
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else None
        self.sync_chunk_bytes = sync_chunk_bytes
        self.engine_kwargs = dict(engine_kwargs or {})
        self._llm: Any = None
        self._vllm: Any = None
        self._asleep = False
        self._weights_dropped = False

    # -- construction --------------------------------------------------------

    def _engine_kwargs(self) -> dict[str, Any]:
        backend = self.distributed_executor_backend
        if backend == "auto":
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            backend = "external_launcher" if distributed else None
        kwargs: dict[str, Any] = {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enable_sleep_mode": self.enable_sleep_mode,
            "seed": self.seed + _dist_rank() // self.tensor_parallel_size,
            "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": self.enable_prefix_caching,
            "tensor_parallel_size": self.tensor_parallel_size,
            # vLLM's default "auto" reads the model's generation_config.json; "vllm" ignores it, so that
            # sampling comes from our SamplingParams alone (to_vllm_sampling_kwargs sets everything anyway)
            "generation_config": "vllm",
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if backend is not None:
            kwargs["distributed_executor_backend"] = backend
        if self.logprobs_mode is not None:
            kwargs["logprobs_mode"] = self.logprobs_mode
        kwargs.update(self.engine_kwargs)
        return {k: v for k, v in kwargs.items() if v is not None or k == "tokenizer"}

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` (built on first access)."""
        if self._llm is None:
            self.build()
        return self._llm

    def build(self) -> None:
        """Create the ``vllm.LLM`` on this process's GPU (idempotent)."""
        if self._llm is not None:
            return
        check_vllm_available()
        # Colocated: keep the engine core in this process so that the model
        # object is reachable for in-place weight loading.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # vLLM's external_launcher reads these; under srun Lightning does not set them
            os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
            os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
            os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device()))
        import vllm

        self._vllm = vllm
        self._llm = vllm.LLM(**self._engine_kwargs())
        tok = None
        try:
            tok = self._llm.get_tokenizer()
        except Exception:  # noqa: BLE001 - skip_tokenizer_init or a tokenizer-less setup
            tok = None
        if self.eos_token_ids is None:
            eos = getattr(tok, "eos_token_id", None)
            self.eos_token_ids = [int(eos)] if eos is not None else []
        if self.pad_token_id is None:
            pad = getattr(tok, "pad_token_id", None)
            self.pad_token_id = int(pad) if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)

    # -- protocol --------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams) -> Rollout:
        """prompt_ids/prompt_mask: (B, P) left-padded; returns B × n rows, grouped by prompt."""
        if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
            raise ValueError(
                f"prompt_ids and prompt_mask must both be (B, P), got {tuple(prompt_ids.shape)} "
                f"and {tuple(prompt_mask.shape)}"
            )
        llm = self.llm
        if self._asleep:
            if self._weights_dropped:
                raise RuntimeError("the vLLM engine slept (weights dropped): call sync_weights(actor) before generate")
            llm.wake_up()
            self._asleep = False
        prompts = [
            {"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())
        ]
        kwargs = to_vllm_sampling_kwargs(sampling, logprobs=self.return_log_probs,
                                         eos_token_ids=self.eos_token_ids or ())
        outputs = llm.generate(prompts, self._vllm.SamplingParams(**kwargs), use_tqdm=False)
        rollout = request_outputs_to_rollout(
            outputs,
            prompt_ids,
            prompt_mask,
            n=kwargs["n"],
            pad_token_id=int(self.pad_token_id if self.pad_token_id is not None else 0),
            eos_token_ids=self.eos_token_ids or (),
            with_log_probs=self.return_log_probs,
        )
        if kwargs["n"] != sampling.n:  # greedy: one completion per prompt, repeated
            rollout = repeat_rollout(rollout, sampling.n)
        if self.enable_sleep_mode:
            self.sleep()
        return rollout

    def sleep(self) -> None:
        """Free vLLM's GPU memory (``sleep_level``); a no-op without sleep mode."""
        if self.enable_sleep_mode and self._llm is not None and not self._asleep:
            self._llm.sleep(level=self.sleep_level)
            self._asleep, self._weights_dropped = True, self.sleep_level == 2

    @torch.no_grad()
    def sync_weights(self, actor: nn.Module) -> None:
        """Push the actor's current weights into the engine; reset the prefix cache.

        Collective when the actor is sharded: every rank must call it. Order
        (vLLM sleep-mode docs, "RLHF weight updates"): wake the weights only,
        load, then wake the KV cache. Waking after loading would be wrong: a
        level-1 wake-up copies the CPU backup (the old weights) back over the
        pushed ones.
        """
        llm = self.llm
        woke = self._asleep
        if woke:
            _wake_up(llm, ["weights"])
        dtype = _torch_dtype(self.dtype)
        weights = gather_weights_for_vllm(actor, dtype=dtype, device=_engine_device())
        for chunk in _chunks(weights, self.sync_chunk_bytes):
            _load_weights(llm, chunk)
        if woke:
            _wake_up(llm, ["kv_cache"])
            self._asleep, self._weights_dropped = False, False
        llm.reset_prefix_cache()


def _engine_device() -> torch.device | None:
    """Where the engine's weights live: this process's CUDA device (None without CUDA)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _torch_dtype(name: str) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    from tre_lightning.models.fsdp import parse_dtype

    return parse_dtype(name)


def _chunks(items: Iterable[tuple[str, Tensor]], max_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    chunk: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in items:
        chunk.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _wake_up(llm: Any, tags: list[str]) -> None:
    if "tags" in inspect.signature(llm.wake_up).parameters:
        llm.wake_up(tags=tags)
    elif tags == ["weights"]:  # old vLLM: one wake-up for everything
        llm.wake_up()


def _load_weights(llm: Any, weights: list[tuple[str, Tensor]]) -> None:
    """``model.load_weights(weights)`` on the in-process model, else via ``LLM.apply_model``."""
    for path in _MODEL_PATHS:
        model = _resolve(llm, path)
        if model is not None and hasattr(model, "load_weights"):
            model.load_weights(weights=weights)
            return
    apply_model: Callable[..., Any] | None = getattr(llm, "apply_model", None)
    if apply_model is None:
        raise RuntimeError(
            "cannot reach the vLLM model to load weights: neither the in-process model "
            "(llm.llm_engine.model_executor.driver_worker.worker.model_runner.model) nor LLM.apply_model exists "
            "in this vLLM version"
        )
    apply_model(lambda model: model.load_weights(weights=weights))
