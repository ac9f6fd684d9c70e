"""Rollout tokens/s: our decode loop vs HF ``generate``, side by side, interleaved, in one run.

Both are ``HFGenerateEngine`` backends on the same tiny random Qwen2 (hidden
64, 2 layers, 4 heads / 2 KV heads) with the same prompts (16 tokens), the
same sampling (T = 1, top-p 1: training's setting; ``--top-p`` for
evaluation's) and exactly ``--new-tokens`` new tokens per row (the eos id is
set outside the vocabulary, so no row ends early). Repetitions alternate the
order (loop first, then generate first); the table gives the medians and the
median of the per-repetition ratios. A second table times one sampling step
alone: our sampler vs ``generate``'s step (its temperature / top-p warpers,
softmax, ``torch.multinomial``) on the same (rows, V) random logits (std 2).

    python benchmarks/rollout.py                      # V = 151,936 and 4,096, 1 thread
    python benchmarks/rollout.py --threads 2 --reps 5
    python benchmarks/rollout.py --vocab 151936 --top-p 0.7 --temperature 1.0

Timings are wall-clock on a possibly shared machine: read the ratios; the
load average at the start and end is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch


def tiny_model(vocab: int, hidden: int, layers: int) -> torch.nn.Module:
    from transformers import Qwen2ForCausalLM

    from tre_lightning.models.tiny import tiny_qwen2_config

    torch.manual_seed(0)
    config = tiny_qwen2_config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden)
    return Qwen2ForCausalLM(config).eval()


def run_vocab(vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    from tre_lightning.rollout import HFGenerateEngine, SamplingParams

    model = tiny_model(vocab, args.hidden_size, args.layers)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, vocab, (args.prompts, args.prompt_length), generator=gen)
    mask = torch.ones_like(prompts)
    sampling = SamplingParams(n=args.n, max_new_tokens=args.new_tokens, temperature=args.temperature,
                              top_p=args.top_p)
    engines = {}
    for backend in ("loop", "generate"):
        engine = HFGenerateEngine(eos_token_ids=[vocab], pad_token_id=0, backend=backend)  # eos never sampled
        engine.sync_weights(model)
        engines[backend] = engine
    rows = args.prompts * args.n
    times: dict[str, list[float]] = {"loop": [], "generate": []}
    for backend in engines:  # warm-up
        engines[backend].generate(prompts, mask, sampling)
    for rep in range(args.reps):
        order = ("loop", "generate") if rep % 2 == 0 else ("generate", "loop")
        for backend in order:
            start = time.perf_counter()
            out = engines[backend].generate(prompts, mask, sampling)
            times[backend].append(time.perf_counter() - start)
            assert out.response_ids.shape == (rows, args.new_tokens), out.response_ids.shape
    tokens = rows * args.new_tokens
    ratios = [g / lo for lo, g in zip(times["loop"], times["generate"], strict=True)]
    return {
        "V": f"{vocab:,}",
        "loop tok/s": tokens / statistics.median(times["loop"]),
        "generate tok/s": tokens / statistics.median(times["generate"]),
        "speed-up (median of ratios)": statistics.median(ratios),
        "min-max ratio": f"{min(ratios):.2f}-{max(ratios):.2f}",
    }


def sampler_step(vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    """One sampling step on (rows, V) logits: ours vs HF generate's warpers + softmax + multinomial, interleaved."""
    from tre_lightning.rollout import SamplingParams
    from tre_lightning.rollout.sampling import sample_next_tokens

    rows = args.prompts * args.n
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 2
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)

    def ours() -> None:
        sample_next_tokens(logits, sampling)

    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()  # what generate builds for these settings (it skips T = 1 and top-p = 1)
    if args.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(args.temperature))
    if args.top_p < 1.0:
        warpers.append(TopPLogitsWarper(args.top_p))

    def multinomial() -> None:  # HF generate's sampling step: its warpers, softmax, multinomial
        torch.multinomial(torch.softmax(warpers(None, logits.clone()), dim=-1), 1)

    times: dict[str, list[float]] = {"ours": [], "multinomial": []}
    for f in (ours, multinomial):
        f()
    for rep in range(max(5, args.reps * 3)):
        for name, f in ((("ours", ours), ("multinomial", multinomial)) if rep % 2 == 0
                        else (("multinomial", multinomial), ("ours", ours))):
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    ours_ms, mult_ms = (statistics.median(times[k]) * 1e3 for k in ("ours", "multinomial"))
    return {"V": f"{vocab:,}", "rows": rows, "ours ms": ours_ms, "HF warpers+softmax+multinomial ms": mult_ms,
            "ours / HF": ours_ms / mult_ms}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as a Markdown table (floats: 3 decimals below 10, 1 below 1,000, else thousands)."""
    cols = list(rows[0])

    def fmt(v: Any) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:,.0f}"

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows])


def main(argv: list[str] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", default="151936,4096", help="comma list of vocabulary sizes")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8, help="prompts per rollout")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=5, help="measured repetitions per backend (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load0 = os.getloadavg()
    vocabs = [int(v) for v in args.vocab.split(",") if v.strip()]
    rollouts = [run_vocab(v, args) for v in vocabs]
    steps = [sampler_step(v, args) for v in vocabs]
    load1 = os.getloadavg()
    print(f"\nRollout: tiny Qwen2 (hidden {args.hidden_size}, {args.layers} layers), {args.prompts} prompts x "
          f"{args.n} samples, {args.prompt_length}-token prompts, exactly {args.new_tokens} new tokens, "
          f"T = {args.temperature}, top-p = {args.top_p}; {torch.get_num_threads()} thread(s), median of "
          f"{args.reps} interleaved repetitions; load average {load0[0]:.1f} -> {load1[0]:.1f} "
          f"({os.cpu_count()} CPUs)\n")
    print(markdown_table(rollouts))
    print("\nOne sampling step on the same rows' logits (median of interleaved calls):\n")
    print(markdown_table(steps))
    return rollouts, steps


if __name__ == "__main__":
    main(sys.argv[1:])
