"""PPOModule under FSDP2 with 2 CPU processes: the worker of tests/test_fsdp_ppo.py.

Run under ``torchrun --nproc-per-node 2`` (gloo); Lightning detects torchrun
and starts no processes itself. Each rank builds the real :class:`PPOModule`
(tiny Qwen2 actor, critic, reference model for a KL) and fits it with
``Trainer(strategy=ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1), devices=2, accelerator="cpu")``:

A. ``STEPS`` PPO iterations with HF-engine rollouts sampled through the sharded
   actor, a distributed checkpoint after every iteration, validation at the
   end, then ``export_hf`` (every rank; rank 0 writes);
B. a fresh module and trainer resumed from A's distributed checkpoint after
   iteration ``RESUME_AT``, fitted to ``STEPS``.

Writes, per rank, the rollouts it trained on, the batch indices and the
step metrics; rank 0 also writes the consolidated (full) weights of A and B.
The test replays the rollouts of both ranks in one process (see there).

The shared pieces (the module's settings, :class:`RecordingPPO`,
:class:`ReplayEngine`) are imported by the test from this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tre_lightning.training import PPOModule
from tre_lightning.rollout.base import Rollout, SamplingParams
from tre_lightning.rollout.hf import HFGenerateEngine

STEPS = 4
RESUME_AT = 2
PER_RANK_BATCH = 2  # prompts per process and iteration
WORLD = 2


def settings(**overrides: Any) -> dict[str, Any]:
    """The run's settings (JSON-able): both the 2-rank run and the reference use them.

    The paper's settings: token-mean aggregation and advantage whitening,
    which the module computes over the global batch (all ranks), so that
    data-parallel PPO is *mathematically* the single-process update on the
    global batch (see tests/test_fsdp_ppo.py). One mini-batch per PPO epoch:
    with several, the ranks' shuffles would put other rows together than the
    single process's shuffle does.
    """
    cfg: dict[str, Any] = {
        "n": 2,
        "max_new_tokens": 6,
        "batch_size": PER_RANK_BATCH,
        "mini_batch_size": PER_RANK_BATCH,
        "micro_batch_size": 2,
        "ppo_epochs": 2,
        "loss_aggregation": "token-mean",
        "whiten_advantages": True,
        "kl_coef": 0.05,
        "lr": 5e-3,
        "eight_bit": False,
        "share_backbone": False,
        "ent_coef": 0.01,
        "seed": 3,
        "gradient_checkpointing": True,
        "fsdp": {"mixed_precision": "none", "activation_checkpointing": False},
        "n_train": 16,
        "reference_4bit": None,
        "hidden_size": 32,
        "intermediate_size": 64,
        "n_filler": 0,
        "ragged": True,
    }
    cfg.update(overrides)
    return cfg


class RecordingPPO(PPOModule):
    """PPOModule that keeps every training rollout (on CPU) and each step's metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: list[dict[str, Tensor]] = []
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        rollout = outputs["rollout"]
        self.recorded.append({k: getattr(rollout, k).detach().cpu().clone() for k in ROLLOUT_FIELDS})
        self.steps.append({"step": int(self.global_step), "index": batch["index"].tolist(),
                           "metrics": dict(outputs["metrics"])})


ROLLOUT_FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "response_lengths")


class CheckedHFEngine(HFGenerateEngine):
    """The HF engine, noting for every call whether the actor's weights were gathered (plain tensors).

    ``ragged``: the tiny random model almost never samples eos, so every
    response would be ``max_new_tokens`` long and every rank would have the
    same token count (where per-rank and global token-mean coincide). Each
    sampled row is therefore ended early, at a length in [1, its length]
    that is a function of its tokens (eos put there, pad after), so the
    ranks' token counts differ; the module trains on (and the test replays)
    these rollouts.
    """

    def __init__(self, ragged: bool = False, eos: int | None = None, pad: int | None = None) -> None:
        super().__init__()
        self.sharded_during_generate: list[bool] = []
        self.ragged, self.eos, self.pad = ragged, eos, pad

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams) -> Rollout:
        from tre_lightning.models.fsdp import is_sharded

        assert self._model is not None
        self.sharded_during_generate.append(is_sharded(self._model))
        rollout = super().generate(prompt_ids, prompt_mask, sampling)
        return cut_responses(rollout, self.eos, self.pad) if self.ragged else rollout


def cut_responses(rollout: Rollout, eos: int, pad: int) -> Rollout:
    """End each response after ``1 + sum(its ids) % its length`` tokens, with eos there and pad after."""
    ids, mask = rollout.response_ids.clone(), rollout.response_mask.clone()
    lengths = rollout.response_lengths.clone()
    for i in range(ids.shape[0]):
        length = int(lengths[i])
        if length == 0:
            continue
        new = 1 + int(ids[i, :length].sum()) % length
        ids[i, new - 1] = eos
        ids[i, new:] = pad
        mask[i, new:] = 0
        lengths[i] = new
    return dataclasses.replace(rollout, response_ids=ids, response_mask=mask, response_lengths=lengths)


def engine_for(cfg: dict[str, Any]) -> CheckedHFEngine:
    """The 2-rank run's engine (ragged responses unless ``cfg["ragged"]`` is False)."""
    from test_module_support import tiny_source

    tok = tiny_source(n_filler=cfg["n_filler"]).tokenizer()
    return CheckedHFEngine(ragged=cfg["ragged"], eos=tok.eos_token_id, pad=tok.pad_token_id)


class ReplayEngine:
    """Rollout engine that returns recorded rollouts, in order, checking the prompts.

    Each entry is a list of per-rank rollouts that are concatenated (rank
    order = the order of the global batch), responses right-padded to the
    widest rank with ``pad`` and mask 0.
    """

    def __init__(self, per_step: list[list[dict[str, Tensor]]], pad: int) -> None:
        self.per_step = per_step
        self.pad = pad
        self.calls = 0

    def sync_weights(self, actor: torch.nn.Module) -> None:
        pass

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams) -> Rollout:
        parts = self.per_step[self.calls]
        self.calls += 1
        width = max(p["response_ids"].shape[1] for p in parts)

        def padded(t: Tensor, value: int) -> Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        rollout = Rollout(
            prompt_ids=torch.cat([p["prompt_ids"] for p in parts]),
            prompt_mask=torch.cat([p["prompt_mask"] for p in parts]),
            response_ids=torch.cat([padded(p["response_ids"], self.pad) for p in parts]),
            response_mask=torch.cat([padded(p["response_mask"], 0) for p in parts]),
            response_lengths=torch.cat([p["response_lengths"] for p in parts]),
        )
        expected = prompt_ids.repeat_interleave(sampling.n, dim=0)
        if not torch.equal(rollout.prompt_ids, expected.cpu()):
            raise AssertionError(f"replayed rollout {self.calls - 1} was recorded for other prompts")
        return rollout


def build_module(cfg: dict[str, Any], world: int = 1, engine: Any = None, cls: type = RecordingPPO) -> PPOModule:
    """The module of the run; ``world`` = 1 gives the single-process module for the same global batch."""
    from test_module_support import LengthTask, tiny_source

    from tre_lightning.evaluation import EvalConfig
    from tre_lightning.models import ActorCritic
    from tre_lightning.models.fsdp import FSDPConfig
    from tre_lightning.training import OptimConfig, PPOConfig, RolloutConfig
    from tre_lightning.models.source import PretrainedSource
    from tre_lightning.regularizers import Ent

    reference = None
    if cfg["reference_4bit"]:  # a frozen NF4 copy of the initial policy saved at that path
        reference = PretrainedSource(cfg["reference_4bit"], dtype="float32", load_in_4bit=True)
    batch = cfg["batch_size"] * (WORLD if world == 1 else 1)
    mini = cfg["mini_batch_size"] * (WORLD if world == 1 else 1)
    model = ActorCritic(
        tiny_source(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                    n_filler=cfg["n_filler"]),
        share_backbone=cfg["share_backbone"],
        reference=reference,
        gradient_checkpointing=cfg["gradient_checkpointing"] and world > 1,
        fsdp=FSDPConfig(**cfg["fsdp"]),
    )
    return cls(
        model=model,
        task=LengthTask(n_train=cfg["n_train"], n_val=4),
        regularizers=[Ent(coef=cfg["ent_coef"])] if cfg["ent_coef"] else None,
        engine=engine,
        rollout=RolloutConfig(n=cfg["n"], max_new_tokens=cfg["max_new_tokens"], max_prompt_length=64),
        ppo=PPOConfig(batch_size=batch, mini_batch_size=mini, micro_batch_size=cfg["micro_batch_size"],
                      ppo_epochs=cfg["ppo_epochs"], loss_aggregation=cfg["loss_aggregation"],
                      whiten_advantages=cfg["whiten_advantages"], kl_coef=cfg["kl_coef"]),
        optim=OptimConfig(actor_lr=cfg["lr"], critic_lr=cfg["lr"], critic_warmup_ratio=0.0,
                          eight_bit=cfg["eight_bit"]),
        evaluation=EvalConfig(n=2, max_new_tokens=cfg["max_new_tokens"], batch_size=2),
        seed=cfg["seed"],
    )


def checkpointing(model: torch.nn.Module) -> list[Any]:
    """For each decoder layer: None (no activation checkpointing) or its ``use_reentrant`` setting."""
    from tre_lightning.models.fsdp import decoder_layers

    out = []
    for layer in decoder_layers(model):
        func = getattr(layer, "_gradient_checkpointing_func", None)
        on = bool(getattr(layer, "gradient_checkpointing", False)) and func is not None
        out.append(getattr(func, "keywords", {}).get("use_reentrant", True) if on else None)
    return out


def full_state(module: PPOModule) -> dict[str, Tensor]:
    """Consolidated actor + critic (or value head) weights; a collective when sharded (rank 0 gets them)."""
    from tre_lightning.models.fsdp import consolidated_state_dict

    out = {f"actor.{k}": v for k, v in consolidated_state_dict(module.model.actor).items()}
    second = module.model.value_head if module.model.share_backbone else module.model.critic
    name = "value_head" if module.model.share_backbone else "critic"
    out.update({f"{name}.{k}": v for k, v in consolidated_state_dict(second).items()})
    return out


def _trainer(out: Path, callbacks: list[Any], steps: int, validate: bool) -> Any:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    return L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        max_steps=steps,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1 if validate else 0,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        default_root_dir=str(out),
    )


def main() -> None:
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint

    from test_module_support import fit

    from tre_lightning.cli.train import quiet_warnings
    from tre_lightning.models.fsdp import has_4bit_layers

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", required=True, help="JSON of settings() overrides")
    parser.add_argument("--resume", action="store_true", help="also run B (resume from A's checkpoint)")
    args = parser.parse_args()
    quiet_warnings()
    cfg = settings(**json.loads(args.settings))
    out = Path(args.out)

    # A: straight run -------------------------------------------------------
    module = build_module(cfg, world=WORLD, engine=engine_for(cfg))
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = _trainer(out, [ckpt], STEPS, validate=True)
    fit(trainer, module)
    rank = dist.get_rank()
    state = full_state(module)
    module.export_hf(str(out / "hf"))
    torch.save(
        {"recorded": module.recorded, "steps": module.steps, "global_step": trainer.global_step,
         "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
         "sharded": sorted({type(p).__name__ for p in module.model.actor.parameters()}),
         "critic_sharded": sorted({type(p).__name__ for p in module.model.critic_parameters()}),
         "ref_sharded": sorted({type(p).__name__ for p in module.model.reference.parameters()}) if module.model.reference is not None else [],
         "optimizers": [type(o).__name__ for o in trainer.optimizers],
         "sharded_during_generate": module.engine.sharded_during_generate,
         "ref_4bit": module.model.reference is not None and has_4bit_layers(module.model.reference),
         "ref_in_state_dict": any(k.startswith("ref.") for k in module.state_dict()),
         "param_dtypes": sorted({str(p.dtype) for p in module.model.actor.parameters()}),
         "checkpointing": [checkpointing(m) for m in (module.model.actor, module.model.critic) if m is not None]},
        out / f"a_rank{rank}.pt",
    )
    if rank == 0:
        torch.save(state, out / "a_state.pt")

    # B: resume from the distributed checkpoint after RESUME_AT iterations ------
    if args.resume:
        resumed = build_module(cfg, world=WORLD, engine=engine_for(cfg))
        trainer_b = _trainer(out / "b", [], STEPS, validate=False)
        fit(trainer_b, resumed, ckpt_path=str(out / "ckpt" / f"step={RESUME_AT}.ckpt"))
        state_b = full_state(resumed)
        torch.save({"recorded": resumed.recorded, "steps": resumed.steps, "global_step": trainer_b.global_step},
                   out / f"b_rank{rank}.pt")
        if rank == 0:
            torch.save(state_b, out / "b_state.pt")
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    main()
