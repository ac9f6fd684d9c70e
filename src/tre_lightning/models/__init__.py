"""Building actor, critic and reference models: sources (local folder or random
init), the value model and the shared value head, and the :class:`ActorCritic` container."""

from tre_lightning.models.actor_critic import ActorCritic
from tre_lightning.models.lora import LoraSettings
from tre_lightning.models.critic import ValueHead, ValueModel, position_ids_from_mask
from tre_lightning.models.source import ModelSource, PretrainedSource, TinyRandomSource, load_tokenizer, resolve_dtype

__all__ = [
    "ActorCritic",
    "LoraSettings",
    "ModelSource",
    "PretrainedSource",
    "TinyRandomSource",
    "ValueHead",
    "ValueModel",
    "load_tokenizer",
    "position_ids_from_mask",
    "resolve_dtype",
]
