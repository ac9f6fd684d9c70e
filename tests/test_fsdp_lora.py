"""LoRA under FSDP2 (ModelParallelStrategy, 2 CPU processes, gloo): adapters and base weights are
sharded, the reference is the adapters-disabled base, the merged export is W + (alpha / r) B A.

The worker is tests/fsdp_lora_worker.py (a tiny Qwen2, LoRA rank 4 on actor and critic, 2 PPO
iterations with a KL). The merged export is checked against a merge computed here from the
consolidated peft weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft")

WORKER = Path(__file__).with_name("fsdp_lora_worker.py")
SCALING = 16.0 / 4  # LoraSettings(rank=4): alpha 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp_lora")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(WORKER), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(WORKER.parent))
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return {"out": out, "ranks": ranks, "state": torch.load(out / "actor_state.pt")}


@pytest.mark.slow
def test_adapters_and_base_are_sharded(run) -> None:
    for rank in run["ranks"]:
        assert set(rank["actor_types"].values()) == {"DTensor"}
        assert set(rank["critic_types"].values()) == {"DTensor"}
        assert any("lora_A" in n for n in rank["actor_types"]) and any("lora_B" in n for n in rank["critic_types"])
        assert all("lora_" in n for n in rank["trainable"]) and len(rank["trainable"]) == 2 * 7 * 2
        assert rank["reference_is_view"]


@pytest.mark.slow
def test_reference_is_the_base_and_only_adapters_train(run) -> None:
    from test_module_support import tiny_source

    for rank in run["ranks"]:
        kl = [s["train/ref_kl"] for s in rank["steps"]]
        assert kl[0] == 0.0 and kl[1] != 0.0  # the first rollout comes from the base (lora_B = 0)
    base = tiny_source().causal_lm().state_dict()
    state = run["state"]
    for name, value in state.items():
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if "lora_" not in name:
            torch.testing.assert_close(value, base[plain], atol=0, rtol=0)
    assert max(float(v.abs().max()) for n, v in state.items() if "lora_B" in n) > 0


@pytest.mark.slow
def test_sharded_export_is_the_merged_model(run) -> None:
    """Mutation checked: exporting the gathered weights without the LoRA merge (the base weights under
    HF names) fails the comparison for every adapted layer."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run["out"] / "hf", local_files_only=True).state_dict()
    state = run["state"]
    adapted = 0
    for name, value in state.items():
        if ".base_layer.weight" not in name:
            continue
        prefix = name.removesuffix(".base_layer.weight")
        a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
        expected = value + SCALING * b @ a
        target = prefix.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(merged[target], expected, atol=1e-6, rtol=1e-5)
        adapted += 1
    assert adapted == 7 * 2 and not any("lora" in k for k in merged)
