"""The Python steps of ``benchmarks/gpu_check.sh``: a bf16 PPO iteration, single-process FSDP2, the summary.

    python benchmarks/gpu_check.py ppo  --json ppo.json            # Qwen2.5-0.5B-shaped random model, bf16, CUDA
    python benchmarks/gpu_check.py fsdp --json fsdp.json           # the same under ModelParallelStrategy, 1 device
    python benchmarks/gpu_check.py summary --work DIR --out OUTDIR # steps.tsv + the JSONs -> summary.json / .md
    python benchmarks/gpu_check.py ppo --device cpu --preset tiny  # a CPU smoke run of the same code

``ppo`` and ``fsdp`` build the real ``PPOModule`` (``TinyRandomSource``: a Qwen2
config with seeded random weights and a character tokenizer padded to the
vocabulary size, so nothing is downloaded) and fit it with Lightning for
``--warmup`` + ``--iterations`` PPO iterations; they report the medians of the
measured iterations (rollout and training tokens/s, iteration time, the
module's own ``perf/*`` metrics), the peak CUDA memory allocated, and whether
every logged loss is finite. ``summary`` needs only the standard library, so
that the "no CUDA" path works wherever Python does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# Qwen2.5-0.5B's shapes (config.json of Qwen/Qwen2.5-0.5B): 494 M parameters, tied embeddings.
PRESETS: dict[str, dict[str, int]] = {
    "qwen2.5-0.5b": dict(vocab_size=151_936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4_864),
    "tiny": dict(vocab_size=4_096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128),
}
NO_CUDA_EXIT = 3


def _source(preset: str, dtype: str) -> Any:
    from tre_lightning.models import TinyRandomSource

    shape = dict(PRESETS[preset])
    vocab = shape.pop("vocab_size")
    base = len(TinyRandomSource().tokenizer())
    return TinyRandomSource(**shape, max_position_embeddings=1024, n_filler=vocab - base, seed=0, dtype=dtype)


def _fit(args: argparse.Namespace, fsdp: bool) -> dict[str, Any]:
    import lightning as L
    import torch

    from tre_lightning.evaluation import EvalConfig
    from tre_lightning.models import ActorCritic
    from tre_lightning.regularizers import TREP
    from tre_lightning.training import OptimConfig, PPOConfig, PPOModule, PromptDataModule, RolloutConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ppo_iteration import SortTask

    cuda = args.device.startswith("cuda")
    mini = max(1, args.batch_size // 4)  # 4 optimizer steps per iteration
    if fsdp:
        from lightning.pytorch.strategies import ModelParallelStrategy

        from tre_lightning.models.fsdp import FSDPConfig

        model = ActorCritic(_source(args.preset, "float32"), fsdp=FSDPConfig(mixed_precision="bf16"))
        strategy: Any = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1,
                                              save_distributed_checkpoint=True)
        precision = "32-true"  # bf16 compute comes from FSDP2's mixed-precision policy
    else:
        model = ActorCritic(_source(args.preset, "float32"))
        strategy, precision = "auto", "bf16-mixed"
    module = PPOModule(
        model=model,
        task=SortTask(),
        regularizers=[TREP()],
        rollout=RolloutConfig(n=args.n, max_new_tokens=args.max_new_tokens, max_prompt_length=64),
        ppo=PPOConfig(batch_size=args.batch_size, mini_batch_size=mini, micro_batch_size=args.micro_batch_size or mini * args.n,
                      ppo_epochs=1),
        optim=OptimConfig(actor_lr=1e-6, critic_lr=1e-5),
        evaluation=EvalConfig(),
        seed=0,
    )
    seen: list[dict[str, float]] = []

    class Collect(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            if cuda:
                torch.cuda.synchronize()
            metrics = {k: float(v) for k, v in outputs["metrics"].items()}
            metrics["iteration_s"] = time.perf_counter() - self.t0
            seen.append(metrics)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, precision=precision,
                        max_steps=args.warmup + args.iterations, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[Collect()])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=PromptDataModule.for_module(module))
    fit_s = time.perf_counter() - t0
    measured = seen[args.warmup:] or seen

    def med(key: str) -> float | None:
        values = [m[key] for m in measured if key in m]
        return statistics.median(values) if values else None

    losses = {k: v for m in seen for k, v in m.items() if "loss" in k}
    actor_params = sum(p.numel() for p in module.model.actor.parameters())
    return {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "precision": precision + (" + FSDP2 bf16 mixed precision" if fsdp else ""),
        "strategy": "ModelParallelStrategy(data_parallel_size=1)" if fsdp else "single device",
        "actor_parameters": actor_params,
        "prompts x samples": f"{args.batch_size} x {args.n}",
        "max_new_tokens": args.max_new_tokens,
        "iterations": len(seen),
        "measured": len(measured),
        "rollout_tokens_per_s": med("perf/rollout_tokens_per_s"),
        "train_tokens_per_s": med("perf/train_tokens_per_s"),
        "rollout_s": med("perf/rollout_s"),
        "update_s": med("perf/train_s"),
        "iteration_s": med("iteration_s"),
        "response_length": med("train/response_length"),
        "fit_s": round(fit_s, 1),
        "peak_cuda_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_cuda_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses.values()),
    }


def _run(args: argparse.Namespace) -> int:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check.py {args.step}: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return NO_CUDA_EXIT
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = _fit(args, fsdp=args.step == "fsdp")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result["losses_finite"] else 1


# --------------------------------------------------------------------------- #
# summary (standard library only)
# --------------------------------------------------------------------------- #


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps(work: Path) -> list[dict[str, Any]]:
    rows = []
    tsv = work / "steps.tsv"
    if tsv.is_file():
        for line in tsv.read_text().splitlines():
            name, rc, wall = line.split("\t")[:3]
            rows.append({"step": name, "exit": int(rc), "wall_s": float(wall),
                         "status": {0: "ok", 124: "timeout", 137: "timeout"}.get(int(rc), "failed")})
    return rows


def summary(work: Path, out: Path, message: str | None) -> dict[str, Any]:
    """Collect the steps' exit codes and results from ``work`` into ``out``/summary.{json,md}."""
    steps = _steps(work)
    result: dict[str, Any] = {
        "status": "no_cuda" if message else ("ok" if steps and all(s["status"] == "ok" for s in steps) else "failed"),
        "message": message,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "host": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "steps": steps,
        "gpu_info": (work / "gpu_info.txt").read_text().strip() if (work / "gpu_info.txt").is_file() else None,
        "tests": (work / "tests_tail.txt").read_text().strip() if (work / "tests_tail.txt").is_file() else None,
        "kernels": _read_json(work / "regularizers.json"),
        "ppo": _read_json(work / "ppo.json"),
        "fsdp": _read_json(work / "fsdp.json"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "summary.md").write_text(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = [f"# GPU check ({r['date_utc']} UTC): {r['status']}", ""]
    if r["message"]:
        lines += [r["message"], ""]
    if r["gpu_info"]:
        lines += ["```", r["gpu_info"], "```", ""]
    if r["steps"]:
        lines += ["| step | status | exit | wall s |", "|---|---|---|---|"]
        lines += [f"| {s['step']} | {s['status']} | {s['exit']} | {s['wall_s']:.0f} |" for s in r["steps"]]
        lines.append("")
    if r["tests"]:
        lines += ["## gpu-marked tests", "", "```", r["tests"], "```", ""]
    for key, title in (("ppo", "One PPO iteration, bf16"), ("fsdp", "FSDP2, one process, one device")):
        if r[key]:
            lines += [f"## {title}", "", "| | |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in r[key].items()]
            lines.append("")
    if r["kernels"]:
        lines += ["## Regularizer kernels (benchmarks/regularizers.py --device cuda --dtype bfloat16)", "",
                  "```", json.dumps(r["kernels"], indent=1)[:6000], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    for name in ("ppo", "fsdp"):
        s = sub.add_parser(name)
        s.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
        s.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b")
        s.add_argument("--batch-size", type=int, default=16, help="prompts per iteration")
        s.add_argument("--n", type=int, default=4, help="samples per prompt")
        s.add_argument("--micro-batch-size", type=int, default=None,
                       help="sequences per forward/backward (default: a whole mini-batch)")
        s.add_argument("--max-new-tokens", type=int, default=32)
        s.add_argument("--warmup", type=int, default=1)
        s.add_argument("--iterations", type=int, default=1)
        s.add_argument("--json", default=None)
    s = sub.add_parser("summary")
    s.add_argument("--work", type=Path, required=True, help="the folder the steps wrote to")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--message", default=None, help="set for the 'no CUDA' summary")
    args = p.parse_args(argv)
    if args.step == "summary":
        summary(args.work, args.out, args.message)
        return 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
