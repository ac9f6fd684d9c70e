"""4-bit NF4 frozen models on CPU (bitsandbytes >= 0.50 CPU backend)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from transformers import Qwen2ForCausalLM

from tre_lightning.models.quant import (
    load_frozen_4bit,
    nf4_config,
    quantize_4bit_,
    quantized_linear_count,
    require_bitsandbytes,
)
from tre_lightning.models.tiny import tiny_qwen2_config

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="needs bitsandbytes>=0.50 (the quant extra)")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Qwen2ForCausalLM]:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(vocab_size=64, hidden_size=128, intermediate_size=256))
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    return str(path), model.eval()


def _check_quantized(q: torch.nn.Module, reference: torch.nn.Module, dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    assert quantized_linear_count(q) == 2 * LINEARS_PER_LAYER
    assert not isinstance(q.lm_head, bnb.nn.Linear4bit)  # heads stay un-quantized
    for module in q.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            assert weight.quant_type == "nf4" and weight.quant_state is not None
            assert weight.dtype == dtype  # quant storage = parameter dtype
    assert {p.dtype for p in q.parameters()} == {dtype}  # one dtype: FSDP-flattenable
    assert not any(p.requires_grad for p in q.parameters()) and not q.training
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        got, want = q(ids).logits.float(), reference(ids).logits
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.97


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_frozen_4bit_on_cpu(saved: tuple, dtype: torch.dtype) -> None:
    path, reference = saved
    q = load_frozen_4bit(path, dtype=dtype, device="cpu")
    _check_quantized(q, reference, dtype)


@needs_bnb
def test_quantize_in_place(saved: tuple) -> None:
    path, reference = saved
    model = Qwen2ForCausalLM.from_pretrained(path)
    q = quantize_4bit_(model, "bf16", double_quant=False)
    _check_quantized(q, reference, torch.bfloat16)


@needs_bnb
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="transformers' quantizer needs accelerate")
def test_transformers_quantizer_path(saved: tuple) -> None:  # pragma: no cover - needs accelerate
    path, reference = saved
    q = load_frozen_4bit(path, dtype=torch.bfloat16, device="cpu")
    _check_quantized(q, reference, torch.bfloat16)


@needs_bnb
def test_nf4_config_storage_equals_parameter_dtype() -> None:
    cfg = nf4_config("bf16")
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_quant_storage == torch.bfloat16 and cfg.bnb_4bit_compute_dtype == torch.bfloat16
    cfg16 = nf4_config(torch.float16, double_quant=False, compute_dtype="float32")
    assert cfg16.bnb_4bit_quant_storage == torch.float16 and cfg16.bnb_4bit_compute_dtype == torch.float32


@needs_bnb
def test_fsdp2_refuses_4bit_models_clearly(saved: tuple) -> None:
    from tre_lightning.models.fsdp import shard_model

    q = load_frozen_4bit(saved[0], device="cpu")
    with pytest.raises(ValueError, match="4-bit layers, which FSDP2 cannot shard"):
        shard_model(q)


def test_missing_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch, saved: tuple) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install 'tre-lightning\[quant\]'"):
        require_bitsandbytes()
    with pytest.raises(ImportError, match="4-bit"):
        load_frozen_4bit(saved[0])
    assert quantized_linear_count(torch.nn.Linear(2, 2)) == 0
