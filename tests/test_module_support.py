"""Shared helpers for the training-core tests (no tests here).

- :class:`CharTask`: a tiny task in Python: "say <c>" prompts, reward = share
  of the response's characters equal to ``c`` (or binary: ``c`` appears).
- :class:`FixedEngine`: a rollout engine whose responses are a fixed function
  of the prompt (seeded by its tokens), with eos at varying positions, so
  two modules see exactly the same rollouts.
- :func:`tiny_module`: a PPOModule on a tiny random Qwen2.
- :func:`fit`: ``trainer.fit`` with the module's :class:`PromptDataModule`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tre_lightning.evaluation import EvalConfig
from tre_lightning.models import ActorCritic, TinyRandomSource
from tre_lightning.training import OptimConfig, PPOConfig, PromptDataModule, RolloutConfig
from tre_lightning.rollout.base import Rollout, SamplingParams

LETTERS = "abcdefghijklmnopqrstuvwx"


class CharTask:
    """Prompts "say <c>"; reward: fraction of response characters equal to c (binary: c appears)."""

    score_isolation = "thread"  # a few characters counted: no worker process needed (and none started)

    name = "char"

    def __init__(self, n_train: int = 8, n_val: int = 5, binary: bool = False, nan_reward: bool = False) -> None:
        self.binary_reward = binary
        self.nan_reward = nan_reward
        self._train = [{"q": f"say {c}", "a": c} for c in LETTERS[:n_train]]
        self._val = [{"q": f"say {c}", "a": c} for c in LETTERS[::-1][:n_val]]

    def train_examples(self) -> Sequence[dict[str, str]]:
        return self._train

    def val_examples(self) -> Sequence[dict[str, str]]:
        return self._val

    def messages(self, example: dict[str, str]) -> list[dict[str, str]]:
        return [{"role": "user", "content": example["q"]}]

    def score(self, examples: Sequence[dict[str, str]], responses: Sequence[str]) -> list[float]:
        if self.nan_reward:
            return [math.nan] * len(responses)
        out = []
        for ex, r in zip(examples, responses, strict=True):
            if self.binary_reward:
                out.append(1.0 if ex["a"] in r else 0.0)
            else:
                out.append(sum(ch == ex["a"] for ch in r) / max(1, len(r)))
        return out


class LengthTask(CharTask):
    """Reward = number of response characters / 10 (varied, deterministic rewards)."""

    def score(self, examples: Sequence[dict[str, str]], responses: Sequence[str]) -> list[float]:
        return [len(r) / 10 for r in responses]


class IndexTask(CharTask):
    """Binary reward 1 for even-position validation examples, 0 otherwise (known Pass@1)."""

    def __init__(self, n_val: int = 5) -> None:
        super().__init__(n_val=n_val, binary=True)

    def score(self, examples: Sequence[dict[str, str]], responses: Sequence[str]) -> list[float]:
        order = {ex["a"]: i for i, ex in enumerate(self._val)}
        return [1.0 if order.get(ex["a"], 1) % 2 == 0 else 0.0 for ex in examples]


class FixedEngine:
    """Deterministic rollouts: response tokens drawn from a generator seeded by the prompt tokens.

    Each row ends with eos after a length in [1, max_new_tokens] (row-dependent).
    Records every rollout it returns in ``rollouts``.
    """

    def __init__(self, vocab_size: int, eos_token_id: int, pad_token_id: int, low: int = 4) -> None:
        self.vocab_size = vocab_size
        self.eos = eos_token_id
        self.pad = pad_token_id
        self.low = low
        self.rollouts: list[Rollout] = []
        self.synced = 0

    def sync_weights(self, actor: torch.nn.Module) -> None:
        self.synced += 1

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams) -> Rollout:
        n, width = sampling.n, sampling.max_new_tokens
        rows, masks = [], []
        for i in range(prompt_ids.shape[0]):
            key = int((prompt_ids[i] * prompt_mask[i]).sum())
            for j in range(n):
                g = torch.Generator().manual_seed(key * 31 + j)
                length = int(torch.randint(1, width + 1, (1,), generator=g))
                tokens = torch.randint(self.low, self.vocab_size, (width,), generator=g)
                if length < width or j % 2 == 0:
                    tokens[length - 1] = self.eos
                mask = torch.zeros(width, dtype=torch.long)
                mask[:length] = 1
                tokens = torch.where(mask.bool(), tokens, torch.full_like(tokens, self.pad))
                rows.append(tokens)
                masks.append(mask)
        response = torch.stack(rows).to(prompt_ids.device)
        mask = torch.stack(masks).to(prompt_ids.device)
        rollout = Rollout(
            prompt_ids=prompt_ids.repeat_interleave(n, 0),
            prompt_mask=prompt_mask.repeat_interleave(n, 0),
            response_ids=response,
            response_mask=mask,
            response_lengths=mask.sum(1),
        )
        self.rollouts.append(rollout)
        return rollout


def tiny_source(**kwargs: Any) -> TinyRandomSource:
    defaults = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, seed=0)
    defaults.update(kwargs)
    return TinyRandomSource(**defaults)


def tiny_module(
    task: Any = None,
    regularizers: Any = None,
    engine: Any = None,
    *,
    n: int = 2,
    max_new_tokens: int = 6,
    batch_size: int = 4,
    mini_batch_size: int = 2,
    micro_batch_size: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    source: Any = None,
    **kwargs: Any,
):
    from tre_lightning.training import PPOModule

    ppo_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in PPOConfig.__dataclass_fields__}
    optim_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in OptimConfig.__dataclass_fields__}
    model_kwargs = {k: kwargs.pop(k) for k in list(kwargs)
                    if k in ("critic", "reference", "share_backbone", "gradient_checkpointing", "fsdp", "lora")}
    rollout_kwargs = dict(max_prompt_length=64)
    rollout_kwargs.update({k: kwargs.pop(k) for k in list(kwargs) if k in (
        "score_timeout", "score_isolation", "temperature", "top_p", "top_k", "max_prompt_length", "prompt_overflow")})
    optim_defaults = dict(actor_lr=lr, critic_lr=lr, critic_warmup_ratio=0.0)
    optim_defaults.update(optim_kwargs)
    return PPOModule(
        model=ActorCritic(source if source is not None else tiny_source(), **model_kwargs),
        task=task if task is not None else CharTask(),
        regularizers=regularizers,
        engine=engine,
        rollout=RolloutConfig(n=n, max_new_tokens=max_new_tokens, **rollout_kwargs),
        ppo=PPOConfig(batch_size=batch_size, mini_batch_size=mini_batch_size, micro_batch_size=micro_batch_size,
                      **ppo_kwargs),
        optim=OptimConfig(**optim_defaults),
        evaluation=EvalConfig(n=2, max_new_tokens=max_new_tokens, batch_size=2),
        seed=seed,
        **kwargs,
    )


def fixed_engine_for(source: TinyRandomSource) -> FixedEngine:
    tok = source.tokenizer()
    return FixedEngine(len(tok), tok.eos_token_id, tok.pad_token_id)


def fit(t: Any, module: Any, **kwargs: Any) -> Any:
    """``t.fit(module)`` on the module's prompts (``PromptDataModule.for_module``); returns ``t``."""
    t.fit(module, datamodule=PromptDataModule.for_module(module), **kwargs)
    return t


def validate(t: Any, module: Any, **kwargs: Any) -> Any:
    """``t.validate(module)`` on the module's validation prompts."""
    return t.validate(module, datamodule=PromptDataModule.for_module(module), **kwargs)


def trainer(tmp_path: Any = None, **kwargs: Any):
    import lightning as L

    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    if tmp_path is not None:
        defaults["default_root_dir"] = str(tmp_path)
    defaults.update(kwargs)
    return L.Trainer(**defaults)
