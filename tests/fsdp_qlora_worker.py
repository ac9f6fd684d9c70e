"""Can FSDP2 shard a QLoRA model? The worker of tests/test_fsdp_qlora.py (2 CPU processes, gloo).

A tiny Qwen2 quantized to NF4 (quant storage bf16) with LoRA adapters, sharded per decoder layer and
at the root with ``fully_shard`` either plainly (``plain``: the 4-bit weights become DTensor shards) or
with the 4-bit weights left out (``ignored``: ``ignored_params`` = every ``Params4bit``; the adapters,
embeddings, norms and biases are sharded). Writes <out>/result<rank>.txt: the parameter types, the largest
logit difference to the unsharded model, and whether every adapter got a gradient; or the error.
"""

from __future__ import annotations

import sys
import warnings

import torch


def main(mode: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from test_module_support import tiny_source

    from tre_lightning.models import LoraSettings
    from tre_lightning.models.lora import apply_lora
    from tre_lightning.models.quant import quantize_4bit_

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    model = apply_lora(quantize_4bit_(tiny_source(hidden_size=64, intermediate_size=128).causal_lm(),
                                      torch.bfloat16, device="cpu"), LoraSettings(rank=4))
    ids = torch.randint(3, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits.detach().float()
    ignored = {p for p in model.parameters() if type(p).__name__ == "Params4bit"} if mode == "ignored" else None
    try:
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh, ignored_params=ignored)
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        types = sorted({type(p).__name__ for p in model.parameters()})
        logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).mean().backward()
        grads = all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
        diff = float((logits.detach().float() - expected).abs().max())
        result = f"types={','.join(types)} diff={diff} grads={grads}"
    except Exception as err:  # noqa: BLE001 - the error is the result
        result = f"error={type(err).__name__}: {str(err)[:200]}"
    with open(f"{out}/result{dist.get_rank()}.txt", "w") as f:
        f.write(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
