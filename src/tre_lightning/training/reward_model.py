"""Reward-model training for the HH task: Bradley-Terry on preference pairs.

What the paper did (appendix A.1, with TRL's reward trainer): a sequence
classifier with one output on top of the Instruct model, trained on
UltraFeedback preference pairs for 3 epochs, learning rate 1e-5, cosine
schedule with 10 % warm-up, center-rewards coefficient 0.01, global batch 512.
The loss per pair is

    -log σ(r_chosen - r_rejected) + 0.01 · (r_chosen + r_rejected)²

(the second term keeps the rewards centred on 0). Pairwise accuracy is the
fraction of pairs with r_chosen > r_rejected.

* :class:`PreferenceDataModule` reads local UltraFeedback-style rows
  (``prompt``, ``chosen``, ``rejected``; chosen / rejected either response
  strings or whole conversations as lists of ``{"role", "content"}``) and
  renders them with the model's chat template.
* :class:`RewardModelModule` trains the classifier and, with ``save_dir``,
  writes model + tokenizer there at the end of ``fit`` (the folder
  :class:`~tre_lightning.tasks.HHTask` loads).

Entry points: ``tre-train-rm`` (Hydra, ``conf/train_rm.yaml``) and the
Lightning CLI, ``python -m tre_lightning.training.reward_model fit --model.model_path …
--data.train_path … --data.tokenizer_path …``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from tre_lightning.tasks.data_io import DataError, any_str, disjoint_split, load_rows, subsample

log = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------- loss
def bradley_terry_loss(chosen: Tensor, rejected: Tensor, center_rewards_coefficient: float = 0.01) -> Tensor:
    """Mean Bradley-Terry loss with the center-rewards term.

    Args:
        chosen: (B,) rewards of the preferred responses.
        rejected: (B,) rewards of the other responses.
        center_rewards_coefficient: weight of ``mean((chosen + rejected)^2)`` (>= 0).

    Returns:
        Scalar ``-mean(log σ(chosen - rejected)) + c · mean((chosen + rejected)²)``.
    """
    loss = -F.logsigmoid(chosen - rejected).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


# --------------------------------------------------------------------------- data
def _conversation_or_text(value: Any) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("empty response")
        return value
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and value:
        out = []
        for i, msg in enumerate(value):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(
                msg.get("content"), str
            ):
                raise TypeError(f"message {i} is not a {{'role': str, 'content': str}} object")
            out.append({"role": msg["role"], "content": msg["content"]})
        if out[-1]["role"] != "assistant":
            raise ValueError("the conversation must end with an assistant message")
        return out
    raise TypeError(f"expected a response string or a list of messages, got {type(value).__name__}")


def load_preferences(
    path: str,
    parameter: str = "train_path",
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
) -> list[dict[str, Any]]:
    """Rows ``{"chosen": conversation, "rejected": conversation}`` from a preference file.

    Raises:
        FileNotFoundError, DataError: located problems (file, row, column).
    """

    def to_conversations(row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, name in ((chosen_key, "chosen"), (rejected_key, "rejected")):
            value = row[key]
            if isinstance(value, str):
                prompt = row.get(prompt_key)
                if not isinstance(prompt, str) or not prompt.strip():
                    raise DataError(
                        f"a non-empty prompt is needed when '{key}' is a response string", column=prompt_key
                    )
                value = [{"role": "user", "content": prompt}, {"role": "assistant", "content": value}]
            out[name] = value
        return out

    return load_rows(
        path,
        columns={chosen_key: _conversation_or_text, rejected_key: _conversation_or_text},
        optional={prompt_key: any_str},
        parameter=parameter,
        check=to_conversations,
    )


def render(tokenizer: Any, conversation: list[dict[str, str]]) -> str:
    """A conversation as text through the tokenizer's chat template (plain fallback)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in conversation)


class PreferenceDataset(Dataset):
    """Tokenises preference pairs lazily (works in DataLoader workers)."""

    def __init__(self, rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int) -> None:
        self.rows = list(rows)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def __len__(self) -> int:
        return len(self.rows)

    def _ids(self, conversation: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer(render(self.tokenizer, conversation), add_special_tokens=False)["input_ids"]
        return list(ids[-self.max_length :])  # keep the end: the classifier reads the last token

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        row = self.rows[index]
        return {"chosen": self._ids(row["chosen"]), "rejected": self._ids(row["rejected"])}


class PreferenceCollator:
    """Pads chosen and rejected sequences into one (2B, L) batch: rows [0, B) are chosen."""

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side

    def __call__(self, items: Sequence[dict[str, list[int]]]) -> dict[str, Tensor]:
        seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if self.padding_side == "right":
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, : len(s)] = 1
            else:
                ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[i, width - len(s) :] = 1
        return {"input_ids": ids, "attention_mask": mask}


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    if not Path(path).expanduser().exists():
        raise FileNotFoundError(f"tokenizer_path / model_path: {path!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class PreferenceDataModule(pl.LightningDataModule):
    """UltraFeedback-style preference pairs from local files.

    Args:
        train_path: file or folder of rows with ``prompt``, ``chosen``, ``rejected``.
        tokenizer_path: folder of the tokenizer (normally the model's).
        val_path: evaluation file or folder; ``None`` with ``val_size``: a
            disjoint seeded hold-out of the training data; ``None`` without:
            no validation.
        train_size, val_size: rows used (seeded); ``None`` = all.
        max_length: tokens per conversation (>= 8); longer ones keep their end.
        batch_size: pairs per batch (>= 1); the model sees 2 × batch_size sequences.
        num_workers: DataLoader workers (>= 0).
        seed: seed of subsampling and splitting.
        prompt_key, chosen_key, rejected_key: column names.
    """

    def __init__(
        self,
        train_path: str,
        tokenizer_path: str,
        val_path: str | None = None,
        train_size: int | None = None,
        val_size: int | None = None,
        max_length: int = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        prompt_key: str = "prompt",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
    ) -> None:
        super().__init__()
        for name, value in (("train_size", train_size), ("val_size", val_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None (all rows) or >= 1, got {value}")
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.train_path, self.val_path, self.tokenizer_path = train_path, val_path, tokenizer_path
        self.train_size, self.val_size = train_size, val_size
        self.max_length, self.batch_size, self.num_workers = int(max_length), int(batch_size), int(num_workers)
        self.seed = int(seed)
        self.keys = {"prompt_key": prompt_key, "chosen_key": chosen_key, "rejected_key": rejected_key}
        self.tokenizer: Any = None
        self.train_rows: list[dict[str, Any]] = []
        self.val_rows: list[dict[str, Any]] = []

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        rows = load_preferences(self.train_path, "train_path", **self.keys)
        if self.val_path is not None:
            self.train_rows = subsample(rows, self.train_size, self.seed, f"train_path {self.train_path}")
            val = load_preferences(self.val_path, "val_path", **self.keys)
            self.val_rows = subsample(val, self.val_size, self.seed, f"val_path {self.val_path}")
        elif self.val_size is not None:
            self.train_rows, self.val_rows = disjoint_split(
                rows, self.train_size, self.val_size, self.seed, f"train_path {self.train_path}"
            )
        else:
            self.train_rows = subsample(rows, self.train_size, self.seed, f"train_path {self.train_path}")

    def _loader(self, rows: list[dict[str, Any]], shuffle: bool) -> DataLoader:
        # right padding: rewards of a causal classifier then do not depend on batching
        collate = PreferenceCollator(self.tokenizer.pad_token_id, "right")
        return DataLoader(
            PreferenceDataset(rows, self.tokenizer, self.max_length),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_rows, shuffle=False) if self.val_rows else []


# --------------------------------------------------------------------------- module
class RewardModelModule(pl.LightningModule):
    """Trains a one-output sequence classifier with the Bradley-Terry loss.

    Args:
        model_path: local folder of a Hugging Face model (a causal LM such as
            the Instruct policy, or a classifier); a fresh one-output ``score``
            head is added when missing. Its tokenizer must be in the same folder.
        lr: AdamW learning rate (> 0; paper 1e-5).
        weight_decay: AdamW weight decay (>= 0).
        warmup_ratio: fraction of the optimizer steps with linear warm-up,
            then cosine decay to 0, in [0, 1) (paper 0.1).
        center_rewards_coefficient: weight of the centering term (>= 0; paper 0.01).
        dtype: parameter dtype, ``float32`` | ``bfloat16`` | ``float16``.
        save_dir: where to write model + tokenizer (``save_pretrained``) at the
            end of ``fit`` (rank 0); ``None`` = do not write.
        gradient_checkpointing: trade compute for memory.

    Logs ``train/loss``, ``train/accuracy``, ``train/reward_mean``,
    ``val/loss``, ``val/accuracy`` (pairwise), ``val/reward_mean``.
    """

    def __init__(
        self,
        model_path: str,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        center_rewards_coefficient: float = 0.01,
        dtype: str = "float32",
        save_dir: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_tokenizer(model_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1, dtype=getattr(torch, dtype)
        )
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps per-module modes

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, L) token ids -> (N,) scalar rewards."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()

    def _pair_rewards(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        rewards = self(batch["input_ids"], batch["attention_mask"])
        half = rewards.shape[0] // 2
        return rewards[:half], rewards[half:]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        chosen, rejected = self._pair_rewards(batch)
        loss = bradley_terry_loss(chosen, rejected, self.hparams.center_rewards_coefficient)
        n = chosen.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/accuracy", (chosen > rejected).float().mean(), prog_bar=True, batch_size=n)
        self.log("train/reward_mean", torch.cat([chosen, rejected]).mean().detach(), batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # Epoch values are means weighted by batch size (Lightning's result collection),
        # averaged across processes; plain tensors, so validate() before fit() is fine.
        chosen, rejected = self._pair_rewards(batch)
        n = chosen.shape[0]
        loss = bradley_terry_loss(chosen, rejected, self.hparams.center_rewards_coefficient)
        self.log("val/loss", loss, batch_size=n, sync_dist=True)
        self.log("val/accuracy", (chosen > rejected).float().mean(), prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/reward_mean", torch.cat([chosen, rejected]).mean(), batch_size=n, sync_dist=True)

    def configure_optimizers(self) -> Any:
        from transformers import get_cosine_schedule_with_warmup

        optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(math.ceil(self.hparams.warmup_ratio * total))
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def save_pretrained(self, path: str) -> None:
        """Write model and tokenizer (the folder :class:`HHTask` loads)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def on_fit_end(self) -> None:
        save_dir = self.hparams.save_dir
        if save_dir and self.trainer.is_global_zero:
            self.save_pretrained(save_dir)
            log.info("reward model written to %s", save_dir)


def cli_main(args: Sequence[str] | None = None) -> Any:
    """Lightning CLI over :class:`RewardModelModule` and :class:`PreferenceDataModule`."""
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(RewardModelModule, PreferenceDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":  # pragma: no cover
    cli_main()
