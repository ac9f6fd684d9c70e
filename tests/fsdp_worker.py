"""Worker for tests/test_fsdp_distributed.py: run under ``torchrun --nproc-per-node 2``.

CPU + gloo. Builds the tiny Qwen2 from ``init.pt`` (written by the test),
shards it with :func:`shard_model`, trains a few steps on this rank's half of
the batch, generates through the sharded model, gathers weights, exports an
HF folder, and checks 8-bit AdamW on DTensor parameters including a
distributed-checkpoint round trip. Writes results to ``--out`` for the test
to compare with a single-process reference.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    out = Path(args.out)

    from torch.distributed.device_mesh import init_device_mesh
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tre_lightning.models.fsdp import (
        consolidated_state_dict,
        gathered_for_generation,
        is_sharded,
        save_hf_pretrained,
        shard_model,
    )
    from tre_lightning.training.adamw8bit import build_optimizer
    from tre_lightning.rollout.vllm import gather_weights_for_vllm

    data = torch.load(args.data)
    config, init = Qwen2Config.from_dict(data["config"]), data["init"]
    batch = data["batch"].chunk(world)[rank]
    prompts = data["prompts"].chunk(world)[rank]
    steps, lr = data["steps"], data["lr"]
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))

    def fresh() -> nn.Module:
        model = Qwen2ForCausalLM(config)
        model.load_state_dict(init)
        return model

    results: dict[str, object] = {}

    # 1. fp32 AdamW, activation checkpointing, a few steps -----------------
    model = shard_model(fresh(), mesh, activation_checkpointing=True)
    assert is_sharded(model)
    results["param_types"] = sorted({type(p).__name__ for p in model.parameters()})
    opt = build_optimizer(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss))
    results["losses"] = losses

    # 2. generate through the sharded model (registered forward method), and
    #    with the weights gathered once for the whole call
    model.eval()
    gen_kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=6)
    with torch.no_grad():
        mask = torch.ones_like(prompts)
        gen_plain = model.generate(input_ids=prompts, attention_mask=mask, **gen_kwargs)
        with gathered_for_generation(model):
            gen_gathered = model.generate(input_ids=prompts, attention_mask=mask, **gen_kwargs)
    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, (gen_plain, gen_gathered))
    results["generate_plain"] = torch.cat([g[0] for g in gathered])  # type: ignore[index]
    results["generate_gathered"] = torch.cat([g[1] for g in gathered])  # type: ignore[index]
    results["sharded_after_generation"] = is_sharded(model) and all(
        p.to_local().shape[0] < p.shape[0] or p.shape[0] == 1 for p in model.parameters()  # type: ignore[attr-defined]
    )

    # training still works after generation (weights resharded, hooks intact)
    model.train()
    loss = lm_loss(model, batch)
    loss.backward()
    results["post_generation_loss"] = mean_over_ranks(loss)
    results["post_generation_grads"] = all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)

    # 3. consolidated weights, HF export, vLLM gathering -------------------
    state = consolidated_state_dict(model)
    results["state_keys_rank"] = (rank, len(state))
    save_hf_pretrained(model, out / "hf")
    vllm_weights = {name: t.clone() for name, t in gather_weights_for_vllm(model)}
    torch.save(vllm_weights, out / f"vllm_rank{rank}.pt")
    if rank == 0:
        torch.save(state, out / "final_state.pt")

    # 4. 8-bit AdamW on DTensor parameters + distributed checkpoint ----------
    import importlib.util

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    results["have_bnb"] = importlib.util.find_spec("bitsandbytes") is not None
    if results["have_bnb"]:
        model8 = shard_model(fresh(), mesh)
        opt8 = build_optimizer(model8.parameters(), lr=lr, weight_decay=0.01, eight_bit=True)
        results["opt8_class"] = type(opt8).__name__
        losses8 = []
        for _ in range(steps):
            loss = lm_loss(model8, batch)
            loss.backward()
            opt8.step()
            opt8.zero_grad(set_to_none=True)
            losses8.append(mean_over_ranks(loss))
        results["losses8"] = losses8
        state8 = consolidated_state_dict(model8)
        model_sd, optim_sd = get_state_dict(model8, opt8)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "ckpt8"))
        # one more step: the uninterrupted run
        loss = lm_loss(model8, batch)
        loss.backward()
        opt8.step()
        opt8.zero_grad(set_to_none=True)
        continued = consolidated_state_dict(model8)
        # resume from the checkpoint into fresh objects, take the same step
        model_r = shard_model(fresh(), mesh)
        opt_r = build_optimizer(model_r.parameters(), lr=lr, weight_decay=0.01, eight_bit=True)
        model_sd_r, optim_sd_r = get_state_dict(model_r, opt_r)
        holder = {"model": model_sd_r, "optim": optim_sd_r}
        dcp.load(holder, checkpoint_id=str(out / "ckpt8"))
        set_state_dict(model_r, opt_r, model_state_dict=holder["model"], optim_state_dict=holder["optim"])
        loss = lm_loss(model_r, batch)
        loss.backward()
        opt_r.step()
        opt_r.zero_grad(set_to_none=True)
        resumed = consolidated_state_dict(model_r)
        if rank == 0:
            torch.save({"after_steps": state8, "continued": continued, "resumed": resumed}, out / "eight_bit.pt")

    # 5. bf16 mixed precision, and an fp32 head on a bf16 backbone ----------
    model_mp = shard_model(fresh(), mesh, mixed_precision="bf16")
    loss = lm_loss(model_mp, batch)
    loss.backward()
    results["mp_loss"] = mean_over_ranks(loss)
    results["mp_param_dtypes"] = sorted({str(p.dtype) for p in model_mp.parameters()})
    results["mp_grad_finite"] = all(bool(torch.isfinite(p.grad.to_local()).all()) for p in model_mp.parameters())

    class WithHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = fresh().model.to(torch.bfloat16)
            self.value_head = nn.Linear(config.hidden_size, 1)  # float32

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            hidden = self.backbone(input_ids=ids).last_hidden_state
            return self.value_head(hidden.float()).squeeze(-1)

    critic = shard_model(WithHead(), mesh)
    value = critic(batch).pow(2).mean()
    value.backward()
    results["critic_dtypes"] = sorted({str(p.dtype) for p in critic.parameters()})
    results["critic_ok"] = bool(torch.isfinite(value))
    if results["have_bnb"]:
        # 8-bit state for every tensor, including the value head whose single row
        # leaves rank 1 an empty shard; the optimizer state dict gathers to full.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opt_c = build_optimizer(critic.parameters(), lr=lr, eight_bit=True, min_8bit_size=0)
        head_before = critic.value_head.weight.full_tensor().clone()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
        full_osd = get_optimizer_state_dict(critic, opt_c, options=StateDictOptions(full_state_dict=True))
        head_state = full_osd["state"]["value_head.weight"]
        results["critic_8bit"] = {
            "local_rows": critic.value_head.weight.to_local().shape[0],
            "moved": bool((critic.value_head.weight.full_tensor() - head_before).abs().max() > 0),
            "full_state_shape": tuple(head_state["exp_avg"].shape) if rank == 0 else None,
        }
        gathered_critic: list[object] = [None] * world
        dist.all_gather_object(gathered_critic, results["critic_8bit"])
        results["critic_8bit"] = gathered_critic

    # 6. the HF rollout engine through the sharded actor -----------------------
    from tre_lightning.rollout.base import SamplingParams
    from tre_lightning.rollout.hf import HFGenerateEngine

    engine = HFGenerateEngine(eos_token_ids=[1], pad_token_id=0)
    engine.sync_weights(model)
    rollout = engine.generate(prompts, torch.ones_like(prompts), SamplingParams(n=2, greedy=True, max_new_tokens=5))
    gathered_rollouts: list[object] = [None] * world
    dist.all_gather_object(gathered_rollouts, (rollout.response_ids, rollout.response_mask))
    results["engine_response_ids"] = torch.cat([r[0] for r in gathered_rollouts])  # type: ignore[index]
    results["engine_response_mask"] = torch.cat([r[1] for r in gathered_rollouts])  # type: ignore[index]

    if rank == 0:
        torch.save(results, out / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
