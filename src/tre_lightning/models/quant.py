"""4-bit (NF4) loading of frozen models with bitsandbytes.

The reference and reward models are never trained, so they can be stored in
4-bit NF4 (about a quarter of bf16 memory). ``bnb_4bit_quant_storage`` is
set to the model's parameter dtype: the packed 4-bit data is then stored in
tensors of that dtype (two bf16 "elements" hold eight 4-bit values), so every
parameter of the model has one dtype and FSDP can flatten/shard them. The
actor and critic stay in full precision (they are trained; their optimizer
may be 8-bit, see ``tre_lightning.training.adamw8bit``).

bitsandbytes (>= 0.50) is the ``quant`` extra: ``pip install
'tre-lightning[quant]'``. It has a CPU backend, so this module works and is
tested without a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import torch
from torch import nn

from tre_lightning.models.fsdp import parse_dtype

MIN_BNB_VERSION = (0, 50)


class BitsAndBytesUnavailableError(ImportError):
    """A 4-bit / 8-bit feature was chosen but bitsandbytes (>= 0.50) is missing.

    The message names the ``quant`` extra; entry points print it and exit
    instead of showing a traceback.
    """


def require_bitsandbytes(feature: str = "4-bit / 8-bit bitsandbytes features") -> Any:
    """Import bitsandbytes or raise an ``ImportError`` saying how to install it.

    Args:
        feature: what needs it, for the message.

    Returns:
        The ``bitsandbytes`` module.

    Raises:
        BitsAndBytesUnavailableError: (an ``ImportError``) bitsandbytes is
            missing or older than 0.50.
    """
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise BitsAndBytesUnavailableError(
            f"{feature} needs bitsandbytes>=0.50, which is not installed. Install the optional extra: "
            "pip install 'tre-lightning[quant]'  (or: pip install 'bitsandbytes>=0.50')"
        ) from err
    version = tuple(int(x) for x in str(getattr(bnb, "__version__", "0.0")).split(".")[:2] if x.isdigit())
    if version and version < MIN_BNB_VERSION:
        raise BitsAndBytesUnavailableError(
            f"{feature} needs bitsandbytes>=0.50 (found {bnb.__version__}, which has no CPU backend and "
            "older quant-storage handling). Upgrade: pip install -U 'tre-lightning[quant]'"
        )
    return bnb


def nf4_config(
    dtype: str | torch.dtype = torch.bfloat16,
    *,
    double_quant: bool = True,
    compute_dtype: str | torch.dtype | None = None,
) -> Any:
    """A ``transformers.BitsAndBytesConfig`` for frozen NF4 models.

    Args:
        dtype: the parameter dtype of the rest of the model; also the quant
            storage dtype (so FSDP sees one dtype).
        double_quant: quantize the quantization constants too (saves ~0.4
            bit per parameter).
        compute_dtype: dtype of the de-quantized matmuls (default ``dtype``).
    """
    require_bitsandbytes("4-bit (NF4) model loading")
    from transformers import BitsAndBytesConfig

    dtype = parse_dtype(dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=parse_dtype(compute_dtype) if compute_dtype is not None else dtype,
        bnb_4bit_quant_storage=dtype,
    )


DEFAULT_SKIP = ("lm_head", "score", "v_head", "value_head", "classifier")


def quantize_4bit_(
    model: nn.Module,
    dtype: str | torch.dtype = torch.bfloat16,
    *,
    double_quant: bool = True,
    skip: tuple[str, ...] = DEFAULT_SKIP,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` of a loaded model by an NF4 ``bnb.nn.Linear4bit``, in place.

    The quantization itself happens when the weights reach ``device`` (on the
    GPU when the model is moved there, or on CPU with bitsandbytes' CPU
    backend). Heads named in ``skip`` (matched against the last component of
    the module name) stay in ``dtype``: they are small and precision-sensitive.
    All other parameters are cast to ``dtype``, so the model has one dtype.

    Returns:
        ``model``, frozen (``requires_grad=False``), in eval mode, on ``device``.
    """
    bnb = require_bitsandbytes("4-bit (NF4) quantization")
    dtype = parse_dtype(dtype)
    if device is None:
        device = next(iter(model.parameters())).device
    model.to(dtype)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name in skip:
                continue
            new = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=dtype,
                compress_statistics=double_quant,
                quant_type="nf4",
                quant_storage=dtype,
                device="meta",
            )
            new.weight = bnb.nn.Params4bit(
                child.weight.data.to(dtype),
                requires_grad=False,
                compress_statistics=double_quant,
                quant_type="nf4",
                quant_storage=dtype,
            )
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            parent.register_module(name, new)
    model.to(device)  # quantizes the Params4bit weights on `device`
    model.eval()
    model.requires_grad_(False)
    return model


def load_frozen_4bit(
    path: str | os.PathLike[str],
    *,
    model_class: Any = None,
    dtype: str | torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    double_quant: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Load an HF model from a local folder in 4-bit NF4, frozen, in eval mode.

    With ``accelerate`` installed this uses transformers' bitsandbytes
    quantizer (:func:`nf4_config`, quantized while loading: lowest peak
    memory). Without it, the model is loaded in ``dtype`` on CPU and
    :func:`quantize_4bit_` quantizes it while moving it to ``device``; both
    give ``Linear4bit`` layers with quant storage ``dtype``.

    Args:
        path: local model folder (``save_pretrained`` output).
        model_class: an HF auto/model class (default
            ``AutoModelForCausalLM``; ``AutoModelForSequenceClassification``
            for a reward model).
        dtype: parameter dtype and quant storage dtype (see :func:`nf4_config`).
        device: where to put it (default: the current CUDA device, else CPU).
        double_quant: see :func:`nf4_config`.
        **kwargs: passed to ``from_pretrained``.

    Returns:
        The model with ``requires_grad=False`` everywhere and ``eval()`` set.
    """
    require_bitsandbytes("4-bit (NF4) model loading")
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    torch_dtype = parse_dtype(dtype)
    if importlib.util.find_spec("accelerate") is not None:
        config = nf4_config(torch_dtype, double_quant=double_quant)
        model = model_class.from_pretrained(
            path, quantization_config=config, dtype=torch_dtype, device_map={"": str(device)}, **kwargs
        )
        model.eval()
        model.requires_grad_(False)
        return model
    model = model_class.from_pretrained(path, dtype=torch_dtype, **kwargs)
    return quantize_4bit_(model, torch_dtype, double_quant=double_quant, device=device)


def quantized_linear_count(model: nn.Module) -> int:
    """Number of bitsandbytes 4-bit linear layers in ``model`` (0 when bitsandbytes is absent)."""
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
