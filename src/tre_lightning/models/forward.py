"""Forward passes over prompt + response that return only the response positions.

The logits that predict response token ``t`` sit at sequence position
``P - 1 + t``. The LM head is applied to those R positions only
(``logits_to_keep=R + 1``, then the last is dropped), so no (B, P + R, V)
tensor is built; the call goes through the model's own ``forward``, which
is what FSDP2 hooks (calling ``model.model`` and ``model.lm_head`` separately
would skip the root module's parameter gathering).
"""

from __future__ import annotations

from torch import Tensor, nn

from tre_lightning.models.critic import position_ids_from_mask

__all__ = ["policy_forward"]


def policy_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_response: int,
    temperature: float = 1.0,
    return_hidden: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logits (and optionally last hidden states) at the response positions.

    Args:
        model: a HF causal LM that accepts ``logits_to_keep``.
        input_ids: (B, L) left-padded prompt followed by the right-padded response.
        attention_mask: (B, L).
        num_response: R, the number of response columns at the end of ``input_ids``.
        temperature: the logits are divided by it (the sampling temperature), > 0.
        return_hidden: also return the final hidden states at those positions
            (the shared value head reads them).

    Returns:
        (logits (B, R, V), hidden (B, R, H) or None).
    """
    if num_response < 1:
        raise ValueError(f"num_response must be >= 1, got {num_response}")
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=num_response + 1,
        output_hidden_states=return_hidden,
    )
    logits = out.logits[:, -num_response - 1 : -1]
    if temperature != 1.0:
        logits = logits / temperature
    hidden = out.hidden_states[-1][:, -num_response - 1 : -1] if return_hidden else None
    return logits, hidden
