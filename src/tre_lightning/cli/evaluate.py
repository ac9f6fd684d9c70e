"""``tre-eval``: evaluate a trained actor with the paper's protocol and print a table.

The protocol (paper, section 6): 8 samples per test prompt, temperature 1.0,
top-p 0.7; Pass@1 (and any pass@k) for binary-reward tasks, mean reward for
all. The model is a Lightning checkpoint of :class:`PPOModule` (rebuilt from
the actor config and tokenizer stored in it: no config needed) or an HF model
folder (e.g. the ``hf_model`` folder that ``tre-train`` exports)::

    tre-eval --checkpoint outputs/<run>/checkpoints/last.ckpt --task embedded
    tre-eval --model outputs/<run>/hf_model --task countdown --override task.val_size=500
    tre-eval --model ~/models/Qwen2.5-1.5B-Instruct --task math --max-new-tokens 8192 --json result.json

The task is a Hydra option of ``conf/task/`` (``--override`` sets its fields).
The loop is :func:`tre_lightning.evaluation.protocol.evaluate`, the same
scoring as the module's validation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tre_lightning.evaluation.config import EvalConfig
from tre_lightning.evaluation.protocol import evaluate
from tre_lightning.tasks.base import Task

__all__ = ["format_table", "load_actor", "main", "run"]


def load_actor(checkpoint: str | None = None, model: str | None = None, dtype: str = "auto",
               device: str = "cpu") -> tuple[nn.Module, Any]:
    """The actor and tokenizer from a PPOModule checkpoint or an HF model folder."""
    from transformers import AutoModelForCausalLM

    from tre_lightning.models.source import load_tokenizer, resolve_dtype

    if (checkpoint is None) == (model is None):
        raise ValueError("give exactly one of checkpoint (a .ckpt of PPOModule) or model (an HF model folder)")
    if model is not None:
        if not Path(model).expanduser().is_dir():
            raise FileNotFoundError(f"HF model folder {model!r} does not exist")
        folder = str(Path(model).expanduser())
        actor = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=resolve_dtype(dtype))
        tokenizer = load_tokenizer(folder)
    else:
        actor, tokenizer = _actor_from_checkpoint(checkpoint, dtype)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return actor.to(device).eval(), tokenizer


def _actor_from_checkpoint(path: str, dtype: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from tre_lightning.models.source import load_tokenizer

    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(
            f"{path} is a folder: a distributed (sharded) checkpoint. Evaluate the exported HF model "
            "(--model <run>/hf_model) or save a consolidated checkpoint"
        )
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    state = ckpt.get("tre_lightning")
    if not state or state.get("actor_config") is None:
        raise ValueError(f"{path} is not a PPOModule checkpoint (no tre_lightning/actor_config entry)")
    cfg_dict = dict(state["actor_config"])
    config = CONFIG_MAPPING[cfg_dict.pop("model_type")].from_dict(cfg_dict)
    actor = AutoModelForCausalLM.from_config(config)
    prefix = "model.actor."  # PPOModule.model (ActorCritic).actor
    weights = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    actor.load_state_dict(weights, strict=False)
    missing = [k for k in actor.state_dict() if k not in weights and not _tied(actor, k)]
    if missing:
        raise ValueError(f"the checkpoint lacks actor weights: {missing[:5]}")
    if dtype != "auto":
        from tre_lightning.models.source import resolve_dtype

        actor = actor.to(resolve_dtype(dtype))
    with tempfile.TemporaryDirectory() as folder:
        for name, text in state["tokenizer_files"].items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        tokenizer = load_tokenizer(folder)
    return actor, tokenizer


def _tied(model: nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def format_table(results: dict[str, float], header: dict[str, Any]) -> str:
    """A Markdown table of the metrics under a one-line description of the run."""
    head = "  ".join(f"{k}={v}" for k, v in header.items())
    rows = [(k, v) for k, v in results.items()]
    width = max(len("metric"), *(len(k) for k, _ in rows))
    lines = [head, "", f"| {'metric'.ljust(width)} | value    |", f"|{'-' * (width + 2)}|----------|"]
    for k, v in rows:
        value = f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else f"{v:g}"
        lines.append(f"| {k.ljust(width)} | {value.ljust(8)} |")
    return "\n".join(lines)


def _task_from_config(name: str, overrides: Sequence[str]) -> Task:
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=["output_dir=.", "~model", "~regularizers", f"task={name}", *overrides])
    return instantiate(cfg.task, _convert_="all")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tre-eval",
        description="Evaluate a PPOModule checkpoint or an HF model folder with the paper's protocol "
        "(8 samples per test prompt, temperature 1.0, top-p 0.7; Pass@1 for binary tasks, mean reward "
        "otherwise) and print a table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a Lightning .ckpt written while training PPOModule")
    src.add_argument("--model", help="an HF model folder (save_pretrained layout, tokenizer included)")
    p.add_argument("--task", required=True, help="task option of conf/task/ (countdown, math, hh, embedded, ...)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="Hydra overrides of the task, e.g. task.val_size=500 task.seed=1")
    d = EvalConfig()
    p.add_argument("--n", type=int, default=d.n, help="samples per test prompt")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--max-prompt-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="test prompts per generate call")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate the first N test prompts only")
    p.add_argument("--pass-k", type=int, nargs="+", default=list(d.pass_k), help="k of the reported pass@k")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="generation engine: HF generate, or vLLM (CUDA GPU and the vllm extra; needs --model)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``tre-eval``."""
    from tre_lightning.cli.errors import exit_on_error

    with exit_on_error("tre-eval"):  # bad settings, data or a missing extra: one line, no traceback
        run(argv)


def run(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse ``argv``, evaluate, print the table; returns the metrics."""
    args = _parser().parse_args(argv)
    try:
        cfg = EvalConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, pass_k=args.pass_k,
                         seed=args.seed, max_examples=args.max_examples)
    except ValueError as err:
        raise SystemExit(f"tre-eval: {err}") from err
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    engine = None
    if args.engine == "vllm":  # built first: a missing vLLM / GPU stops here, before any loading
        if args.model is None:
            raise SystemExit("tre-eval: --engine vllm needs --model (an HF model folder, e.g. <run>/hf_model)")
        from tre_lightning.rollout.vllm import VLLMEngine

        engine = VLLMEngine(model=args.model, dtype=args.dtype, seed=args.seed)
    task = _task_from_config(args.task, args.override)
    actor, tokenizer = load_actor(args.checkpoint, args.model, dtype=args.dtype, device=device)
    start = time.perf_counter()
    results = evaluate(actor, tokenizer, task, cfg, max_prompt_length=args.max_prompt_length, engine=engine)
    header = {"tre-eval": args.checkpoint or args.model, "task": args.task, "n": cfg.n,
              "temperature": cfg.temperature, "top_p": cfg.top_p, "seconds": round(time.perf_counter() - start, 1)}
    print(format_table(results, header))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": header, "results": results}, indent=2))
    if any(math.isnan(v) for v in results.values()):
        print("tre-eval: some metrics are NaN (no test prompts?)", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
