"""Lightning callbacks for training diagnostics (installed as ``tre_lightning.callbacks``).

The module logs every metric of an iteration itself (``self.log``: the names
are listed in docs/training.md); the callbacks add extras:

- :class:`PMaxMonitor`: the history of P̄max (paper Eq. 11, ``policy/p_max``).
- :class:`SampleLogger`: prompt / response / reward rows to CSV and the logger.
- :class:`RunReport`: before -> after table, curves and a tidy CSV at the end of fit.
"""

from tre_lightning.callbacks.pmax import PMaxMonitor
from tre_lightning.callbacks.run_report import RunReport
from tre_lightning.callbacks.samples import SampleLogger

__all__ = ["PMaxMonitor", "RunReport", "SampleLogger"]
