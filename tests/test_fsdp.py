"""FSDP2 helpers in one process: layer discovery, policies, checkpointing,
export of an unsharded model. The 2-process run is tests/test_fsdp_distributed.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from tre_lightning.models.fsdp import (
    consolidated_state_dict,
    decoder_layer_classes,
    decoder_layers,
    enable_activation_checkpointing,
    gathered_for_generation,
    is_sharded,
    mixed_precision_policy,
    parse_dtype,
    save_hf_pretrained,
    shard_model,
)
from tre_lightning.models.tiny import tiny_qwen2_config


def qwen(layers: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(tiny_qwen2_config(vocab_size=40, num_hidden_layers=layers))


class ValueModelLike(nn.Module):
    """A critic: an HF backbone plus a value head, itself not an HF model."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = qwen().model
        self.value_head = nn.Linear(64, 1)


class PlainStack(nn.Module):
    """No HF metadata: the layer stack is found as the longest homogeneous ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_decoder_layer_class_comes_from_the_model() -> None:
    model = qwen(layers=3)
    assert decoder_layer_classes(model) == {Qwen2DecoderLayer}
    assert decoder_layers(model) == list(model.model.layers)
    assert decoder_layer_classes(ValueModelLike()) == {Qwen2DecoderLayer}
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    assert {c.__name__ for c in decoder_layer_classes(llama)} == {"LlamaDecoderLayer"}


def test_fallback_to_the_layer_stack_and_empty_when_none() -> None:
    stack = PlainStack()
    assert decoder_layer_classes(stack) == {nn.Sequential}
    assert len(decoder_layers(stack)) == 3
    assert decoder_layer_classes(nn.Linear(2, 2)) == set()
    with pytest.raises(ValueError, match="no decoder layers"):
        shard_model(nn.Linear(2, 2))


def test_parse_dtype_and_mixed_precision_policy() -> None:
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int4")
    bf16 = mixed_precision_policy("bf16")
    assert bf16.param_dtype is torch.bfloat16 and bf16.reduce_dtype is torch.float32
    assert mixed_precision_policy(True).param_dtype is torch.bfloat16
    assert mixed_precision_policy("fp16").param_dtype is torch.float16
    for off in (None, False, "fp32"):
        assert mixed_precision_policy(off).param_dtype is None


def test_activation_checkpointing_hf_keeps_names_and_gradients() -> None:
    model, reference = qwen(), qwen()
    enable_activation_checkpointing(model)
    flag = getattr(model, "is_activation_checkpointing", None)
    assert flag if flag is not None else model.is_gradient_checkpointing
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    ids = torch.randint(0, 40, (2, 6))
    for m in (model, reference):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    for (n, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n


def test_activation_checkpointing_non_hf_wraps_the_layers() -> None:
    stack, reference = PlainStack(), PlainStack()
    reference.load_state_dict(stack.state_dict())
    enable_activation_checkpointing(stack)
    assert all(type(b).__name__ == "CheckpointWrapper" for b in stack.blocks)
    x = torch.randn(4, 8, requires_grad=True)
    stack(x).sum().backward()
    reference(x).sum().backward()
    assert torch.allclose(stack.blocks[0]._checkpoint_wrapped_module[0].weight.grad, reference.blocks[0][0].weight.grad)


def test_unsharded_helpers_are_plain() -> None:
    model = qwen()
    assert not is_sharded(model)
    with gathered_for_generation(model) as same:
        assert same is model
    state = consolidated_state_dict(model)
    assert set(state) == set(model.state_dict()) and all(v.device.type == "cpu" for v in state.values())


def test_save_hf_pretrained_unsharded(tmp_path) -> None:
    model = qwen()
    folder = save_hf_pretrained(model, tmp_path / "export")
    assert folder == tmp_path / "export"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    loaded = Qwen2ForCausalLM.from_pretrained(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(TypeError, match="save_pretrained"):
        save_hf_pretrained(nn.Linear(2, 2), tmp_path / "x")


def test_hydra_strategy_config_puts_every_device_on_the_data_parallel_axis(tmp_path) -> None:
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tre_lightning.models.fsdp import FSDPConfig

    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", "strategy=fsdp", "trainer.devices=4",
                                          "model.fsdp.activation_checkpointing=true"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (4, 1)
    assert instantiate(cfg.model.fsdp) == FSDPConfig(mixed_precision="bf16", activation_checkpointing=True)


def test_lightning_cli_strategy_snippet() -> None:
    import importlib
    from pathlib import Path

    import yaml

    conf = Path(__file__).parents[1] / "conf"
    trainer = yaml.safe_load((conf / "lightning" / "fsdp.yaml").read_text())["trainer"]
    module, _, name = trainer["strategy"]["class_path"].rpartition(".")
    strategy = getattr(importlib.import_module(module), name)(**trainer["strategy"]["init_args"])
    world = trainer["devices"] * trainer["num_nodes"]
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (world, 1)
