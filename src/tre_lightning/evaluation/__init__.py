"""Evaluation: the paper's protocol, its metrics, and run / sweep reports.

- :mod:`.config`: :class:`EvalConfig` (8 samples, temperature 1.0, top-p 0.7).
- :mod:`.protocol`: :func:`evaluate` and :func:`score_batch` (also the module's validation).
- :mod:`.metrics`: :class:`PassAtK`, :class:`MeanReward`.
- :mod:`.report`: the run report and the sweep table / figures that ``tre-plot`` writes.
"""

from tre_lightning.evaluation.config import EvalConfig
from tre_lightning.evaluation.metrics import MeanReward, PassAtK
from tre_lightning.evaluation.protocol import evaluate, score_batch

__all__ = ["EvalConfig", "MeanReward", "PassAtK", "evaluate", "score_batch"]
