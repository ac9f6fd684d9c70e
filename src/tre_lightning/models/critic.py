"""Value models: a separate critic (backbone copy + scalar head) or a head shared on the actor.

The paper's critic is a full copy of the base model with a scalar value head
(anchor notes: "the critic is a full copy of the same Instruct model").
:class:`ValueModel` is that: the causal LM's backbone (``lm.base_model``,
e.g. ``Qwen2Model``; the LM head is dropped) and ``Linear(hidden, 1)``.
:class:`ValueHead` alone is the shared-backbone option: it reads the actor's
last hidden state, so actor and critic share every weight but the head.

Values are computed in float32 (the head is float32 whatever the backbone's
dtype), at the positions that predict the response tokens: ``V(s_t)`` for
response token ``t`` is read at sequence position ``P - 1 + t``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

__all__ = ["ValueHead", "ValueModel", "position_ids_from_mask"]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, L) positions that skip left padding, as HF ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ValueHead(nn.Module):
    """``Linear(hidden, 1)`` in float32, initialised small (std ``init_std``, bias 0).

    Args:
        hidden_size: width of the hidden states it reads, >= 1.
        init_std: std of the initial weights, > 0 (default 0.02: initial values near 0).
    """

    def __init__(self, hidden_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std}")
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B, T, H) hidden states -> (B, T) float32 values (outside autocast, in the head's dtype)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


class ValueModel(nn.Module):
    """A critic: transformer backbone + :class:`ValueHead`.

    Args:
        backbone: a HF base model (``AutoModel``-like) returning
            ``last_hidden_state``.
        init_std: std of the head's initial weights.
    """

    def __init__(self, backbone: PreTrainedModel, init_std: float = 0.02) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = ValueHead(int(backbone.config.hidden_size), init_std=init_std)

    @classmethod
    def from_causal_lm(cls, lm: PreTrainedModel, init_std: float = 0.02) -> ValueModel:
        """Keep the causal LM's backbone (``lm.base_model``), drop its LM head."""
        backbone = lm.base_model
        if backbone is lm:
            raise ValueError(f"{type(lm).__name__} exposes no separate backbone (base_model is the model itself)")
        return cls(backbone, init_std=init_std)

    @property
    def config(self):  # noqa: ANN201 - the backbone's HF config
        return self.backbone.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor, num_positions: int) -> Tensor:
        """Values at the last ``num_positions + 1`` positions but the final one.

        Args:
            input_ids: (B, L) prompt + response ids.
            attention_mask: (B, L).
            num_positions: R, the response length; the values returned are
                those of the positions ``L - R - 1 … L - 2``.

        Returns:
            (B, R) float32 values.
        """
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        hidden = out.last_hidden_state[:, -num_positions - 1 : -1]
        return self.value_head(hidden)
