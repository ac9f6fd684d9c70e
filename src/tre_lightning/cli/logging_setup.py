"""Log output of the entry points: each line once, and no third-party advice that does not apply.

- ``lightning/__init__.py`` gives the ``lightning`` logger its own console
  handler (``INFO: ...``) and lets it propagate; under Hydra, whose handler
  sits on the root logger, every Lightning INFO line then prints twice. When
  the root logger has a handler, :func:`setup_logging` removes that one
  handler (and the ones ``lightning.pytorch`` / ``lightning.fabric`` add
  when imported before the root was configured), so lines go through the
  root handler once. ``tre-lightning`` (no root handler) keeps Lightning's.
- Lightning's "litlogger" tip (logged by ``lightning.pytorch.utilities.rank_zero``
  when the run has no LitLogger) is dropped by a filter on that logger that
  matches that message only.
- Lightning's 12-line ``ModelCheckpoint`` + manual optimization sample (it
  warns on every checkpoint of a manually optimized module; the PPO module
  saves its complete state after each iteration, which is what it should
  save) is dropped by a warnings filter on that exact message.

Idempotent: both entry points call it before building the run.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["LITLOGGER_TIP", "MANUAL_CHECKPOINT_WARNING", "MessageFilter", "setup_logging"]

LITLOGGER_TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
"""The start of Lightning's tip (``logger_connector.py``), dropped."""

MANUAL_CHECKPOINT_WARNING = (
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization state was saved"
)
"""The start of Lightning's warning with the code sample (``model_checkpoint.py``), ignored."""

_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class MessageFilter(logging.Filter):
    """Drops the records whose message starts with ``prefix``; the others pass."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _lightning_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The console handlers Lightning's ``__init__`` modules add (plain ``StreamHandler`` s)."""
    return [h for h in logger.handlers if type(h) is logging.StreamHandler]


def setup_logging() -> None:
    """Each Lightning line once (through the root handler when there is one); the tip and warning dropped."""
    import lightning  # noqa: F401 - its import installs the handlers this undoes

    root = logging.getLogger()
    if root.handlers:
        for name in _LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in _lightning_handlers(logger):
                logger.removeHandler(handler)
            logger.propagate = True
    rank_zero = logging.getLogger(_RANK_ZERO_LOGGER)
    if not any(isinstance(f, MessageFilter) and f.prefix == LITLOGGER_TIP for f in rank_zero.filters):
        rank_zero.addFilter(MessageFilter(LITLOGGER_TIP))
    warnings.filterwarnings("ignore", message=MANUAL_CHECKPOINT_WARNING, category=UserWarning)
