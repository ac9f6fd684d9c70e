"""Lightning callbacks for training diagnostics (installed as ``tre_lightning.callbacks``).

- :class:`PMaxMonitor`: P̄max (paper Eq. 11) as ``policy/p_max``, in the progress bar.
- :class:`TrainingDiagnostics`: entropy, clip fractions, KL, grad norms, value
  loss, explained variance, rewards, lengths, tokens/s, regularizer metrics.
- :class:`SampleLogger`: prompt / response / reward rows to CSV and the logger.
- :class:`RunReport`: before -> after table, curves and a tidy CSV at the end of fit.
"""

from tre_lightning.callbacks.diagnostics import TrainingDiagnostics
from tre_lightning.callbacks.pmax import PMaxMonitor
from tre_lightning.callbacks.run_report import RunReport
from tre_lightning.callbacks.samples import SampleLogger

__all__ = ["PMaxMonitor", "RunReport", "SampleLogger", "TrainingDiagnostics"]
