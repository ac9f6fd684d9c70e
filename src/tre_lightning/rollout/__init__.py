"""Rollout engines behind one protocol (:class:`RolloutEngine`): HF generate
(default, runs everywhere); the vLLM engine is an optional GPU extra."""

from tre_lightning.rollout.base import Rollout, RolloutEngine, SamplingParams
from tre_lightning.rollout.experience import Experience
from tre_lightning.rollout.hf import HFGenerateEngine, response_mask_from_eos

__all__ = ["Experience", "HFGenerateEngine", "Rollout", "RolloutEngine", "SamplingParams", "response_mask_from_eos"]
