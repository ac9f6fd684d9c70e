"""FSDP2 helpers: shard HF models per decoder layer, generate through the
sharded model, and gather full weights for export.

These are plain functions over ``nn.Module``; Lightning's
``ModelParallelStrategy`` gives ``LightningModule.configure_model`` a device
mesh (``self.device_mesh["data_parallel"]``) and the module calls
:func:`shard_model` on the actor and the critic there. They run on CPU (gloo)
as well as on GPUs (nccl); the tests use 2 CPU processes.

Facts this file relies on (torch >= 2.6, the ``torch.distributed.fsdp``
public API):

- ``fully_shard`` keeps parameter names (it swaps the module's class in
  place, ``Qwen2DecoderLayer`` -> ``FSDPQwen2DecoderLayer``) and turns every
  parameter into a ``DTensor`` sharded on dim 0 over the mesh.
- Only ``forward`` triggers the all-gather hooks; other entry points that the
  root module runs (HF ``generate``) are registered with
  ``register_fsdp_forward_method``.
- Gathering full tensors (``DTensor.full_tensor``, ``get_model_state_dict``
  with ``full_state_dict=True``) is a collective: every rank must call it, in
  the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

_RESHARD_ATTR = "_tre_reshard_after_forward"

MixedPrecision = Literal["bf16", "fp16", "fp32"] | bool | None

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


@dataclasses.dataclass
class FSDPConfig:
    """How ``PPOModule`` shards its models under ``ModelParallelStrategy`` (FSDP2).

    Used only when the module runs under Lightning's ``ModelParallelStrategy``
    (which gives it a device mesh); ignored otherwise. Actor, critic (or the
    shared value head) and an unquantized reference model are sharded with
    :func:`shard_model` over the data-parallel mesh, one ``fully_shard`` per
    decoder layer; a 4-bit reference model stays whole on every rank.

    Attributes:
        mixed_precision: ``"bf16"``: forward/backward in bf16 on all-gathered
            copies, fp32 sharded weights and fp32 gradient reduction (load the
            models in float32); ``"none"``: compute in the weights' own dtype.
        activation_checkpointing: recompute each decoder layer's activations
            in backward (non-reentrant). ``PPOModule(gradient_checkpointing=True)``
            turns it on as well: under FSDP2 that flag means this, not HF's
            reentrant ``gradient_checkpointing_enable()``.
        reshard_after_forward: free each layer's gathered weights after its
            forward (ZeRO-3; less memory, one more all-gather in backward).
        cpu_offload: keep sharded parameters, gradients and optimizer state in
            CPU memory (FSDP2 ``CPUOffloadPolicy``; GPU runs only, slow).
        gather_for_generation: keep the actor's full weights gathered during
            each HF-engine rollout / validation generation
            (:func:`gathered_for_generation`: one all-gather per call instead
            of one per layer per decoded token; costs one unsharded copy).
    """

    mixed_precision: Literal["none", "bf16"] = "none"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    gather_for_generation: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("none", "bf16"):
            raise ValueError(f"FSDPConfig.mixed_precision must be 'none' or 'bf16', got {self.mixed_precision!r}")
        for name in ("activation_checkpointing", "reshard_after_forward", "cpu_offload", "gather_for_generation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FSDPConfig.{name} must be a bool, got {getattr(self, name)!r}")

    def shard_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`shard_model` for a trained model."""
        return {
            "mixed_precision": None if self.mixed_precision == "none" else self.mixed_precision,
            "reshard_after_forward": self.reshard_after_forward,
            "activation_checkpointing": self.activation_checkpointing,
            "cpu_offload": self.cpu_offload,
        }


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``"fp16"``/``"float32"``… or a ``torch.dtype`` -> ``torch.dtype``."""
    if isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


# --------------------------------------------------------------------------- #
# finding the decoder layers
# --------------------------------------------------------------------------- #


def _no_split_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        value = getattr(module, "_no_split_modules", None)
        if value:
            names.update(str(v) for v in value)
    return names


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The transformer-block classes of an HF model (or of a module holding one).

    Read from ``_no_split_modules`` of every HF ``PreTrainedModel`` inside
    ``model`` (``{"Qwen2DecoderLayer"}`` for Qwen2) and matched against the
    classes actually present; when no HF model declares them, falls back to
    the element class of the longest homogeneous ``nn.ModuleList`` (the layer
    stack). Never hard-coded, so a critic with a value head around a Llama
    backbone works the same way.

    Returns:
        The set of classes (possibly empty for a model without repeated blocks).
    """
    names = _no_split_names(model)
    found: set[type[nn.Module]] = set()
    if names:
        for module in model.modules():
            cls = _unwrapped_class(module)
            if cls.__name__ in names:
                found.add(cls)
    if found:
        return found
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {_unwrapped_class(m) for m in module}
            if len(kinds) == 1:
                best = list(module)
    return {_unwrapped_class(best[0])} if best else set()


def decoder_layers(model: nn.Module, classes: Iterable[type[nn.Module]] | None = None) -> list[nn.Module]:
    """Instances of the decoder-layer classes, outermost first, in module order.

    Nested matches (a block inside a block) are not returned twice: only the
    outermost instance of a match is kept.
    """
    classes = tuple(classes if classes is not None else decoder_layer_classes(model))
    if not classes:
        return []
    layers: list[nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        if id(module) in seen:
            continue
        if isinstance(module, classes):
            layers.append(module)
            seen.update(id(m) for m in module.modules())
    return layers


def _unwrapped_class(module: nn.Module) -> type[nn.Module]:
    """The class a module had before ``fully_shard`` swapped it (``FSDPQwen2…`` -> ``Qwen2…``)."""
    cls = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return cls
    if issubclass(cls, FSDPModule):
        for base in cls.__mro__[1:]:
            if base is not FSDPModule and issubclass(base, nn.Module) and not issubclass(base, FSDPModule):
                return base
    return cls


# --------------------------------------------------------------------------- #
# sharding
# --------------------------------------------------------------------------- #


def mixed_precision_policy(mixed_precision: MixedPrecision) -> Any:
    """FSDP2 ``MixedPrecisionPolicy`` for ``"bf16"``/``"fp16"``/``True`` (= bf16).

    Parameters are kept sharded in their own dtype (fp32 master weights for the
    optimizer); the all-gathered copies used in forward/backward are cast to
    the low precision, and gradients are reduced in fp32. ``None``/``False``/
    ``"fp32"`` -> no policy (full precision).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision in (None, False, "fp32", "float32", "32"):
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if mixed_precision is True else parse_dtype(str(mixed_precision))
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def enable_activation_checkpointing(model: nn.Module, classes: Iterable[type[nn.Module]] | None = None) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant).

    Uses HF's own ``gradient_checkpointing_enable`` on every HF model inside
    ``model`` (parameter names stay unchanged); for non-HF layer stacks, wraps
    each decoder layer with ``torch.distributed``'s ``checkpoint_wrapper``
    (names gain ``_checkpoint_wrapped_module.``, which the export/vLLM name
    mapping strips). Call before :func:`shard_model`'s ``fully_shard``.
    """
    hf_models = [m for m in model.modules() if getattr(m, "supports_gradient_checkpointing", False)]
    if hf_models:
        for m in hf_models:
            # HF toggles the flag on its GradientCheckpointingLayer blocks
            # (renamed activation_checkpointing_enable in transformers 5.x).
            if hasattr(m, "activation_checkpointing_enable"):
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    targets = set(id(m) for m in decoder_layers(model, classes))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                parent.register_module(name, checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT))


def _default_mesh(model: nn.Module) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "shard_model needs an initialized process group (torchrun / Lightning ModelParallelStrategy) "
            "or an explicit device_mesh"
        )
    device = next(iter(model.parameters()), torch.empty(0)).device
    device_type = device.type if device.type != "meta" else ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("data_parallel",))


def shard_model(
    model: nn.Module,
    device_mesh: Any | None = None,
    *,
    mixed_precision: MixedPrecision = None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    layer_classes: Iterable[type[nn.Module]] | None = None,
    forward_methods: Iterable[str] = ("generate",),
) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each decoder layer, then to the root.

    Args:
        model: an HF model (or a module containing one: a critic with a value
            head); modified in place.
        device_mesh: 1-D data-parallel mesh, e.g. Lightning's
            ``self.device_mesh["data_parallel"]``; default: all ranks of the
            initialized process group.
        mixed_precision: ``"bf16"``/``"fp16"``/``True`` (bf16) for
            low-precision compute with fp32 sharded weights and fp32 gradient
            reduction; ``None``/``False`` keeps full precision.
        reshard_after_forward: free the gathered weights after each layer's
            forward (ZeRO-3; less memory, one more all-gather in backward).
            The last layer is never resharded (the backward needs it at once).
        activation_checkpointing: see :func:`enable_activation_checkpointing`.
        cpu_offload: keep sharded parameters/gradients/optimizer state in
            CPU memory (FSDP2 ``CPUOffloadPolicy``; GPU runs only).
        layer_classes: override the auto-detected decoder-layer classes.
        forward_methods: extra root methods that run the model (HF
            ``generate``) to register with ``register_fsdp_forward_method``.

    Returns:
        ``model`` (now an ``FSDPModule``).

    Raises:
        ValueError: when no decoder layers are found.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    if has_4bit_layers(model):
        raise ValueError(
            f"{_unwrapped_class(model).__name__} has "
            "bitsandbytes 4-bit layers, which FSDP2 cannot shard (fully_shard drops the Params4bit quant_state; "
            "bitsandbytes 0.50 + torch 2.13). Keep 4-bit frozen models (reference, reward) unsharded: each rank "
            "holds a full 4-bit copy (see docs/scaling.md)"
        )
    classes = set(layer_classes) if layer_classes is not None else decoder_layer_classes(model)
    if not classes:
        raise ValueError(
            f"no decoder layers found in {type(model).__name__}: it has no `_no_split_modules` and no "
            "homogeneous nn.ModuleList; pass layer_classes=... explicitly"
        )
    if activation_checkpointing:
        enable_activation_checkpointing(model, classes)
    mesh = device_mesh if device_mesh is not None else _default_mesh(model)
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": mixed_precision_policy(mixed_precision),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    # checkpoint_wrapper puts the layer one level down: shard the wrapper.
    layers = decoder_layers(model, classes)
    wrapped = _checkpoint_wrappers_of(model, layers)
    for i, layer in enumerate(layers):
        target = wrapped.get(id(layer), layer)
        layer_reshard = reshard_after_forward and i < len(layers) - 1
        fully_shard(target, reshard_after_forward=layer_reshard, **kwargs)
        setattr(target, _RESHARD_ATTR, layer_reshard)
    # FSDP2 needs one dtype per parameter group: modules left for the root
    # whose trainable weights differ from the root's dtype (an fp32 value head
    # on a bf16 backbone) get their own group.
    for module in _minority_dtype_modules(model):
        fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    setattr(model, _RESHARD_ATTR, reshard_after_forward)
    for name in forward_methods:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def _minority_dtype_modules(model: nn.Module) -> list[nn.Module]:
    """Outermost submodules (not already sharded) whose trainable weights all
    have one dtype different from the dominant dtype of the root's weights."""
    from torch.distributed.fsdp import FSDPModule

    def owned(module: nn.Module) -> list[nn.Parameter]:
        out, stack = [], [module]
        while stack:
            m = stack.pop()
            out.extend(p for p in m.parameters(recurse=False) if p.requires_grad)
            stack.extend(c for c in m.children() if not isinstance(c, FSDPModule))
        return out

    counts: dict[torch.dtype, int] = {}
    for p in owned(model):
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if len(counts) <= 1:
        return []
    major = max(counts, key=lambda d: counts[d])
    picked: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, FSDPModule):
                continue
            dtypes = {p.dtype for p in owned(child)}
            if len(dtypes) == 1 and major not in dtypes:
                picked.append(child)
            elif len(dtypes) > 1:
                visit(child)

    visit(model)
    return picked


def _checkpoint_wrappers_of(model: nn.Module, layers: list[nn.Module]) -> dict[int, nn.Module]:
    ids = {id(layer) for layer in layers}
    out: dict[int, nn.Module] = {}
    for module in model.modules():
        inner = getattr(module, "_checkpoint_wrapped_module", None)
        if inner is not None and id(inner) in ids:
            out[id(inner)] = module
    return out


def has_4bit_layers(model: nn.Module) -> bool:
    """True when ``model`` holds bitsandbytes 4-bit weights (``Params4bit``)."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a ``DTensor`` (FSDP2/TP)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module) -> Iterator[nn.Module]:
    """Keep the full weights gathered while the block runs (fast HF ``generate``).

    Without this, a sharded model all-gathers every layer at every decoding
    step. Inside the block each rank holds a full copy (memory of the
    unsharded model in the compute dtype); on exit the weights are resharded
    and ``reshard_after_forward`` is restored. A no-op for unsharded models.
    Every rank must enter it (it all-gathers).
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp_modules:
        yield model
        return
    previous = [_reshard_after_forward(m) for m in fsdp_modules]
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
    for m in fsdp_modules:
        m.unshard()
    try:
        yield model
    finally:
        for m, prev in zip(fsdp_modules, previous):
            m.reshard()
            m.set_reshard_after_forward(prev, recurse=False)


def _reshard_after_forward(module: nn.Module) -> bool:
    return bool(getattr(module, _RESHARD_ATTR, True))


# --------------------------------------------------------------------------- #
# gathering full weights
# --------------------------------------------------------------------------- #


def full_tensor(tensor: Tensor) -> Tensor:
    """The full (unsharded) value of a possibly-``DTensor`` tensor, detached.

    Collective for a ``DTensor``: every rank of its mesh must call it.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor().detach()
    return tensor.detach()


def iter_full_parameters(
    model: nn.Module, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, full tensor)`` for every parameter, one at a time.

    Each yielded tensor is gathered just before it is yielded, so peak extra
    memory is one full parameter. Names are exactly ``model.named_parameters()``
    (wrapper prefixes included; see ``rollout.vllm.to_hf_checkpoint_names``).
    Collective for sharded models: iterate to the end on every rank.
    """
    for name, param in model.named_parameters():
        value = full_tensor(param)
        if dtype is not None or device is not None:
            value = value.to(device=device, dtype=dtype)
        yield name, value


def consolidated_state_dict(model: nn.Module, *, rank0_only: bool = True) -> dict[str, Tensor]:
    """The full model state dict on CPU (parameters and persistent buffers).

    For a sharded model every rank must call it; with ``rank0_only`` the other
    ranks get ``{}`` (no full copy in their memory). For an unsharded model it
    is ``model.state_dict()`` detached on CPU, on every rank. Keys are the
    model's own state-dict keys (checkpoint-wrapper prefixes removed).
    """
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if rank0_only:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return {k: v.detach().cpu() for k, v in state.items()}


def save_hf_pretrained(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    state_dict: dict[str, Tensor] | None = None,
    tokenizer: Any | None = None,
    safe_serialization: bool = True,
) -> Path | None:
    """Write a consolidated HF model folder (``from_pretrained``/vLLM loadable).

    Works for sharded (FSDP2) and plain HF ``PreTrainedModel``s. For a sharded
    model every rank must call it (the weights are gathered); only rank 0
    writes. ``config.json`` names the original architecture
    (``Qwen2ForCausalLM``), not FSDP's dynamic ``FSDPQwen2ForCausalLM``.

    Args:
        model: the (possibly sharded) HF model.
        path: output folder (created).
        state_dict: a full state dict already gathered with
            :func:`consolidated_state_dict` (gathered here when ``None``).
        tokenizer: saved next to the weights when given.

    Returns:
        The folder on the rank that wrote it, ``None`` on the others.
    """
    if state_dict is None:
        state_dict = consolidated_state_dict(model)
    if _rank() != 0:
        return None
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not an HF PreTrainedModel (no save_pretrained)")
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=safe_serialization)
    _fix_architectures(out, _unwrapped_class(model).__name__)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _fix_architectures(folder: Path, arch: str) -> None:
    config_file = folder / "config.json"
    if not config_file.exists():
        return
    config = json.loads(config_file.read_text())
    if config.get("architectures") != [arch]:
        config["architectures"] = [arch]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
