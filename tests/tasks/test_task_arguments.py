"""Constructor arguments of the tasks (issue 15): refused at construction, naming the parameter.

Also the Countdown generator's bounds: settings that cannot give enough distinct instances are
refused before any draw, with the numbers that make them impossible, and every search loop
stops (no hang). Nothing here loads data or a model.
"""

from __future__ import annotations

import pytest

from tre_lightning.checks import ArgumentError
from tre_lightning.tasks import CountdownTask, HHTask, MathTask, countdown, generate_countdown
from tre_lightning.tasks.countdown import countdown_capacity

BAD_INTS = ["abc", 2.5, True, None]
"""None is allowed where the size may be "all rows"; the tests skip it there."""

INT_ARGS = {
    CountdownTask: ["train_size", "val_size", "seed", "min_numbers", "max_numbers", "max_number", "max_target",
                    "max_response_tokens"],
    MathTask: ["train_size", "val_size", "seed", "num_workers", "memory_limit_mb", "max_response_tokens"],
    HHTask: ["train_size", "val_size", "seed", "batch_size", "max_length", "max_response_tokens"],
}
NULLABLE = {"train_size", "val_size"}


def _build(cls: type, **kwargs: object) -> object:
    if cls is MathTask:
        kwargs.setdefault("use_math_verify", False)
    return cls(**kwargs)


@pytest.mark.parametrize(
    ("cls", "param", "value"),
    [(cls, p, v) for cls, params in INT_ARGS.items() for p in params for v in BAD_INTS
     if not (v is None and p in NULLABLE)],
)
def test_non_integers_are_refused_naming_the_parameter(cls: type, param: str, value: object) -> None:
    """``task.train_size=abc`` / ``=2.5`` used to fail later with Python's own wording."""
    with pytest.raises(ArgumentError) as err:
        _build(cls, **{param: value})
    assert err.value.param == param and err.value.value == value


@pytest.mark.parametrize(
    ("cls", "kwargs", "param"),
    [
        (CountdownTask, {"format_score": "0.1"}, "format_score"),
        (CountdownTask, {"format_score": float("inf")}, "format_score"),
        (MathTask, {"time_limit": "5"}, "time_limit"),
        (MathTask, {"time_limit": 0}, "time_limit"),
        (MathTask, {"memory_limit_mb": 32}, "memory_limit_mb"),
        (MathTask, {"use_math_verify": "false"}, "use_math_verify"),
        (HHTask, {"load_in_4bit": "yes"}, "load_in_4bit"),
        (HHTask, {"dtype": 16}, "dtype"),
        (HHTask, {"device": "gpu"}, "device"),
        (HHTask, {"prompt_key": 3}, "prompt_key"),
        (HHTask, {"reward_model_path": 3}, "reward_model_path"),
    ],
)
def test_other_bad_values_are_refused(cls: type, kwargs: dict, param: str) -> None:
    with pytest.raises(ArgumentError) as err:
        _build(cls, **kwargs)
    assert err.value.param == param


def test_capacity_of_a_hand_counted_domain() -> None:
    """Two numbers in [1, 2], targets in [1, 100], counted by hand: {1,1} -> 1, 2;
    {1,2} -> 1, 2, 3; {2,2} -> 1, 4 (0 is below the target range): 7 instances."""
    assert countdown_capacity(2, 2, 1, 2, 1, 100) == (7, True)


def test_the_generator_reaches_the_capacity_and_not_beyond() -> None:
    """The capacity is what the generator (an independent random search) can reach."""
    rows = generate_countdown(7, min_numbers=2, max_numbers=2, max_number=2)
    assert sorted((tuple(sorted(r["nums"])), r["target"]) for r in rows) == [
        ((1, 1), 1), ((1, 1), 2), ((1, 2), 1), ((1, 2), 2), ((1, 2), 3), ((2, 2), 1), ((2, 2), 4)
    ]
    with pytest.raises(ArgumentError, match="exactly 7 distinct instances") as err:
        generate_countdown(8, min_numbers=2, max_numbers=2, max_number=2)
    assert err.value.param == "n"


def test_an_impossible_setting_is_refused_at_construction() -> None:
    """Issue 15: ``CountdownTask(max_number=5)`` (inside the documented 1-10,000) hung: 3-4
    numbers in [1, 5] give only 2,460 distinct instances for the 12,500 asked. Checked:
    without the capacity check the constructor returns and this test fails."""
    with pytest.raises(ArgumentError, match=r"in \[1, 5\] with targets in \[1, 100\] make exactly 2460") as err:
        CountdownTask(max_number=5)
    assert err.value.param == "val_size"
    with pytest.raises(ArgumentError, match="at most 2260 with val_size=200") as err:
        CountdownTask(max_number=5, val_size=200)
    assert err.value.param == "train_size"
    task = CountdownTask(max_number=5, train_size=200, val_size=100)  # possible: accepted
    assert len(task.train_examples()) == 200 and len(task.val_examples()) == 100


def test_a_large_domain_uses_an_upper_bound() -> None:
    capacity, exact = countdown_capacity(3, 4, 1, 10_000, 1, 100)
    assert not exact and capacity > 10**12


def test_a_search_that_stalls_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Feasible by count but the random search stops finding new instances: it stops (the
    stall bound, lowered here so that the test is quick) instead of looping."""
    monkeypatch.setattr(countdown, "STALL_DRAWS", 30)
    with pytest.raises(ValueError, match="no new instance in the last 30 draws"):
        generate_countdown(2460, max_number=5)


def test_a_search_that_would_exceed_its_budget_stops_early(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search projects its draw budget from the observed rate and stops at the first
    check that shows it cannot finish. Default settings keep about 1 draw in 8; with the
    budget lowered to 2 draws per instance the first check (after 500 draws) must stop it."""
    monkeypatch.setattr(countdown, "_CHECK_EVERY", 500)
    monkeypatch.setattr(countdown, "MAX_DRAWS_PER_INSTANCE", 2)
    with pytest.raises(ValueError, match=r"at the observed rate \(\d+ new instances in 500 draws\)"):
        generate_countdown(1000)
