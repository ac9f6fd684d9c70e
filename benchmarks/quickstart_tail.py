"""Tail mass of the policies a quickstart sweep trained (section 4 of the paper, measured).

    python benchmarks/quickstart_tail.py multirun/<date>/<time>     # after tre-train -m experiment=quickstart_sweep

The quickstart's vocabulary has 42 useful tokens and 4,054 fillers that no
answer ever contains. For the exported actor of every run (``<run>/hf_model``)
and for the warm start it started from, this samples responses to the first
``--prompts`` validation puzzles at temperature 1.0, top-p 1.0 (the training
distribution) and reports, averaged over the valid response positions:

- ``tail``: probability mass on filler tokens (what the paper calls leakage, ε);
- ``tail>1%``: share of positions where that mass exceeds 1 % (there a P = 0.99
  nucleus must include fillers, so TRE-P's trust region reaches into the tail);
- ``nucleus``: mean size of the 0.99 nucleus;
- ``filler samples``: share of sampled responses that contain a filler token.

Prints a Markdown table (mean ± std over seeds per regularizer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch


def tail_stats(model: Any, tokenizer: Any, task: Any, prompts: int, seed: int = 0) -> dict[str, float]:
    """Tail statistics of ``model`` on the first ``prompts`` validation puzzles."""
    from tre_lightning.tasks.embedded.tokenizer import useful_token_ids

    useful = torch.tensor(useful_token_ids(tokenizer))
    examples = list(task.val_examples())[:prompts]
    texts = [tokenizer.apply_chat_template(task.messages(e), add_generation_prompt=True, tokenize=False)
             for e in examples]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    width = enc["input_ids"].shape[1]
    torch.manual_seed(seed)
    with torch.no_grad():
        seq = model.generate(**enc, max_new_tokens=16, do_sample=True, temperature=1.0, top_p=1.0, top_k=None)
        mask = torch.cat([enc["attention_mask"], (seq[:, width:] != tokenizer.pad_token_id).long()], dim=1)
        logits = model(input_ids=seq, attention_mask=mask).logits[:, width - 1 : -1].float()
    probs = logits.softmax(-1)
    resp = seq[:, width:]
    is_eos = resp == tokenizer.eos_token_id
    valid = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first eos
    valid &= resp != tokenizer.pad_token_id
    filler_mass = 1.0 - probs[..., useful].sum(-1)
    sorted_p = probs.sort(-1, descending=True).values
    nucleus = ((sorted_p.cumsum(-1) - sorted_p) < 0.99).sum(-1).float()
    is_filler = ~torch.isin(resp, useful)
    return {
        "tail": float(filler_mass[valid].mean()),
        "tail>1%": float((filler_mass[valid] > 0.01).float().mean()),
        "nucleus": float(nucleus[valid].mean()),
        "filler samples": float((is_filler & valid).any(1).float().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    from transformers import Qwen2ForCausalLM

    from tre_lightning.tasks.embedded import EmbeddedTask, WarmStartSource
    from tre_lightning.evaluation.report import find_runs, group_runs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep or run folders")
    parser.add_argument("--prompts", type=int, default=128, help="validation puzzles to sample (default 128)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    task = EmbeddedTask()
    source = WarmStartSource(task=task, verbose=False)
    tok = source.tokenizer()
    rows: dict[str, list[dict[str, float]]] = {"warm start": [tail_stats(source.causal_lm().eval(), tok, task,
                                                                          args.prompts)]}
    for label, runs in group_runs(find_runs(args.paths)).items():
        for run in runs:
            folder = run.folder / "hf_model"
            if not (folder / "config.json").is_file():
                print(f"skip {run.folder}: no hf_model", file=sys.stderr)
                continue
            model = Qwen2ForCausalLM.from_pretrained(folder, local_files_only=True).eval()
            rows.setdefault(label, []).append(tail_stats(model, tok, task, args.prompts))
    keys = ["tail", "tail>1%", "nucleus", "filler samples"]
    print("| policy | runs | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for label, stats in rows.items():
        cells = []
        for k in keys:
            xs = [s[k] for s in stats]
            m = statistics.fmean(xs)
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{m:.1f} ± {sd:.1f}" if k == "nucleus" else f"{100 * m:.2f}% ± {100 * sd:.2f}")
        print(f"| {label} | {len(stats)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
