"""The scored rollout batch that the PPO epochs iterate over, and its splitting.

An :class:`Experience` holds N sequences (prompt + response) with everything
the losses need: behaviour log-probs, rollout values, advantages, returns.
``select`` takes rows (a shuffled mini-batch), ``micro_batches`` splits into
forward/backward chunks, ``trimmed`` drops response columns that are padding
in every row of the chunk (causal attention: later columns never influence
earlier ones, so the result is unchanged).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from tre_lightning.rollout.base import Rollout

__all__ = ["Experience"]


@dataclass
class Experience:
    """N scored sequences; P prompt columns (left-padded), R response columns (right-padded).

    Attributes:
        prompt_ids: (N, P).
        prompt_mask: (N, P).
        response_ids: (N, R).
        response_mask: (N, R) 1 on valid response tokens.
        old_log_probs: (N, R) behaviour log-probs.
        old_values: (N, R) critic values at rollout time.
        advantages: (N, R) (whitened when configured).
        returns: (N, R) value targets.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    old_log_probs: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor

    @classmethod
    def from_rollout(cls, rollout: Rollout, **targets: Tensor) -> Experience:
        """The rollout's tokens with the given targets (old_log_probs, old_values,
        advantages, returns); missing ones are zeros (e.g. before scoring)."""
        unknown = set(targets) - {"old_log_probs", "old_values", "advantages", "returns"}
        if unknown:
            raise TypeError(f"unknown Experience fields: {sorted(unknown)}")
        zeros = torch.zeros(rollout.response_ids.shape, dtype=torch.float32, device=rollout.response_ids.device)
        return cls(
            prompt_ids=rollout.prompt_ids,
            prompt_mask=rollout.prompt_mask,
            response_ids=rollout.response_ids,
            response_mask=rollout.response_mask,
            old_log_probs=targets.get("old_log_probs", zeros),
            old_values=targets.get("old_values", zeros),
            advantages=targets.get("advantages", zeros),
            returns=targets.get("returns", zeros),
        )

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def select(self, rows: Tensor) -> Experience:
        """The rows ``rows`` (a 1-D index tensor)."""
        return Experience(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def trimmed(self) -> Experience:
        """Drop trailing response columns that are padding in every row (keeps >= 1)."""
        longest = int(self.response_mask.sum(dim=1).max().item()) if len(self) else 1
        width = max(longest, 1)
        if width == self.response_ids.shape[1]:
            return self
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            out[f.name] = t if f.name.startswith("prompt") else t[:, :width]
        return Experience(**out)

    def micro_batches(self, size: int) -> Iterator[Experience]:
        """Consecutive chunks of ``size`` rows (the last may be smaller), each trimmed."""
        if size < 1:
            raise ValueError(f"micro-batch size must be >= 1, got {size}")
        for start in range(0, len(self), size):
            rows = torch.arange(start, min(start + size, len(self)), device=self.response_ids.device)
            yield self.select(rows).trimmed()
