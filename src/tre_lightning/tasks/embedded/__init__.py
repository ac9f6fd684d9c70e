"""The embedded quickstart: a synthetic task, a big-vocabulary tokenizer and a
cached warm start, so that ``tre-train`` runs PPO with TRE end to end on a CPU
with no download.

- :mod:`.puzzles`: digit-sorting puzzles, seeded generator, rule checker, noisy solver.
- :mod:`.task`: :class:`EmbeddedTask` (the Task protocol).
- :mod:`.tokenizer`: character tokenizer padded with thousands of filler tokens.
- :mod:`.repeat`: :class:`RepeatTask`, the tail-risk family with a horizon knob
  (docs/tail_risk.md).
- :mod:`.warmstart`: supervised warm start on noisy solutions, cached, for both
  families; :class:`WarmStartSource` (the ModelSource protocol).
- :mod:`.report`: the before → after table, the metrics CSV and the PNG plot.
"""

from tre_lightning.tasks.embedded.puzzles import Puzzle, check, generate, noisy_solution, split
from tre_lightning.tasks.embedded.repeat import RepeatTask
from tre_lightning.tasks.embedded.task import EmbeddedTask
from tre_lightning.tasks.embedded.tokenizer import quickstart_tokenizer, useful_token_ids
from tre_lightning.tasks.embedded.warmstart import WarmStartConfig, WarmStartSource, train_warm_start

__all__ = [
    "EmbeddedTask",
    "Puzzle",
    "RepeatTask",
    "WarmStartConfig",
    "WarmStartSource",
    "check",
    "generate",
    "noisy_solution",
    "quickstart_tokenizer",
    "split",
    "train_warm_start",
    "useful_token_ids",
]
