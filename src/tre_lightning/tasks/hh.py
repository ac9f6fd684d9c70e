"""The HH task (helpful and harmless): UltraFeedback prompts scored by a reward model.

Prompt (paper, appendix A.1): the user turn only, ``User: {problem}``, i.e.
``[{"role": "user", "content": prompt}]`` rendered by the policy tokenizer's
chat template. The paper caps responses at 1,024 tokens.

Reward: the scalar output of a reward model, a sequence classifier with one
label (``AutoModelForSequenceClassification``) loaded from a local folder
(for example one written by ``tre-train-rm``), computed on prompt + response
rendered with the *reward model's own* tokenizer and chat template, in
batches, optionally quantised to 4 bits (bitsandbytes NF4, storage dtype =
parameter dtype so that FSDP can shard it). The model is loaded on first use.

Data: rows with a prompt column (``prompt`` by default; ``instruction`` in
the raw UltraFeedback release) from local files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tre_lightning import checks
from tre_lightning.tasks.base import Example, Messages
from tre_lightning.tasks._splits import PathSplits
from tre_lightning.tasks.data_io import load_rows, nonempty_str
from tre_lightning.tasks.timeouts import GraderStats

log = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str) -> Any:
    """``"auto"`` -> bfloat16 on a CUDA device with bf16 support, else float32."""
    import torch

    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def resolve_device(device: str) -> str:
    """``"auto"`` -> the current CUDA device when there is one, else ``"cpu"``."""
    import torch

    if device == "auto":
        # the current device: under DDP/FSDP each rank's own GPU (Lightning sets it)
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return device


def _check_device(device: Any) -> None:
    """``"auto"`` or a torch device string (``cpu``, ``cuda``, ``cuda:N``, ...)."""
    import torch

    ok = device == "auto"
    if not ok and isinstance(device, str):
        try:
            torch.device(device)
            ok = True
        except (RuntimeError, ValueError):
            ok = False
    if not ok:
        raise checks.ArgumentError("device", "'auto', 'cpu', 'cuda' or 'cuda:N' (N >= 0)", device)


class RewardModelScorer:
    """Batched scalar rewards from a local sequence-classification model.

    Args:
        path: folder with the model and its tokenizer (``save_pretrained``).
        batch_size: sequences per forward pass (>= 1).
        max_length: tokens per prompt + response; longer inputs keep their
            last ``max_length`` tokens (the classifier reads the last token).
        load_in_4bit: quantise the weights with bitsandbytes NF4.
        dtype: ``auto`` | ``float32`` | ``bfloat16`` | ``float16`` (compute and
            4-bit storage dtype).
        device: ``auto`` (the current CUDA device when available, so each
            rank uses its own GPU) or a torch device string.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 8,
        max_length: int = 2048,
        load_in_4bit: bool = False,
        dtype: str = "auto",
        device: str = "auto",
    ) -> None:
        self.batch_size = checks.integer("batch_size", batch_size, 1)
        self.max_length = checks.integer("max_length", max_length, 8)
        self.load_in_4bit = checks.boolean("load_in_4bit", load_in_4bit)
        checks.one_of("dtype", dtype, _DTYPES)
        _check_device(device)
        self.path = str(path)
        self.dtype = dtype
        self.device = device
        self.model: Any = None
        self.tokenizer: Any = None

    def load(self) -> None:
        """Load the model and tokenizer (idempotent)."""
        if self.model is not None:
            return
        from pathlib import Path

        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(self.path).expanduser().exists():
            raise FileNotFoundError(f"reward_model_path: {self.path!r} does not exist")
        dtype = resolve_dtype(self.dtype)
        device = resolve_device(self.device)
        tokenizer = AutoTokenizer.from_pretrained(self.path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.truncation_side = "left"
        # Right padding: a causal model's last real token then sees exactly the
        # unpadded sequence (positions included), so rewards do not depend on batching.
        tokenizer.padding_side = "right"
        if self.load_in_4bit:
            # NF4 with quant storage = parameter dtype (see tre_lightning.models.quant)
            from tre_lightning.models.quant import load_frozen_4bit

            model = load_frozen_4bit(
                self.path, model_class=AutoModelForSequenceClassification, dtype=dtype, device=device, num_labels=1
            )
        else:
            model = AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=1, dtype=dtype)
            model.to(device)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        model.eval()
        model.requires_grad_(False)
        self.model, self.tokenizer = model, tokenizer
        self._device = torch.device(device)

    def _texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        texts = []
        for prompt, response in zip(prompts, responses):
            chat = [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(response)}]
            if getattr(self.tokenizer, "chat_template", None):
                texts.append(self.tokenizer.apply_chat_template(chat, tokenize=False))
            else:
                texts.append(f"User: {prompt}\n\nAssistant: {response}")
        return texts

    def _forward(self, texts: list[str]) -> list[float]:
        import torch

        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=False,
            return_tensors="pt",
        ).to(self._device)
        with torch.inference_mode():
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        return logits[:, 0].float().cpu().tolist()

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], stats: GraderStats | None = None
    ) -> list[float]:
        """Rewards for (prompt, response) pairs. A batch that fails is retried
        item by item; an item that still fails scores 0 (counted in ``stats``)."""
        self.load()
        stats = stats or GraderStats()
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            p = prompts[start : start + self.batch_size]
            r = responses[start : start + self.batch_size]
            stats.add("checks", len(p))
            try:
                out.extend(self._forward(self._texts(p, r)))
                continue
            except Exception:  # noqa: BLE001
                log.warning("reward-model batch failed; retrying item by item", exc_info=True)
            for prompt, response in zip(p, r):
                try:
                    out.extend(self._forward(self._texts([prompt], [response])))
                except Exception:  # noqa: BLE001
                    log.warning("reward-model item failed; reward 0", exc_info=True)
                    stats.add("errors")
                    out.append(0.0)
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["model"] = None  # reloaded lazily in the receiving process
        state["tokenizer"] = None
        state.pop("_device", None)
        return state


class HHTask(PathSplits):
    """HH (UltraFeedback prompts + reward model) behind the Task protocol.

    Args:
        reward_model_path: folder of the reward model and its tokenizer
            (``None``: ``score`` raises; prompts still work).
        train_path, val_path: files or folders with a prompt column.
        train_size, val_size: rows drawn (seeded); ``None`` = all. Defaults 7,500 / 5,000.
        seed: seed of the subsampling.
        prompt_key: column with the user prompt (``prompt``; ``instruction``
            for the raw UltraFeedback files).
        batch_size: reward-model batch size (>= 1).
        max_length: reward-model input tokens (>= 8), truncated from the left.
        load_in_4bit: load the reward model in 4-bit NF4 (bitsandbytes).
        dtype: ``auto`` | ``float32`` | ``bfloat16`` | ``float16``.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        max_response_tokens: generation budget of the paper (1,024); read by the trainer.
    """

    score_isolation = "thread"  # the reward model runs on the trainer's GPU (a worker would load another copy)

    name = "hh"
    binary_reward = False
    _owner = "HHTask"
    _path_hint = "a file or folder of prompts"

    def __init__(
        self,
        reward_model_path: str | None = None,
        train_path: str | None = None,
        val_path: str | None = None,
        train_size: int | None = 7500,
        val_size: int | None = 5000,
        seed: int = 0,
        prompt_key: str = "prompt",
        batch_size: int = 8,
        max_length: int = 2048,
        load_in_4bit: bool = False,
        dtype: str = "auto",
        device: str = "auto",
        max_response_tokens: int = 1024,
    ) -> None:
        checks.optional(checks.integer, "train_size", train_size, 1)
        checks.optional(checks.integer, "val_size", val_size, 1)
        checks.integer("seed", seed)
        self.prompt_key = checks.text("prompt_key", prompt_key)
        self.max_response_tokens = checks.integer("max_response_tokens", max_response_tokens, 1)
        checks.optional(checks.text, "reward_model_path", reward_model_path)
        self._init_splits(train_path, val_path, train_size, val_size, seed)
        self.reward_model_path = reward_model_path
        # Validates batch_size / max_length / dtype now, loads nothing.
        self.scorer = RewardModelScorer(
            reward_model_path or "", batch_size=batch_size, max_length=max_length,
            load_in_4bit=load_in_4bit, dtype=dtype, device=device,
        )
        self.stats = GraderStats()

    def _read_split(self, split: str, path: str) -> list[dict[str, Any]]:
        key = self.prompt_key

        def normalise(row: dict[str, Any]) -> dict[str, Any]:
            row["prompt"] = row[key]
            return row

        return load_rows(path, columns={key: nonempty_str}, parameter=f"{split}_path", check=normalise)

    def messages(self, example: Example) -> Messages:
        return [{"role": "user", "content": str(example["prompt"])}]

    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> list[float]:
        if len(examples) != len(responses):
            raise ValueError(f"score: {len(examples)} examples but {len(responses)} responses")
        if self.reward_model_path is None:
            raise ValueError("HHTask: reward_model_path is not set (a folder written by tre-train-rm)")
        prompts = [str(ex["prompt"]) for ex in examples]
        return self.scorer(prompts, [str(r) for r in responses], self.stats)

    def failure_counts(self) -> dict[str, int]:
        """Counters of this process: checks, timeouts (always 0), errors, failures."""
        return self.stats.as_dict()

    def reset_failure_counts(self) -> None:
        self.stats.reset()
