"""One PPO iteration of ours vs TRL's ``PPOTrainer`` on the same work, side by side in one run.

The same tiny Qwen2 (hidden 64, 2 layers, 4 heads / 2 KV heads, the same
initial weights), the same 16-token prompts, exactly 32 new tokens per
response (no eos: ours gets an eos id outside the vocabulary, TRL
``stop_token=None``), sampling at T = 1 / top-p 1 / top-k off, 1 PPO epoch
over the rollout batch in 4 mini-batches of one forward/backward each (one
optimizer step per mini-batch), AdamW. TRL also runs its reference model and
a reward model on every rollout (ours scores with the task's Python function
and has no reference model at ``kl_coef = 0``): that is part of TRL's
iteration, as it is of a user's.

Runs alternate (ours, TRL, ours, TRL, ...); each run trains
``--warmup + --iterations`` iterations and keeps the last ``--iterations``
(an iteration = the time between two consecutive iteration ends: rollout,
scoring, old log-probs and values, GAE, the update, logging). The table gives
the medians over every kept iteration and their ratio.

    pip install trl==0.29.1        # the last TRL line with PPOTrainer (trl.experimental.ppo); not a dependency
    python benchmarks/vs_trl.py                        # V = 151,936 and 4,096, 1 thread
    python benchmarks/vs_trl.py --vocab 4096 --runs 3 --threads 2
    python benchmarks/vs_trl.py --fused-adamw          # adds ours with torch.optim.AdamW(fused=True)
    python benchmarks/vs_trl.py --profile --vocab 151936   # torch.profiler table of one of our iterations

Timings are wall-clock on a possibly shared machine: read the ratios; the load
average at the start and the end is printed with them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from rollout import markdown_table  # benchmarks/rollout.py (this folder is on sys.path)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def prompt_texts(count: int, length: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PROMPT_CHARS) for _ in range(length)) for _ in range(count)]


def make_source(vocab: int, args: argparse.Namespace) -> Any:
    """TinyRandomSource with ``vocab`` tokens whose chat template is the bare prompt (16 chars = 16 tokens)."""
    from tre_lightning.models import TinyRandomSource

    class BarePromptSource(TinyRandomSource):
        def tokenizer(self):  # noqa: ANN202
            tok = super().tokenizer()
            tok.chat_template = "{{ messages[0]['content'] }}"
            return tok

    n_filler = vocab - len(TinyRandomSource().tokenizer())
    return BarePromptSource(hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=2 * args.hidden_size, n_filler=n_filler, seed=0)


class CharTask:
    """Prompts from :func:`prompt_texts`; reward: share of response characters that occur in the prompt."""

    name = "chars"
    binary_reward = False

    def __init__(self, texts: list[str]) -> None:
        self._rows = [{"q": t} for t in texts]

    def train_examples(self) -> list[dict[str, str]]:
        return self._rows

    def val_examples(self) -> list[dict[str, str]]:
        return self._rows[:4]

    def messages(self, example: dict[str, str]) -> list[dict[str, str]]:
        return [{"role": "user", "content": example["q"]}]

    def score(self, examples: list[dict[str, str]], responses: list[str]) -> list[float]:
        return [sum(c in e["q"] for c in r) / max(1, len(r)) for e, r in zip(examples, responses, strict=True)]


@contextlib.contextmanager
def fused_adamw(enabled: bool) -> Iterator[None]:
    """While active, ``torch.optim.AdamW(...)`` builds ``AdamW(..., fused=True)`` (benchmark-only switch)."""
    if not enabled:
        yield
        return
    plain = torch.optim.AdamW

    class FusedAdamW(plain):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **{**k, "fused": True})

    torch.optim.AdamW = FusedAdamW  # type: ignore[misc]
    try:
        yield
    finally:
        torch.optim.AdamW = plain  # type: ignore[misc]


def ours(vocab: int, args: argparse.Namespace, fused: bool = False, profile_iteration: int | None = None) -> Any:
    """Our iterations with the public API (PPOModule + TinyRandomSource + Lightning).

    Returns (iteration seconds, rollout seconds) of the kept iterations.

    With ``profile_iteration``: returns the torch.profiler of that iteration instead.
    """
    import lightning as L

    from tre_lightning.config import EvalConfig, OptimConfig, PPOConfig, RolloutConfig
    from tre_lightning.module import PPOModule
    from tre_lightning.rollout import HFGenerateEngine

    class LabelledEngine(HFGenerateEngine):  # the rollout shows as one "rollout" row in the profile
        def generate(self, *a: Any, **k: Any) -> Any:
            with torch.profiler.record_function("rollout (HFGenerateEngine.generate)"):
                return super().generate(*a, **k)

    source = make_source(vocab, args)
    rows = args.prompts
    module = PPOModule(
        policy=source,
        task=CharTask(prompt_texts(4 * rows, args.prompt_length)),
        rollout=RolloutConfig(n=1, max_new_tokens=args.new_tokens, max_prompt_length=args.prompt_length),
        ppo=PPOConfig(batch_size=rows, mini_batch_size=rows // 4, micro_batch_size=rows // 4, ppo_epochs=1),
        optim=OptimConfig(actor_lr=1e-5, critic_lr=1e-5),
        evaluation=EvalConfig(),
        engine=LabelledEngine(eos_token_ids=[vocab], pad_token_id=source.tokenizer().pad_token_id),
        seed=0,
    )
    ends: list[float] = []
    rollouts: list[float] = []
    holder: dict[str, Any] = {}

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            if profile_iteration is not None and batch_idx == profile_iteration:
                holder["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                holder["prof"].__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            ends.append(time.perf_counter())
            rollouts.append(float(outputs["metrics"]["perf/rollout_s"]))
            if "prof" in holder and batch_idx == profile_iteration:
                holder["prof"].__exit__(None, None, None)

    steps = args.warmup + args.iterations if profile_iteration is None else profile_iteration + 1
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[Clock()])
    with fused_adamw(fused):
        trainer.fit(module)
    if profile_iteration is not None:
        return holder["prof"]
    return [b - a for a, b in zip(ends, ends[1:], strict=False)][args.warmup - 1 :], rollouts[args.warmup :]


def trl(vocab: int, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """TRL PPOTrainer iterations on the same model config, prompts and sizes.

    Returns (iteration seconds, rollout seconds: its ``batch_generation`` call) of the kept iterations.
    """
    from datasets import Dataset
    from transformers import PrinterCallback, Qwen2ForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_module

    source = make_source(vocab, args)
    tok = source.tokenizer()
    rows = args.prompts
    steps = args.warmup + args.iterations
    texts = prompt_texts(4 * rows, args.prompt_length)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(len(i) == args.prompt_length for i in ids)
    data = Dataset.from_dict({"input_ids": ids})
    policy = source.causal_lm()
    head_config = {k: v for k, v in source.config.to_dict().items() if k not in ("id2label", "label2id")}
    torch.manual_seed(1)
    value = Qwen2ForSequenceClassification(source.config.__class__(**head_config, num_labels=1))
    reward = Qwen2ForSequenceClassification(source.config.__class__(**head_config, num_labels=1))
    ends: list[float] = []
    rollouts: list[float] = []
    generation = trl_module.batch_generation

    def timed_generation(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        out = generation(*a, **k)
        rollouts.append(time.perf_counter() - start)
        return out

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out, per_device_train_batch_size=rows, gradient_accumulation_steps=1, num_mini_batches=4,
            num_ppo_epochs=1, response_length=args.new_tokens, total_episodes=rows * steps,
            local_rollout_forward_batch_size=rows, stop_token=None, stop_token_id=None, missing_eos_penalty=None,
            num_sample_generations=0, temperature=1.0, learning_rate=1e-5, report_to="none", save_strategy="no",
            use_cpu=True, bf16=False, fp16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                             train_dataset=data, value_model=value, eval_dataset=data.select(range(4)),
                             callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)
        trl_module.batch_generation = timed_generation
        try:
            trainer.train()
        finally:
            trl_module.batch_generation = generation
    return [b - a for a, b in zip(ends, ends[1:], strict=False)][args.warmup - 1 :], rollouts[args.warmup :]


def compare(vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    names = ["ours", "trl"] + (["ours fused"] if args.fused_adamw else [])
    times: dict[str, list[float]] = {k: [] for k in names}
    rollout: dict[str, list[float]] = {k: [] for k in names}
    for run in range(args.runs):
        order = names if run % 2 == 0 else names[::-1]
        for name in order:
            it, ro = trl(vocab, args) if name == "trl" else ours(vocab, args, fused=name == "ours fused")
            times[name] += it
            rollout[name] += ro
    med = {k: statistics.median(v) for k, v in times.items()}
    row: dict[str, Any] = {
        "V": f"{vocab:,}",
        "sequences": args.prompts,
        "ours s": med["ours"],
        "TRL s": med["trl"],
        "TRL / ours": med["trl"] / med["ours"],
        "ours rollout s": statistics.median(rollout["ours"]),
        "TRL rollout s": statistics.median(rollout["trl"]),
        "iterations": len(times["ours"]),
    }
    if args.fused_adamw:
        row["ours fused-AdamW s"] = med["ours fused"]
        row["fused / plain"] = med["ours fused"] / med["ours"]
        row["TRL / ours fused"] = med["trl"] / med["ours fused"]
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", default="151936,4096", help="comma list of vocabulary sizes")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32, help="prompts = sequences per iteration (1 sample each)")
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="iterations dropped at the start of each run (>= 1)")
    p.add_argument("--iterations", type=int, default=2, help="iterations kept per run")
    p.add_argument("--runs", type=int, default=2, help="alternating runs of each trainer")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--fused-adamw", action="store_true", help="also time ours with AdamW(fused=True)")
    p.add_argument("--profile", action="store_true", help="profile one of our iterations instead (self CPU time)")
    args = p.parse_args(argv)
    if args.prompts % 4 or args.warmup < 1:
        p.error("--prompts must be a multiple of 4 (4 mini-batches) and --warmup >= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    vocabs = [int(v) for v in args.vocab.split(",") if v.strip()]
    if args.profile:
        prof = ours(vocabs[0], args, profile_iteration=args.warmup)
        print(f"\nProfile of our iteration {args.warmup + 1} at V = {vocabs[0]:,} ({torch.get_num_threads()} "
              f"thread(s)), self CPU time:\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        rollout = [e for e in prof.key_averages() if e.key.startswith("rollout")]
        if rollout:
            total = sum(e.self_cpu_time_total for e in prof.key_averages())
            print(f"rollout (HFGenerateEngine.generate): {rollout[0].cpu_time_total / 1e6:.2f} s CPU total of "
                  f"{total / 1e6:.2f} s self CPU")
        return []
    load0 = os.getloadavg()
    rows = [compare(v, args) for v in vocabs]
    load1 = os.getloadavg()
    import trl as trl_pkg

    print(f"\nOne PPO iteration: tiny Qwen2 (hidden {args.hidden_size}, {args.layers} layers), {args.prompts} "
          f"prompts of {args.prompt_length} tokens, exactly {args.new_tokens} new tokens, 1 epoch, 4 mini-batches; "
          f"TRL {trl_pkg.__version__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of "
          f"{args.runs} alternating runs x {args.iterations} iterations; load average {load0[0]:.1f} -> "
          f"{load1[0]:.1f} ({os.cpu_count()} CPUs)\n")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
