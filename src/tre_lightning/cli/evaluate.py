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
The evaluation settings default to those a checkpoint stores (its ``evaluation``
and ``rollout.max_prompt_length`` hyper-parameters: what training's validation
used), else to ``EvalConfig()``; flags override them, and the line
``tre-eval settings: ...`` says where each came from.
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

__all__ = ["check_sources", "describe_settings", "format_table", "load_actor", "main", "resolve_settings", "run",
           "stored_settings"]


def load_actor(checkpoint: str | None = None, model: str | None = None, dtype: str = "auto",
               device: str = "cpu") -> tuple[nn.Module, Any]:
    """The actor and tokenizer from a PPOModule checkpoint or an HF model folder."""
    from transformers import AutoModelForCausalLM

    from tre_lightning.models.source import load_tokenizer, resolve_dtype

    if (checkpoint is None) == (model is None):
        raise ValueError("give exactly one of checkpoint (a .ckpt of PPOModule) or model (an HF model folder)")
    check_sources(checkpoint, model)
    if model is not None:
        folder = str(Path(model).expanduser())
        actor = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=resolve_dtype(dtype))
        tokenizer = load_tokenizer(folder)
    else:
        actor, tokenizer = _actor_from_checkpoint(checkpoint, dtype)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return actor.to(device).eval(), tokenizer


def check_sources(checkpoint: str | None, model: str | None) -> None:
    """Refuse a missing, truncated or foreign checkpoint or model folder before anything is loaded.

    Raises:
        ConfigError: keyed ``--checkpoint`` or ``--model``, naming the path and what is wrong.
    """
    from tre_lightning.checks import ConfigError
    from tre_lightning.models.folder_checks import check_model_folder
    from tre_lightning.training.checkpoint_io import check_resume_path

    if checkpoint is not None:
        if not Path(checkpoint).expanduser().exists():
            raise ConfigError("--checkpoint", f"{checkpoint!r} does not exist (a .ckpt written while training)")
        check_resume_path(str(Path(checkpoint).expanduser()), "--checkpoint")
        if Path(checkpoint).expanduser().is_dir():
            raise ConfigError("--checkpoint", f"{checkpoint!r} is a folder: a distributed (sharded) checkpoint. "
                                              "Evaluate the exported HF model (--model <run>/hf_model) or save a "
                                              "consolidated checkpoint")
    if model is not None:
        folder = Path(model).expanduser()
        if not (folder / "config.json").is_file():
            what = "does not exist" if not folder.exists() else "is not an HF model folder (no config.json in it)"
            raise ConfigError("--model", f"{model!r} {what} (an HF model folder, e.g. <run>/hf_model)")
        check_model_folder(folder, "--model")


def _actor_from_checkpoint(path: str, dtype: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from tre_lightning.models.source import load_tokenizer

    from tre_lightning.checks import ConfigError

    p = Path(path).expanduser()
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    state = ckpt.get("tre_lightning")
    if not state or state.get("actor_config") is None:
        raise ConfigError("--checkpoint", f"{path} is not a PPOModule checkpoint (no tre_lightning/actor_config "
                                          "entry)")
    cfg_dict = dict(state["actor_config"])
    config = CONFIG_MAPPING[cfg_dict.pop("model_type")].from_dict(cfg_dict)
    actor = AutoModelForCausalLM.from_config(config)
    prefix = "model.actor."  # PPOModule.model (ActorCritic).actor
    weights = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    actor.load_state_dict(weights, strict=False)
    missing = [k for k in actor.state_dict() if k not in weights and not _tied(actor, k)]
    if missing:
        raise ConfigError("--checkpoint", f"{path} lacks actor weights: {missing[:5]}")
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


DEFAULT_PROMPT_LENGTH = 1024
"""``--max-prompt-length`` for an HF model folder (a checkpoint brings its own)."""

_EVAL_FLAGS = {"n": "n", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
               "max_new_tokens": "max_new_tokens", "batch_size": "batch_size", "pass_k": "pass_k",
               "seed": "seed", "max_examples": "max_examples"}
"""argparse destination -> EvalConfig field."""


def stored_settings(checkpoint: str | None) -> tuple[dict[str, Any], int | None]:
    """The evaluation settings (EvalConfig fields) and the rollout's ``max_prompt_length`` that a
    PPOModule checkpoint stores in its hyper-parameters; empty / None without a checkpoint or entry."""
    if checkpoint is None or not Path(checkpoint).expanduser().is_file():
        return {}, None
    hparams = torch.load(Path(checkpoint).expanduser(), map_location="cpu", weights_only=True).get(
        "hyper_parameters") or {}
    evaluation = dict(hparams.get("evaluation") or {})
    prompt = (hparams.get("rollout") or {}).get("max_prompt_length")
    return evaluation, (int(prompt) if prompt is not None else None)


def resolve_settings(args: argparse.Namespace) -> tuple[EvalConfig, int, dict[str, str]]:
    """EvalConfig and max_prompt_length: each a command-line flag if given, else the checkpoint's stored
    value (what training's validation used), else the default; with where each came from."""
    stored, stored_prompt = stored_settings(args.checkpoint)
    defaults = EvalConfig()
    fields: dict[str, Any] = {}
    source: dict[str, str] = {}
    for dest, field_name in _EVAL_FLAGS.items():
        given = getattr(args, dest)
        if given is not None:
            fields[field_name], source[field_name] = given, "flag"
        elif field_name in stored:
            fields[field_name], source[field_name] = stored[field_name], "checkpoint"
        else:
            fields[field_name], source[field_name] = getattr(defaults, field_name), "default"
    if args.max_prompt_length is not None:
        prompt, source["max_prompt_length"] = args.max_prompt_length, "flag"
    elif stored_prompt is not None:
        prompt, source["max_prompt_length"] = stored_prompt, "checkpoint"
    else:
        prompt, source["max_prompt_length"] = DEFAULT_PROMPT_LENGTH, "default"
    fields["pass_k"] = list(fields["pass_k"])
    return EvalConfig(**fields), int(prompt), source


def describe_settings(cfg: EvalConfig, max_prompt_length: int, source: dict[str, str]) -> str:
    """One line: every evaluation setting with where it came from (flag, checkpoint, default)."""
    values = {name: getattr(cfg, name) for name in _EVAL_FLAGS.values()}
    values["max_prompt_length"] = max_prompt_length
    return "tre-eval settings: " + ", ".join(f"{k}={v} ({source[k]})" for k, v in values.items())


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
    # None = the checkpoint's stored evaluation settings (training's validation), else EvalConfig()'s
    p.add_argument("--n", type=int, default=None, help="samples per test prompt")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help=f"prompt tokens kept (checkpoint: its rollout.max_prompt_length; else {DEFAULT_PROMPT_LENGTH})")
    p.add_argument("--batch-size", type=int, default=None, help="test prompts per generate call")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate the first N test prompts only")
    p.add_argument("--pass-k", type=int, nargs="+", default=None, help="k of the reported pass@k")
    p.add_argument("--seed", type=int, default=None)
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
    # before reading the checkpoint's settings, the engine, the task and the models: exit status 2
    check_sources(args.checkpoint, args.model)
    try:
        cfg, max_prompt_length, source = resolve_settings(args)
    except ValueError as err:
        raise SystemExit(f"tre-eval: {err}") from err
    print(describe_settings(cfg, max_prompt_length, source), flush=True)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    engine = None
    if args.engine == "vllm":  # built first: a missing vLLM / GPU stops here, before any loading
        if args.model is None:
            raise SystemExit("tre-eval: --engine vllm needs --model (an HF model folder, e.g. <run>/hf_model)")
        from tre_lightning.rollout.vllm import VLLMEngine

        engine = VLLMEngine(model=args.model, dtype=args.dtype, seed=cfg.seed)
    task = _task_from_config(args.task, args.override)
    actor, tokenizer = load_actor(args.checkpoint, args.model, dtype=args.dtype, device=device)
    start = time.perf_counter()
    results = evaluate(actor, tokenizer, task, cfg, max_prompt_length=max_prompt_length, engine=engine)
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
