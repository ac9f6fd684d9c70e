"""The run report's "after" is the final iteration's validation, also for runs shorter than the
validation interval (issue 16)."""

from __future__ import annotations

import pytest

from tre_lightning.callbacks import RunReport
from test_module_support import CharTask, fit, tiny_module, trainer, validate


@pytest.mark.parametrize(("max_steps", "interval", "expected"), [(1, 5, [0, 1]), (3, 2, [0, 2, 3])])
def test_validates_at_the_last_step(tmp_path, max_steps: int, interval: int, expected: list[int]) -> None:
    """Validation steps recorded: before (0), the interval's, and the final step.

    Fails without ``validate_last_step`` (checked: [0] and [0, 2], i.e. no or a stale "after")."""
    report = RunReport(print_table=False)
    t = trainer(tmp_path, max_steps=max_steps, val_check_interval=interval, limit_val_batches=1, check_val_every_n_epoch=None,
                callbacks=[report])
    module = tiny_module(CharTask(binary=True))
    validate(t, module)
    fit(t, module)
    assert sorted(report.history.val) == expected
    assert report.summary is not None and report.summary["after_step"] == max_steps


def test_opt_out_keeps_lightnings_schedule(tmp_path) -> None:
    report = RunReport(print_table=False, validate_last_step=False)
    t = trainer(tmp_path, max_steps=3, val_check_interval=2, limit_val_batches=1, check_val_every_n_epoch=None,
                callbacks=[report])
    fit(t, tiny_module(CharTask(binary=True)))
    assert sorted(report.history.val) == [2]


def test_validate_last_step_is_checked() -> None:
    with pytest.raises(ValueError, match="validate_last_step"):
        RunReport(validate_last_step="yes")
