"""FSDP2 and a 4-bit (QLoRA) base, 2 CPU processes (gloo): plain ``fully_shard`` breaks the NF4
layers (the shards are plain DTensors without bitsandbytes' quant_state); leaving the ``Params4bit``
weights out (``ignored_params``) shards everything else and computes the unsharded model's logits,
with gradients for every adapter. The evidence behind docs/scaling.md, "QLoRA under FSDP2"."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

WORKER = Path(__file__).with_name("fsdp_qlora_worker.py")


def _run(mode: str, out: Path) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(WORKER), mode, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(WORKER.parent))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [(out / f"result{r}.txt").read_text() for r in (0, 1)]


@pytest.mark.slow
def test_plain_fully_shard_breaks_the_4bit_layers(tmp_path) -> None:
    for line in _run("plain", tmp_path):
        assert "error=ValueError: quant_state is required" in line


@pytest.mark.slow
def test_4bit_weights_left_out_of_sharding_give_the_unsharded_model(tmp_path) -> None:
    for line in _run("ignored", tmp_path):
        assert "types=DTensor,Params4bit" in line and "diff=0.0" in line and "grads=True" in line
