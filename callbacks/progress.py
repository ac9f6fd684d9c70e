"""PPO progress display: "iteration i / N", ETA and the metrics that matter, on a terminal or a log.

Lightning's progress bars count epochs and batches, which PPO does not have
("Epoch 0/-2"), and show the ``prog_bar`` metrics only. :class:`PPOProgress`
counts PPO iterations (``trainer.global_step``) and picks its own metrics
from what each training step returns:

- stdout is not a terminal (``nohup``, SLURM, a pipe): one plain text line per
  iteration, flushed, e.g. ``iteration 3/5 | reward 0.125 | pass@1 12.5% |
  p_max 0.612 | entropy 1.02 | approx_kl 0.0012 | policy_loss -0.013 |
  value_loss 0.021 | 1.9 s/it | eta 0:00:04``, and one line per validation;
- a terminal: a rich bar ("iteration i/N", elapsed, ETA) with the metrics
  on lines below it, wrapped at ``width`` columns (80 by default).

Only the global-zero process prints. It is a plain callback (not a
``lightning`` ``ProgressBar``), so the trainer keeps ``enable_progress_bar:
false`` (conf/trainer/default.yaml) and Lightning's own bar stays off; drop
the display with ``callbacks.progress=null``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from lightning.pytorch import Callback, LightningModule, Trainer

from tre_lightning.callbacks._common import step_metrics
from tre_lightning.checks import ArgumentError, integer

__all__ = ["DEFAULT_METRICS", "PPOProgress", "format_metrics", "iteration_line", "wrap_fields"]

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "reward": ("reward/mean",),
    "pass@1": ("val/pass@1",),
    "p_max": ("policy/p_max",),
    "entropy": ("policy/entropy",),
    "kl": ("train/ref_kl",),
    "approx_kl": ("policy/approx_kl",),
    "policy_loss": ("train/policy_loss",),
    "value_loss": ("train/value_loss",),
}
"""Label -> logged metric names (the first present is shown). ``pass@1`` is the latest validation."""

_PERCENT = ("val/pass@",)


def _fmt(name: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if name.startswith(_PERCENT):
        return f"{100 * value:.1f}%"
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.2e}"
    return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.3f}"


def format_metrics(values: Mapping[str, float], metrics: Mapping[str, Sequence[str]]) -> list[str]:
    """``"<label> <value>"`` for each label whose metric is in ``values``, in ``metrics`` order."""
    fields = []
    for label, names in metrics.items():
        name = next((n for n in names if n in values), None)
        if name is not None:
            fields.append(f"{label} {_fmt(name, float(values[name]))}")
    return fields


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def iteration_line(step: int, total: int | None, fields: Sequence[str], seconds: float | None,
                   eta: float | None) -> str:
    """One iteration as one plain line: ``iteration 3/5 | <fields> | 1.9 s/it | eta 0:00:04``."""
    parts = [f"iteration {step}/{total}" if total else f"iteration {step}", *fields]
    if seconds is not None:
        parts.append(f"{seconds:.3g} s/it")
    if eta is not None:
        parts.append(f"eta {_clock(eta)}")
    return " | ".join(parts)


def wrap_fields(fields: Sequence[str], width: int, sep: str = "  ") -> list[str]:
    """Pack whole fields into lines of at most ``width`` characters (a field longer than that stays whole)."""
    lines: list[str] = []
    for field in fields:
        if lines and len(lines[-1]) + len(sep) + len(field) <= width:
            lines[-1] += sep + field
        else:
            lines.append(field)
    return lines


class PPOProgress(Callback):
    """Progress of the PPO iterations (see the module docstring).

    Args:
        plain: True = one text line per iteration, False = the terminal bar,
            None = plain unless ``stream`` is a terminal.
        width: the terminal bar's metric lines wrap at this many columns, >= 20.
        metrics: label -> metric names shown (the first present of each);
            None = :data:`DEFAULT_METRICS`.
        stream: where to write; None = ``sys.stdout`` at the time of writing.
    """

    def __init__(self, plain: bool | None = None, width: int = 80,
                 metrics: Mapping[str, Sequence[str] | str] | None = None, stream: IO[str] | None = None) -> None:
        if plain is not None and not isinstance(plain, bool):
            raise ArgumentError("plain", "true, false or null (auto: plain unless stdout is a terminal)", plain)
        self.plain = plain
        self.width = integer("width", width, 20)
        chosen = DEFAULT_METRICS if metrics is None else metrics
        if not isinstance(chosen, Mapping) or not chosen:
            raise ArgumentError("metrics", "a non-empty mapping label -> metric name(s)", metrics)
        self.metrics = {str(k): (v,) if isinstance(v, str) else tuple(v) for k, v in chosen.items()}
        self._stream = stream
        self._live: Any = None
        self._bar: Any = None
        self._task: Any = None
        self._start_step = 0
        self._fit_start: float | None = None
        self._step_start: float | None = None
        self._last_val: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stdout

    def is_plain(self) -> bool:
        """Plain lines (not a terminal), or the terminal bar."""
        if self.plain is not None:
            return self.plain
        isatty = getattr(self.stream, "isatty", None)
        return not (callable(isatty) and isatty())

    def _print(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    @staticmethod
    def _total(trainer: Trainer) -> int | None:
        return int(trainer.max_steps) if trainer.max_steps is not None and trainer.max_steps > 0 else None

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_step = int(trainer.global_step)
        self._fit_start = time.monotonic()
        if not trainer.is_global_zero or self.is_plain():
            return
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn
        from rich.text import Text

        console = Console(file=self.stream, width=self.width)
        self._bar = Progress(TextColumn("iteration"), MofNCompleteColumn(), BarColumn(bar_width=None),
                             TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                             expand=True)
        self._task = self._bar.add_task("ppo", total=self._total(trainer), completed=self._start_step)
        self._text = Text("")
        self._live = Live(Group(self._bar, self._text), console=console, refresh_per_second=4, transient=False)
        self._live.start()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_start = time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        now = time.monotonic()
        seconds = now - self._step_start if self._step_start is not None else None
        step, total = int(trainer.global_step), self._total(trainer)
        done = step - self._start_step
        eta = None
        if total is not None and self._fit_start is not None and done > 0:
            eta = (now - self._fit_start) / done * max(0, total - step)
        fields = format_metrics({**step_metrics(outputs), **self._last_val}, self.metrics)
        if self._live is not None:
            self._bar.update(self._task, completed=step)
            line = f"{seconds:.3g} s/it" if seconds is not None else ""
            self._text.plain = "\n".join(wrap_fields([*fields, line] if line else fields, self.width))
            self._live.refresh()
        else:
            self._print(iteration_line(step, total, fields, seconds, eta))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._last_val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not trainer.is_global_zero or not self._last_val:
            return
        fields = [f"{k.removeprefix('val/')} {_fmt(k, v)}" for k, v in sorted(self._last_val.items())]
        line = f"validation at iteration {int(trainer.global_step)} | " + " | ".join(fields)
        if self._live is not None:
            self._live.console.print(line)
        else:
            self._print(line)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"PPOProgress(plain={self.plain}, width={self.width})"
