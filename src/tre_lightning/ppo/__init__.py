"""PPO maths as pure tensor functions (no Lightning): masked statistics, GAE,
the sampled-token KL estimators, token-level rewards, the clipped policy and value losses and
the loss aggregation modes. Every convention is listed in docs/ppo_details.md.

Shapes: B sequences, T response positions, right-padded; ``mask`` is (B, T)
with 1 on valid response tokens.
"""

from tre_lightning.ppo.aggregation import LOSS_AGGREGATIONS, LossAggregation, aggregate_loss, loss_normalizer
from tre_lightning.ppo.distributed import (
    AllReduce,
    global_loss_normalizer,
    global_masked_whiten,
    process_group_all_reduce,
)
from tre_lightning.ppo.gae import compute_gae
from tre_lightning.ppo.kl import KL_ESTIMATORS, KLEstimator, sampled_kl
from tre_lightning.ppo.losses import PolicyLossOutput, ValueLossOutput, clipped_policy_loss, clipped_value_loss
from tre_lightning.ppo.masked import masked_max, masked_mean, masked_sum, masked_var, masked_whiten
from tre_lightning.ppo.rewards import last_token_index, token_level_rewards

__all__ = [
    "AllReduce",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "KLEstimator",
    "LossAggregation",
    "PolicyLossOutput",
    "ValueLossOutput",
    "aggregate_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "compute_gae",
    "global_loss_normalizer",
    "global_masked_whiten",
    "last_token_index",
    "loss_normalizer",
    "masked_max",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "process_group_all_reduce",
    "sampled_kl",
    "token_level_rewards",
]
