"""Prompts for PPO: task examples rendered with the tokenizer's chat template, left-padded.

:class:`PromptDataModule` (a ``LightningDataModule``) owns the training and
validation prompts and their loaders, and the training data position
(checkpointed with its state, so a resumed run continues with the next
unseen batch).

:class:`PromptBatches` is an iterable dataset that yields whole batches (use it
with ``DataLoader(batch_size=None)``). Its order is a seeded permutation per
epoch, sharded across data-parallel processes, and its position
(epoch, batch) can be set, so a resumed run continues with exactly the
prompts the uninterrupted run would have seen. Each batch says where it came
from (``epoch``, ``batch``, dataset ``index``), so the module records the
position of the last batch it *processed* (not the one the loader prefetched).

Lightning does not touch the sampling of an iterable dataset (no distributed
sampler is injected); the sharding is done here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedTokenizerBase

from tre_lightning.tasks.base import Example, Task
from tre_lightning.training.resume import DataPosition

__all__ = ["PromptBatches", "PromptDataModule", "check_task_data", "prompt_loader", "render_prompts"]


def check_task_data(task: Task, batch_size: int) -> None:
    """Load both splits now and refuse a run that cannot start (before any model is built).

    The task's own :class:`~tre_lightning.tasks.data_io.DataError` (file,
    row, column) passes through; an empty split or fewer training examples
    than one batch is a :class:`~tre_lightning.checks.ConfigError` under ``task``.
    """
    from tre_lightning.checks import ConfigError
    from tre_lightning.tasks.data_io import DataError

    for split in ("train", "val"):
        try:
            rows = getattr(task, f"{split}_examples")()
        except DataError:
            raise
        except ConfigError as err:
            raise err.under("task") from None
        except FileNotFoundError as err:
            raise ConfigError(f"task.{split}_path", str(err)) from None
        except ValueError as err:
            raise ConfigError("task", f"{split} split: {err}") from None
        if rows is None or len(rows) == 0:
            raise ConfigError("task", f"the {split} split is empty (at least 1 example needed)")
        if split == "train" and len(rows) < batch_size:
            raise ConfigError("task", f"the train split has {len(rows)} examples, fewer than one batch "
                                      f"(ppo.batch_size={batch_size}); allowed: batch_size <= {len(rows)}")


def render_prompts(
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    max_prompt_length: int,
    overflow: str = "truncate_left",
) -> tuple[Tensor, Tensor, int]:
    """Chat-template the task's messages and left-pad them.

    Args:
        tokenizer: with a chat template and a pad token.
        task: gives ``messages(example)``.
        examples: the batch's rows.
        max_prompt_length: longest prompt in tokens, >= 1.
        overflow: ``truncate_left`` (keep the last tokens) or ``error``.

    Returns:
        (input_ids (B, P), attention_mask (B, P), number of truncated prompts).
    """
    texts = [
        tokenizer.apply_chat_template(task.messages(ex), add_generation_prompt=True, tokenize=False)
        for ex in examples
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    truncated = 0
    rows: list[list[int]] = []
    for i, ids in enumerate(encoded):
        ids = list(ids)
        if len(ids) > max_prompt_length:
            if overflow == "error":
                raise ValueError(
                    f"prompt {i} of the batch has {len(ids)} tokens > max_prompt_length={max_prompt_length} "
                    "(RolloutConfig.prompt_overflow='error'; use 'truncate_left' or raise the limit)"
                )
            ids = ids[-max_prompt_length:]
            truncated += 1
        if not ids:
            raise ValueError(f"prompt {i} of the batch rendered to zero tokens")
        rows.append(ids)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(rows)} prompts were longer than max_prompt_length={max_prompt_length} "
            "tokens and were truncated on the left",
            stacklevel=2,
        )
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask, truncated


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PromptBatches(IterableDataset):
    """Batches of rendered prompts; one ``iter()`` is one epoch.

    Training (``shuffle=True, drop_last=True``): every epoch is a fresh
    permutation from ``seed + epoch``; each step takes ``batch_size ×
    world_size`` examples and this process keeps its ``batch_size`` slice.
    Evaluation (``shuffle=False, drop_last=False``): all examples in order;
    the last step is padded by repeating examples, marked ``valid = 0``, so
    every process runs the same number of steps (needed by synchronised
    generation) and padded rows are not counted.

    Yields dicts with ``input_ids`` (B, P), ``attention_mask`` (B, P),
    ``index`` (B,) dataset indices, ``examples`` (the B rows), ``valid``
    (B,) 1/0, ``truncated`` (int), ``epoch`` and ``batch`` (ints).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        task: Task,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        *,
        max_prompt_length: int,
        prompt_overflow: str = "truncate_left",
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        position: DataPosition | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        default_rank, default_world = _rank_world()
        self.examples = examples
        self.task = task
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        self.prompt_overflow = prompt_overflow
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.position = position if position is not None else DataPosition()
        n_batches = len(self)
        if drop_last and n_batches == 0:
            raise ValueError(
                f"{len(examples)} examples are fewer than one batch of batch_size × world_size = "
                f"{batch_size} × {self.world_size}; lower the batch size or use more examples"
            )

    def __len__(self) -> int:
        step = self.batch_size * self.world_size
        n = len(self.examples)
        return n // step if self.drop_last else math.ceil(n / step)

    def _order(self, epoch: int) -> list[int]:
        n = len(self.examples)
        if not self.shuffle:
            return list(range(n))
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(n, generator=gen).tolist()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start = self.position.epoch, self.position.batch
        # the next iter() is the next epoch, from its beginning
        self.position = DataPosition(epoch=epoch + 1, batch=0)
        order = self._order(epoch)
        step = self.batch_size * self.world_size
        n = len(order)
        for b in range(start, len(self)):
            lo = b * step + self.rank * self.batch_size
            idx = [order[(lo + j) % n] for j in range(self.batch_size)]
            valid = [1 if lo + j < n else 0 for j in range(self.batch_size)]
            rows = [self.examples[i] for i in idx]
            input_ids, attention_mask, truncated = render_prompts(
                self.tokenizer, self.task, rows, self.max_prompt_length, self.prompt_overflow
            )
            yield {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "index": torch.tensor(idx, dtype=torch.long),
                "examples": rows,
                "valid": torch.tensor(valid, dtype=torch.long),
                "truncated": truncated,
                "epoch": epoch,
                "batch": b,
            }


def prompt_loader(dataset: PromptBatches) -> DataLoader:
    """A DataLoader that passes :class:`PromptBatches`' batches through unchanged."""
    return DataLoader(dataset, batch_size=None, num_workers=0)


class PromptDataModule(LightningDataModule):
    """Training and validation prompts of a task, and where training stands in them.

    Training batches come in a seeded order per epoch (``seed + epoch``),
    ``batch_size`` prompts per process; validation batches cover the first
    ``val_max_examples`` test prompts (all when None) in order. The position of
    the last training batch handed to the training step is checkpointed
    (``state_dict``), so a resumed run continues with the next unseen batch.

    Args:
        task: gives the examples and renders them (``messages``).
        tokenizer: with a chat template and a pad token.
        batch_size: training prompts per step and process, >= 1.
        max_prompt_length: longest prompt in tokens, >= 1.
        prompt_overflow: ``truncate_left`` or ``error``.
        seed: seeds the training order.
        val_batch_size: validation prompts per step, >= 1.
        val_max_examples: validate on the first this many test prompts, or None.
    """

    def __init__(
        self,
        task: Task,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        max_prompt_length: int,
        prompt_overflow: str = "truncate_left",
        seed: int = 0,
        val_batch_size: int = 8,
        val_max_examples: int | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        self.prompt_overflow = prompt_overflow
        self.seed = seed
        self.val_batch_size = val_batch_size
        self.val_max_examples = val_max_examples
        self.position = DataPosition()

    @classmethod
    def for_module(cls, module: Any) -> PromptDataModule:
        """The data a :class:`~tre_lightning.training.module.PPOModule` trains and validates on."""
        return cls(
            module.task,
            module.tokenizer,
            module.ppo.batch_size,
            module.rollout.max_prompt_length,
            module.rollout.prompt_overflow,
            module.seed,
            module.evaluation.batch_size,
            module.evaluation.max_examples,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = PromptBatches(
            self.task.train_examples(),
            self.task,
            self.tokenizer,
            self.batch_size,
            max_prompt_length=self.max_prompt_length,
            prompt_overflow=self.prompt_overflow,
            shuffle=True,
            drop_last=True,
            seed=self.seed,
            position=DataPosition(self.position.epoch, self.position.batch),
        )
        if dataset.position.batch >= len(dataset):  # saved at the very end of an epoch
            dataset.position = DataPosition(dataset.position.epoch + 1, 0)
        return prompt_loader(dataset)

    def val_dataloader(self) -> DataLoader:
        examples = self.task.val_examples()
        if self.val_max_examples is not None:
            examples = examples[: self.val_max_examples]
        dataset = PromptBatches(
            examples,
            self.task,
            self.tokenizer,
            self.val_batch_size,
            max_prompt_length=self.max_prompt_length,
            prompt_overflow=self.prompt_overflow,
            shuffle=False,
            drop_last=False,
        )
        return prompt_loader(dataset)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position after the training batch Lightning hands to the step (not a prefetched one)."""
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "epoch" in batch:
            self.position = DataPosition(epoch=int(batch["epoch"]), batch=int(batch["batch"]) + 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"data_position": self.position.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the position is restored here (the loader restarts from it), so Lightning's
        # generic warning about non-resumable loaders does not apply
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        self.position = DataPosition.from_state_dict(state_dict["data_position"])
