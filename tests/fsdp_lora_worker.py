"""A LoRA PPOModule under FSDP2 on 2 CPU processes (gloo): the worker of tests/test_fsdp_lora.py.

Run under ``torchrun --nproc-per-node 2``. Each rank fits the real module (tiny Qwen2, LoRA rank 4 on
the actor and the critic, a KL to the adapters-disabled base) for 2 iterations with
``ModelParallelStrategy(data_parallel_size=2)``, exports the merged actor (a collective), and writes
what the test checks: parameter types, the consolidated actor weights, the step metrics.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

STEPS = 2


def main() -> None:
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from test_module_support import LengthTask, fit, tiny_module

    from tre_lightning.cli.train import quiet_warnings
    from tre_lightning.models import LoraSettings
    from tre_lightning.models.fsdp import FSDPConfig, consolidated_state_dict
    from tre_lightning.models.lora import AdaptersDisabled
    from tre_lightning.training.export import export_sharded_hf

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    quiet_warnings()
    module = tiny_module(LengthTask(n_train=16, n_val=4), lora=LoraSettings(rank=4, critic=True), kl_coef=0.05,
                         batch_size=2, mini_batch_size=2, fsdp=FSDPConfig(mixed_precision="none"), lr=5e-3)
    steps: list[dict[str, float]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            steps.append({k: float(v) for k, v in outputs["metrics"].items()})

    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Record()], default_root_dir=str(out))
    fit(trainer, module)
    model = module.model
    actor_types = {n: type(p).__name__ for n, p in model.actor.named_parameters()}
    critic_types = {n: type(p).__name__ for n, p in model.critic.named_parameters()}
    state = consolidated_state_dict(model.actor)
    export_sharded_hf(model.actor, module.tokenizer, str(out / "hf"))
    rank = dist.get_rank()
    torch.save({"actor_types": actor_types, "critic_types": critic_types, "steps": steps,
                "reference_is_view": isinstance(model.reference, AdaptersDisabled),
                "trainable": sorted(n for n, p in model.actor.named_parameters() if p.requires_grad)},
               out / f"rank{rank}.pt")
    if rank == 0:
        torch.save(state, out / "actor_state.pt")
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    main()
