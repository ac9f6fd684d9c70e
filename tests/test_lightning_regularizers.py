"""``--model.regularizers`` accepts short and full class names, one or a list (issue 16)."""

from __future__ import annotations

import pytest

from tre_lightning.cli.lightning import EXAMPLE_CONFIG, regularizer_list_args, run
from tre_lightning.regularizers import KLCov, TREK, TREP


def test_bare_names_become_a_list() -> None:
    f = "--model.regularizers"
    assert regularizer_list_args([f, "TREK"]) == [f, "[TREK]"]
    assert regularizer_list_args([f"{f}=TREP,KLCov"]) == [f"{f}=[TREP,KLCov]"]
    assert regularizer_list_args([f, "tre_lightning.regularizers.TREK"]) == [f, "[tre_lightning.regularizers.TREK]"]
    kept = [f, "[{class_path: TREK, init_args: {coef: 0.01}}]", "--model.regularizers+=TREK", "--model.seed", "1"]
    assert regularizer_list_args(kept) == kept


@pytest.mark.parametrize(("value", "expected"), [
    ("TREK", [TREK]),
    ("tre_lightning.regularizers.TREK", [TREK]),
    ("TREP,KLCov", [TREP, KLCov]),
])
def test_cli_builds_the_named_regularizers(value: str, expected: list[type]) -> None:
    """Fails before issue 16 (checked): "Expected a path but TREK either not accessible or invalid"."""
    cli = run(["--config", str(EXAMPLE_CONFIG), "--model.regularizers", value], run=False)
    assert [type(r) for r in cli.model.regularizers] == expected
