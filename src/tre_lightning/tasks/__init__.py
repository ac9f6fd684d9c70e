"""Tasks: prompt building and rewards behind the :class:`Task` protocol.

* :class:`MathTask`: MATH, last ``\\boxed{}`` answer checked for equivalence.
* :class:`CountdownTask`: Countdown, ``<answer>`` expression evaluated safely.
* :class:`HHTask`: UltraFeedback prompts scored by a reward model.

Every task exposes ``failure_counts()`` (``checks``, ``timeouts``, ``errors``,
``failures`` of this process) and ``reset_failure_counts()``. Importing this
package does not import torch or transformers.
"""

from tre_lightning.tasks.base import Example, Messages, Task
from tre_lightning.tasks.countdown import CountdownTask, generate_countdown
from tre_lightning.tasks.data_io import DataError
from tre_lightning.tasks.hh import HHTask, RewardModelScorer
from tre_lightning.tasks.math import MathTask
from tre_lightning.tasks.timeouts import GraderStats

__all__ = [
    "CountdownTask",
    "DataError",
    "Example",
    "GraderStats",
    "HHTask",
    "MathTask",
    "Messages",
    "RewardModelScorer",
    "Task",
    "generate_countdown",
]
