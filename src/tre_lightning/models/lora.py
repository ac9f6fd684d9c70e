"""LoRA adapters through ``peft``: the settings, applying them, the base model as the reference.

:class:`LoraSettings` is the typed, validated configuration that
``ActorCritic(lora=...)`` takes. :func:`apply_lora` wraps a causal LM in a
``peft`` model whose base weights are frozen. :class:`AdaptersDisabled` is the
reference model of a LoRA run: the *same* module with its adapters switched
off for the call (``peft``'s ``disable_adapter``), so no second copy of the
weights exists. :func:`merged_copy` gives the ordinary HF model that export
saves (a copy with the adapters merged in; the training model keeps them).

``peft`` is the ``lora`` extra: ``pip install 'tre-lightning[lora]'``.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from tre_lightning.checks import ArgumentError, boolean, integer, one_of, real

__all__ = ["AdaptersDisabled", "LoraSettings", "LoraUnavailableError", "apply_lora", "is_peft_model", "merged_copy",
           "keep_4bit_out_of_state_dict"]

BiasName = Literal["none", "all", "lora_only"]
_BIASES = ("none", "all", "lora_only")


class LoraUnavailableError(ImportError):
    """LoRA was configured but ``peft`` is not installed; the message names the ``lora`` extra."""


def require_peft() -> Any:
    """Import ``peft`` or raise :class:`LoraUnavailableError` saying how to install it."""
    try:
        return importlib.import_module("peft")
    except ImportError as err:
        raise LoraUnavailableError(
            "LoRA adapters need peft, which is not installed. Install the optional extra: "
            "pip install 'tre-lightning[lora]'  (or: pip install peft)"
        ) from err


class LoraSettings:
    """LoRA adapters on the actor (and optionally the critic's backbone), built with ``peft``.

    The base weights are frozen; only the adapters (and ``bias`` terms when
    asked) are trained. The reference model of a KL in the reward is the
    actor with its adapters disabled (no second copy of the weights).

    Args:
        rank: LoRA rank ``r`` (the adapters' inner dimension), an int >= 1.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / rank``, > 0.
        dropout: dropout on the adapters' input, in [0, 1).
        target_modules: names of the linear layers that get adapters (matched
            against the last part of each module name, e.g. ``[q_proj, v_proj]``),
            or ``"all-linear"`` (every linear layer except the LM head).
        bias: which biases are trained: ``none``, ``all`` or ``lora_only``.
        critic: also put adapters (same settings) on the critic's backbone; its
            value head is trained in full. Ignored with ``share_backbone``.
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | Sequence[str] = "all-linear",
        bias: BiasName = "none",
        critic: bool = False,
    ) -> None:
        self.rank = integer("rank", rank, 1)
        self.alpha = real("alpha", alpha, 0.0, low_open=True)
        self.dropout = real("dropout", dropout, 0.0, 1.0, high_open=True)
        self.target_modules = _targets(target_modules)
        self.bias = one_of("bias", bias, _BIASES)
        self.critic = boolean("critic", critic)
        require_peft()  # a missing extra is refused when the config is built, not after the data is read

    def peft_config(self) -> Any:
        """The ``peft.LoraConfig`` for a causal LM."""
        peft = require_peft()
        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules),
            bias=self.bias,
            task_type="CAUSAL_LM",
        )

    def __repr__(self) -> str:
        return (f"LoraSettings(rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, "
                f"target_modules={self.target_modules!r}, bias={self.bias!r}, critic={self.critic})")


def _targets(value: object) -> str | tuple[str, ...]:
    allowed = "'all-linear' or a non-empty list of module names (e.g. [q_proj, v_proj])"
    if isinstance(value, str):
        if value != "all-linear":
            raise ArgumentError("target_modules", allowed, value)
        return value
    if not isinstance(value, Sequence) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ArgumentError("target_modules", allowed, value)
    return tuple(value)


def apply_lora(model: nn.Module, settings: LoraSettings, key: str = "lora") -> nn.Module:
    """``peft.get_peft_model(model, settings.peft_config())``: adapters on, base weights frozen.

    A ``target_modules`` list that names no layer of ``model`` is refused
    (``<key>.target_modules``) instead of training nothing. A 4-bit base
    (bitsandbytes ``Linear4bit`` layers) gets adapters on its 4-bit layers.
    """
    peft = require_peft()
    try:
        wrapped = peft.get_peft_model(model, settings.peft_config())
    except ValueError as err:
        if "target modules" in str(err).lower() or "target_modules" in str(err):
            raise ArgumentError(f"{key}.target_modules", "names of linear layers of the model (e.g. q_proj, v_proj) "
                                "or 'all-linear'", list(settings.target_modules)) from None
        raise
    _keep_4bit_trainable_layout(wrapped)
    return wrapped


def _keep_4bit_trainable_layout(model: nn.Module) -> None:
    """Stop bitsandbytes (0.50, CPU backend) from repacking a 4-bit layer for inference on its first
    eval-mode forward (a rollout): the repacked layer's later training forwards take a kernel without
    autograd, so the gradient to the layers below (and their adapters) would be cut."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def keep_4bit_out_of_state_dict(root: nn.Module) -> None:
    """Leave the frozen 4-bit weights of ``root`` (a QLoRA base) out of its state dict, as the 4-bit
    reference is: they are rebuilt from their source (quantization is deterministic), checkpoints hold
    the adapters and the non-quantized weights, and loading one does not ask for the 4-bit tensors."""
    names = tuple(n for n, p in root.named_parameters() if type(p).__name__ == "Params4bit")
    if not names:
        return

    def drop(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in list(state):
            local = key[len(prefix):] if key.startswith(prefix) else key
            if any(local == n or local.startswith(n + ".") for n in names):
                del state[key]

    def allow_missing(module: nn.Module, incompatible: Any) -> None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                        if not any(k == n or k.endswith("." + n) for n in names)]

    root._register_state_dict_hook(drop)
    root.register_load_state_dict_post_hook(allow_missing)


def is_peft_model(model: nn.Module | None) -> bool:
    """Whether ``model`` is a ``peft`` model (has adapters that can be disabled)."""
    return model is not None and callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


class AdaptersDisabled(nn.Module):
    """The base model of a ``peft`` model: calls it with its adapters disabled.

    Holds the peft model outside its module tree (no parameters of its own,
    nothing in a state dict, not moved or sharded twice); ``forward`` runs
    the peft model's ``forward`` (so FSDP2's hooks on it fire) inside
    ``disable_adapter()``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not is_peft_model(model):
            raise TypeError(f"AdaptersDisabled needs a peft model, got {type(model).__name__}")
        self.__dict__["_peft"] = model  # not a submodule

    @property
    def config(self) -> Any:
        return self._peft.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._peft.disable_adapter():
            return self._peft(*args, **kwargs)


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of a peft model with its adapters merged into the weights (an ordinary HF model).

    The original keeps its adapters (it goes on training). A 4-bit base
    (QLoRA) is de-quantized first: every NF4 layer becomes an ``nn.Linear`` in
    its compute dtype holding de-quantized base + LoRA delta, which is the
    function the adapted model computes (``peft``'s own merge would
    re-quantize the sum to NF4: a 4-bit folder with the NF4 error on the update).
    """
    from tre_lightning.models.fsdp import has_4bit_layers

    if not has_4bit_layers(model):
        return copy.deepcopy(model).merge_and_unload()
    return _dequantized_merge(copy.deepcopy(model))


def _dequantized_merge(model: nn.Module) -> nn.Module:
    """Replace each 4-bit layer of a peft model (a copy) by a dense ``nn.Linear`` (+ its LoRA delta)."""
    from tre_lightning.models.quant import require_bitsandbytes

    bnb = require_bitsandbytes("merging LoRA into a 4-bit base")
    base = model.get_base_model()
    for parent in list(base.modules()):
        for name, child in list(parent.named_children()):
            layer = child.get_base_layer() if hasattr(child, "lora_A") else child
            if not isinstance(layer, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            if layer is not child:
                for adapter in child.active_adapters:
                    weight = weight + child.get_delta_weight(adapter).to(weight.dtype)
            dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device=weight.device, dtype=weight.dtype)
            dense.weight.data.copy_(weight)
            if layer.bias is not None:
                dense.bias.data.copy_(layer.bias.data)
            parent.register_module(name, dense)
    # an ordinary model now: no quantization config in config.json, no quantizer on save
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(base, attr, None) is not None:
            setattr(base, attr, None)
    if getattr(base, "is_quantized", False):
        base.is_quantized = False
    return base
