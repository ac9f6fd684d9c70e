"""What the PPO module hands to the callbacks after each training step.

``training_step`` returns ``{"metrics": {name: float}, "rollout": Rollout, "samples": {"prompt":
[...], "response": [...], "reward": [...]}}``; Lightning passes it to
``on_train_batch_end`` as ``outputs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def step_metrics(outputs: Any) -> dict[str, float]:
    """The step's scalar diagnostics (empty if the step returned none)."""
    if isinstance(outputs, Mapping) and isinstance(outputs.get("metrics"), Mapping):
        return {str(k): float(v) for k, v in outputs["metrics"].items()}
    return {}


def step_samples(outputs: Any) -> dict[str, list[Any]]:
    """The step's prompt / response / reward columns (empty if none)."""
    if isinstance(outputs, Mapping) and isinstance(outputs.get("samples"), Mapping):
        return {str(k): list(v) for k, v in outputs["samples"].items()}
    return {}
