"""Benchmark one PPO iteration of PPOModule on a tiny random model (CPU by default).

Measures, per regularizer, the median over the measured iterations of:
rollout tokens/s (generated response tokens / generate time), training
tokens/s (prompt + response tokens through the PPO epochs' forward and
backward passes / update time, old log-prob and value pass included), the
iteration time, and the peak memory (CPU: the process's peak resident set;
CUDA: peak allocated).

    python benchmarks/ppo_iteration.py
    python benchmarks/ppo_iteration.py --regularizers none,tre_p,ent --n-filler 4000 --max-new-tokens 64
    python benchmarks/ppo_iteration.py --device cuda --hidden-size 256 --layers 4 --batch-size 32

Defaults: hidden 64, 2 layers, char vocabulary (~100 tokens), 8 prompts x 4
samples, 32 new tokens, 2 warm-up + 3 measured iterations.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import time
import warnings
from typing import Any

import torch

REGULARIZERS = {
    "none": lambda: None,
    "ent": lambda: "Ent",
    "tre_k": lambda: "TREK",
    "tre_p": lambda: "TREP",
    "min_ent": lambda: "MinEnt",
    "forking": lambda: "ForkingTokens",
    "kl_cov": lambda: "KLCov",
    "clip_cov": lambda: "ClipCov",
}


class SortTask:
    """Synthetic prompts "sort <digits>"; reward 1 if the response starts with the sorted digits."""

    name = "sort"
    binary_reward = True

    def __init__(self, n: int = 256, seed: int = 0) -> None:
        rng = random.Random(seed)
        self._rows = [{"digits": "".join(rng.choice("0123456789") for _ in range(rng.randint(5, 9)))} for _ in range(n)]

    def train_examples(self) -> list[dict[str, str]]:
        return self._rows

    def val_examples(self) -> list[dict[str, str]]:
        return self._rows[:16]

    def messages(self, example: dict[str, str]) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"sort {example['digits']}"}]

    def score(self, examples: list[dict[str, str]], responses: list[str]) -> list[float]:
        return [1.0 if r.strip().startswith("".join(sorted(e["digits"]))) else 0.0 for e, r in zip(examples, responses)]


def _peak_memory_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return peak_kib / 1024


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L

    from tre_lightning import regularizers as R
    from tre_lightning.evaluation import EvalConfig
    from tre_lightning.models import ActorCritic, TinyRandomSource
    from tre_lightning.training import OptimConfig, PPOConfig, PPOModule, PromptDataModule, RolloutConfig

    cls = REGULARIZERS[name]()
    regs = [getattr(R, cls)()] if cls else None
    source = TinyRandomSource(hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * args.hidden_size,
                              n_filler=args.n_filler, seed=0)
    module = PPOModule(
        model=ActorCritic(source),
        task=SortTask(),
        regularizers=regs,
        rollout=RolloutConfig(n=args.n, max_new_tokens=args.max_new_tokens, max_prompt_length=256),
        ppo=PPOConfig(batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
                      micro_batch_size=args.micro_batch_size),
        optim=OptimConfig(actor_lr=1e-5, critic_lr=1e-5),
        evaluation=EvalConfig(),
        seed=0,
    )
    seen: list[dict[str, float]] = []

    class Collect(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            metrics = dict(outputs["metrics"])
            metrics["iteration_s"] = time.perf_counter() - self.t0
            seen.append(metrics)

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                        max_steps=args.warmup + args.iterations, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[Collect()])
    trainer.fit(module, datamodule=PromptDataModule.for_module(module))
    measured = seen[args.warmup :]

    def med(key: str) -> float:
        return statistics.median(m[key] for m in measured)

    return {
        "regularizer": name,
        "rollout tok/s": med("perf/rollout_tokens_per_s"),
        "train tok/s": med("perf/train_tokens_per_s"),
        "rollout s": med("perf/rollout_s"),
        "update s": med("perf/train_s"),
        "iteration s": med("iteration_s"),
        "resp len": med("train/response_length"),
        "peak MiB": _peak_memory_mib(args.device),
    }


def _fmt(key: str, value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    if key.endswith(" s"):
        return f"{value:.3f}"
    if key == "resp len":
        return f"{value:.1f}"
    return f"{value:,.0f}"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regularizers", default="none,tre_p", help=f"comma list of {sorted(REGULARIZERS)}")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--n-filler", type=int, default=0, help="extra unused tokens (vocabulary size)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per iteration")
    p.add_argument("--mini-batch-size", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = [run_one(name.strip(), args) for name in args.regularizers.split(",") if name.strip()]
    print(f"\nPPO iteration on {args.device} ({torch.get_num_threads()} threads): hidden {args.hidden_size}, "
          f"{args.layers} layers, {args.batch_size} prompts x {args.n} samples, <= {args.max_new_tokens} new tokens, "
          f"median of {args.iterations} iterations after {args.warmup} warm-up\n")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(_fmt(k, v) for k, v in r.items()) + " |")
    print("\nPeak memory is the process's peak (imports included on CPU), cumulative over the rows.")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
