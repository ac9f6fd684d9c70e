"""FSDP2 with 2 CPU processes (gloo) against a single-process reference.

One ``torchrun --nproc-per-node 2`` run of ``tests/fsdp_worker.py`` (about
10-20 s on 2 cores) does everything: per-decoder-layer sharding with
activation checkpointing, 3 AdamW steps on each rank's half of the batch,
greedy ``generate`` through the sharded model, consolidated export (state
dict and an HF folder), vLLM weight gathering, 8-bit AdamW on ``DTensor``
parameters with a distributed-checkpoint save/resume, bf16 mixed precision,
and a bf16 backbone with an fp32 head. This file computes the same things in
one process and compares.

Tolerances (float32, CPU, lr 1e-2, 3 steps): losses within 1e-5 absolute;
weights within 1e-4 absolute, 1 % of one step (the only difference is the
order of the gradient reduction; Adam divides by sqrt(v), so rounding in a
near-zero gradient element shows at ~1e-3 of a step; measured 2.3e-5);
greedy tokens equal; 8-bit AdamW sharded vs unsharded within 1e-4 (same
quantization blocks; measured 3e-5); resumed vs uninterrupted 8-bit run
within 1e-6 (the checkpoint stores de-quantized moments, re-quantized exactly).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Qwen2ForCausalLM

from tre_lightning.models.tiny import tiny_qwen2_config
from tre_lightning.training.adamw8bit import build_optimizer
from tre_lightning.rollout.vllm import to_hf_checkpoint_names

WORKER = Path(__file__).with_name("fsdp_worker.py")
STEPS, LR = 3, 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fsdp2")
    torch.manual_seed(0)
    config = tiny_qwen2_config(vocab_size=96)
    init = Qwen2ForCausalLM(config).state_dict()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(1, 96, (4, 12), generator=gen)
    prompts = torch.randint(1, 96, (4, 5), generator=gen)
    data = {"config": config.to_dict(), "init": init, "batch": batch, "prompts": prompts, "steps": STEPS, "lr": LR}
    torch.save(data, out / "data.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(WORKER), "--data", str(out / "data.pt"), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    results = torch.load(out / "results.pt", weights_only=False)
    return {"out": out, "config": config, "init": init, "batch": batch, "prompts": prompts, **results}


def _reference(run: dict, eight_bit: bool) -> tuple[nn.Module, list[float], torch.optim.Optimizer]:
    model = Qwen2ForCausalLM(run["config"])
    model.load_state_dict(run["init"])
    opt = build_optimizer(model.parameters(), lr=LR, weight_decay=0.01, eight_bit=eight_bit)
    losses = []
    for _ in range(STEPS):
        loss = _lm_loss(model, run["batch"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses, opt


@pytest.fixture(scope="module")
def reference(run: dict) -> tuple[nn.Module, list[float]]:
    model, losses, _ = _reference(run, eight_bit=False)
    return model, losses


def _assert_state_close(actual: dict, expected: dict, atol: float) -> None:
    assert set(actual) == set(expected)
    worst = max((actual[k].float() - expected[k].float()).abs().max().item() for k in expected)
    assert worst <= atol, f"max abs difference {worst:.3g} > {atol}"


def test_parameters_are_sharded_dtensors(run: dict) -> None:
    assert run["param_types"] == ["DTensor"]


def test_losses_match_single_process(run: dict, reference: tuple) -> None:
    _, ref_losses = reference
    assert run["losses"] == pytest.approx(ref_losses, abs=1e-5)


def test_consolidated_weights_match_single_process(run: dict, reference: tuple) -> None:
    model, _ = reference
    state = torch.load(run["out"] / "final_state.pt")
    assert run["state_keys_rank"] == (0, len(model.state_dict()))
    _assert_state_close(state, {k: v.detach() for k, v in model.state_dict().items()}, atol=1e-4)


def test_generate_through_sharded_model_matches(run: dict, reference: tuple) -> None:
    model, _ = reference
    model.eval()
    with torch.no_grad():
        expected = model.generate(
            input_ids=run["prompts"], attention_mask=torch.ones_like(run["prompts"]), max_new_tokens=6,
            min_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    assert torch.equal(run["generate_plain"], expected)
    assert torch.equal(run["generate_gathered"], expected)
    assert run["sharded_after_generation"]
    # and training works afterwards
    model.train()
    assert run["post_generation_grads"]
    assert run["post_generation_loss"] == pytest.approx(_lm_loss(model, run["batch"]).item(), abs=1e-5)


def test_exported_hf_folder_reloads_to_the_same_model(run: dict, reference: tuple) -> None:
    import json

    model, _ = reference
    folder = run["out"] / "hf"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    loaded = Qwen2ForCausalLM.from_pretrained(folder)
    _assert_state_close(loaded.state_dict(), model.state_dict(), atol=1e-4)


def test_vllm_gathering_gives_full_weights_with_checkpoint_names_on_every_rank(run: dict, reference: tuple) -> None:
    model, _ = reference
    expected = {n: t.detach() for n, t in to_hf_checkpoint_names(model.named_parameters())}
    # tied lm_head appears once, as the embedding (vLLM re-ties it)
    assert set(expected) == set(model.state_dict()) - {"lm_head.weight"}
    for rank in (0, 1):
        got = torch.load(run["out"] / f"vllm_rank{rank}.pt")
        _assert_state_close(got, expected, atol=1e-4)


def _need_bnb(run: dict) -> None:
    if not run["have_bnb"]:
        pytest.skip("8-bit AdamW needs bitsandbytes (the quant extra)")


def test_eight_bit_adamw_on_dtensors_matches_unsharded_and_resumes(run: dict) -> None:
    _need_bnb(run)
    model8, losses8, opt8 = _reference(run, eight_bit=True)
    assert run["opt8_class"] == "AdamW8bitSharded"
    assert run["losses8"] == pytest.approx(losses8, abs=1e-4)
    saved = torch.load(run["out"] / "eight_bit.pt")
    _assert_state_close(saved["after_steps"], model8.state_dict(), atol=1e-4)
    _assert_state_close(saved["resumed"], saved["continued"], atol=1e-6)
    # the resumed step really moved the weights
    moved = max((saved["resumed"][k] - saved["after_steps"][k]).abs().max().item() for k in saved["resumed"])
    assert moved > 1e-4


def test_bf16_mixed_precision_and_mixed_dtype_modules(run: dict, reference: tuple) -> None:
    _, ref_losses = reference
    assert run["mp_param_dtypes"] == ["torch.float32"]  # fp32 sharded master weights
    assert run["mp_grad_finite"]
    assert run["mp_loss"] == pytest.approx(ref_losses[0], rel=2e-2)
    # an fp32 value head on a bf16 backbone: sharded as its own FSDP group
    assert run["critic_dtypes"] == ["torch.bfloat16", "torch.float32"]
    assert run["critic_ok"]


def test_eight_bit_with_an_empty_local_shard(run: dict) -> None:
    _need_bnb(run)
    rank0, rank1 = run["critic_8bit"]
    assert (rank0["local_rows"], rank1["local_rows"]) == (1, 0)  # the (1, 64) value head
    assert rank0["moved"] and rank1["moved"]
    assert rank0["full_state_shape"] == (1, 64)


def test_hf_engine_rollout_through_the_sharded_actor(run: dict, reference: tuple) -> None:
    from tre_lightning.rollout.base import SamplingParams
    from tre_lightning.rollout.hf import HFGenerateEngine

    model, _ = reference
    engine = HFGenerateEngine(eos_token_ids=[1], pad_token_id=0)
    engine.sync_weights(model)
    prompts = run["prompts"]
    expected = engine.generate(prompts, torch.ones_like(prompts), SamplingParams(n=2, greedy=True, max_new_tokens=5))
    assert torch.equal(run["engine_response_ids"], expected.response_ids)
    assert torch.equal(run["engine_response_mask"], expected.response_mask)
