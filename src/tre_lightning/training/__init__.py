"""Training: the PPO loop as plain objects, and the Lightning pieces that drive it.

- :mod:`.config`: :class:`RolloutConfig`, :class:`PPOConfig`, :class:`OptimConfig`.
- :mod:`.loop`: :class:`PPOLearner`, one PPO iteration without a Trainer.
- :mod:`.policy_loss`: the surrogate plus the regularizers for one micro-batch.
- :mod:`.module`: :class:`PPOModule`, the LightningModule.
- :mod:`.data`: :class:`PromptDataModule`, prompts and loaders.
- :mod:`.resume`: RNG and data position for exact resumes.
- :mod:`.optim`, :mod:`.adamw8bit`: optimizers and schedules.
- :mod:`.checkpoint_io`: atomic checkpoint files.
- :mod:`.export`: the actor as an HF model folder.
- :mod:`.reward_model`: the HH task's reward-model trainer.
"""

from tre_lightning.training.config import OptimConfig, PPOConfig, RolloutConfig
from tre_lightning.training.data import PromptDataModule
from tre_lightning.training.loop import IterationResult, NonFiniteError, PPOLearner, Runtime
from tre_lightning.training.module import PPOModule

__all__ = [
    "IterationResult",
    "NonFiniteError",
    "OptimConfig",
    "PPOConfig",
    "PPOLearner",
    "PPOModule",
    "PromptDataModule",
    "RolloutConfig",
    "Runtime",
]
