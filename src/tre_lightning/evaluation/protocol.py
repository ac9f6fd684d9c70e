"""The evaluation protocol (paper, section 6): 8 samples per test prompt, temperature 1.0, top-p 0.7.

Pass@1 (and any pass@k) for binary-reward tasks, mean reward for all, as
torchmetrics that keep sums and counts (exact across processes). The module's
validation and ``tre-eval`` run the same :func:`score_batch`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tre_lightning.evaluation.config import EvalConfig
from tre_lightning.tasks.base import Task

__all__ = [
    "build_eval_metrics",
    "evaluate",
    "metric_name",
    "score_batch",
    "update_eval_metrics",
]


def build_eval_metrics(task: Task, cfg: EvalConfig) -> nn.ModuleDict:
    """``reward`` (mean reward, every task), ``pass_at_k`` for each k (binary tasks) and
    ``response_length``; all keep sums and counts, so they are exact across processes."""
    from torchmetrics import MeanMetric

    from tre_lightning.evaluation.metrics import MeanReward, PassAtK

    metrics: dict[str, nn.Module] = {"reward": MeanReward()}
    if task.binary_reward:
        for k in cfg.pass_k:
            metrics[f"pass_at_{k}"] = PassAtK(k)
    metrics["response_length"] = MeanMetric()
    return nn.ModuleDict(metrics)


def update_eval_metrics(metrics: nn.ModuleDict, rewards: Tensor, lengths: Tensor) -> None:
    """Feed a (prompts, n) grid of rewards and of response lengths (no-op for zero prompts)."""
    if rewards.shape[0] == 0:
        return
    for key, metric in metrics.items():
        metric.update(lengths.reshape(-1) if key == "response_length" else rewards)


def metric_name(key: str) -> str:
    """``pass_at_1`` -> ``val/pass@1``; ``reward`` -> ``val/reward``; ``response_length`` -> ``val/response_length``."""
    return "val/" + key.replace("pass_at_", "pass@")


def score_batch(engine: Any, tokenizer: Any, task: Task, batch: dict[str, Any], cfg: EvalConfig) -> tuple[Tensor, Tensor]:
    """Generate ``cfg.n`` samples per prompt and score them.

    Returns:
        (rewards, lengths), each (valid prompts, n) float32; padded rows
        (``batch["valid"] == 0``) are dropped.
    """
    with torch.no_grad():
        rollout = engine.generate(batch["input_ids"], batch["attention_mask"], cfg.sampling())
    rows = [ids[: int(n)] for ids, n in zip(rollout.response_ids, rollout.response_lengths, strict=True)]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    chosen = [example for example in batch["examples"] for _ in range(cfg.n)]
    rewards = task.score(chosen, texts)
    if len(rewards) != len(texts):
        raise RuntimeError(f"task.score returned {len(rewards)} rewards for {len(texts)} responses")
    device = batch["input_ids"].device
    rewards_t = torch.tensor([float(r) for r in rewards], dtype=torch.float32, device=device).view(-1, cfg.n)
    lengths = rollout.response_lengths.float().view(-1, cfg.n)
    valid = batch["valid"].bool()
    return rewards_t[valid], lengths[valid]


def evaluate(
    actor: nn.Module,
    tokenizer: Any,
    task: Task,
    cfg: EvalConfig | None = None,
    *,
    max_prompt_length: int = 1024,
    engine: Any = None,
    score_timeout: float | None = 600.0,
    score_isolation: str = "auto",
) -> dict[str, float]:
    """Run the evaluation protocol on ``task.val_examples()`` (one process).

    ``task.score`` goes through the same :class:`~tre_lightning.tasks.guard.RewardGuard`
    as training (``score_timeout``: seconds per call, > 0, or None;
    ``score_isolation``: auto, process or thread): a reward function that
    raises, hangs or returns bad values scores those responses 0 (with a
    warning) instead of stopping the evaluation.

    Returns:
        ``val/pass@k`` (binary tasks), ``val/reward``, ``val/response_length``,
        ``prompts`` and ``samples``.
    """
    from tre_lightning.tasks.guard import RewardGuard

    cfg = cfg if cfg is not None else EvalConfig()
    with RewardGuard(task, timeout=score_timeout, name="tre-eval", isolation=score_isolation) as guard:
        return _evaluate(actor, tokenizer, task, cfg, max_prompt_length, engine, guard.as_task())


def _evaluate(actor: nn.Module, tokenizer: Any, task: Task, cfg: EvalConfig, max_prompt_length: int, engine: Any,
              scorer: Any) -> dict[str, float]:
    from tre_lightning.rollout.hf import HFGenerateEngine
    from tre_lightning.training.data import PromptBatches

    examples = task.val_examples()
    if cfg.max_examples is not None:
        examples = examples[: cfg.max_examples]
    batches = PromptBatches(examples, task, tokenizer, cfg.batch_size, max_prompt_length=max_prompt_length,
                            shuffle=False, drop_last=False, rank=0, world_size=1)
    engine = engine if engine is not None else HFGenerateEngine()
    engine.sync_weights(actor)
    device = next(actor.parameters()).device
    metrics = build_eval_metrics(task, cfg).to(device)
    prompts = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            rewards, lengths = score_batch(engine, tokenizer, scorer, batch, cfg)
            update_eval_metrics(metrics, rewards, lengths)
            prompts += rewards.shape[0]
    out = {metric_name(k): float(m.compute()) for k, m in metrics.items()}
    out["prompts"] = float(prompts)
    out["samples"] = float(prompts * cfg.n)
    return out
