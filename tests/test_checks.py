"""The shared argument checks: accepted values pass through, everything else names param, range and value."""

from __future__ import annotations

import math

import pytest

from tre_lightning.checks import ArgumentError, ConfigError, boolean, int_list, integer, one_of, optional, real, text


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: integer("n", 0, 1), "n must be an int >= 1, got 0"),
        (lambda: integer("n", 2.5, 1), "n must be an int >= 1, got 2.5"),
        (lambda: integer("n", True, 0), "n must be an int >= 0, got True"),
        (lambda: integer("n", "abc", 1, 10), "n must be an int in [1, 10], got 'abc'"),
        (lambda: integer("n", 11, 1, 10), "n must be an int in [1, 10], got 11"),
        (lambda: real("p", 1.5, 0.0, 1.0), "p must be a finite number in [0, 1], got 1.5"),
        (lambda: real("p", 0.0, 0.0, 1.0, low_open=True), "p must be a finite number in (0, 1], got 0.0"),
        (lambda: real("t", 0, 0.0, low_open=True), "t must be a finite number > 0, got 0"),
        (lambda: real("t", math.nan), "t must be a finite number, got nan"),
        (lambda: real("t", math.inf, 0.0), "t must be a finite number >= 0, got inf"),
        (lambda: real("t", "1e-3", 0.0), "t must be a finite number >= 0, got '1e-3'"),
        (lambda: boolean("b", 1), "b must be true or false, got 1"),
        (lambda: one_of("m", "x", ["a", "b"]), "m must be one of ['a', 'b'], got 'x'"),
        (lambda: text("s", "  "), "s must be a non-empty string, got '  '"),
        (lambda: int_list("k", [], 1), "k must be a non-empty list of ints >= 1, got []"),
        (lambda: int_list("k", [1, 0], 1), "k must be a non-empty list of ints >= 1, got [1, 0]"),
        (lambda: int_list("k", "12", 1), "k must be a non-empty list of ints >= 1, got '12'"),
        (lambda: optional(integer, "x", 0, 1), "x must be an int >= 1 or null, got 0"),
    ],
)
def test_refusals_name_param_range_and_value(call, message):
    with pytest.raises(ArgumentError) as info:
        call()
    assert str(info.value) == message
    assert info.value.message == message.split(" ", 1)[1]
    assert str(info.value.under("ppo")) == "ppo." + message.replace(" must", ": must", 1)
    assert isinstance(info.value, ValueError)


def test_accepted_values_pass_through_typed():
    assert integer("n", 3, 1) == 3 and type(integer("n", 3, 1)) is int
    assert real("lr", 1, 0.0, low_open=True) == 1.0 and type(real("lr", 1, 0.0)) is float
    assert real("p", 1.0, 0.0, 1.0) == 1.0
    assert boolean("b", False) is False
    assert one_of("m", "a", ("a", "b")) == "a"
    assert int_list("k", (1, 2), 1) == [1, 2]
    assert optional(integer, "x", None, 1) is None
    assert optional(real, "x", 0.5, 0.0, 1.0) == 0.5
    assert text("s", "", empty=True) == ""


def test_config_error_keys_nest_under_the_node_being_built():
    err = ConfigError("train_path", "'x.jsonl' does not exist")
    assert str(err) == "train_path: 'x.jsonl' does not exist"
    assert str(err.under("task")) == "task.train_path: 'x.jsonl' does not exist"
    assert str(ConfigError("", "the train split is empty").under("task")) == "task: the train split is empty"
    assert str(ConfigError("[0].coef", "bad").under("regularizers")) == "regularizers[0].coef: bad"
