"""Argument checks shared by every constructor: one home, one wording.

Each check returns the value (ints stay ints, reals become ``float``) or raises
:class:`ArgumentError`, which names the parameter, the allowed range and the
value it got. A problem that is not a range (an empty data split, a folder
that does not exist) is a :class:`ConfigError` with the setting's name and a
message. The entry points print either as ``<config key>.<param>: <message>``
without parsing any message: the error carries its parts, and the builder
that was constructing the config node prefixes the node's key.

``param`` may be dotted when a check spans objects (``ppo.micro_batch_size``
checked by the module, which also sees ``rollout.n``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = [
    "ArgumentError",
    "ConfigError",
    "boolean",
    "integer",
    "int_list",
    "one_of",
    "optional",
    "real",
    "text",
]

T = TypeVar("T")


def join_key(prefix: str, key: str) -> str:
    """``prefix.key`` (``key`` may start with an index: ``[0].coef``); either may be empty."""
    if not prefix:
        return key
    if not key:
        return prefix
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


class ConfigError(ValueError):
    """A setting that cannot work.

    Attributes:
        key: the setting, relative to the object that raised (dotted when the
            check spans objects); empty for the object as a whole.
        message: what is wrong and what is allowed.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key below ``prefix`` (the config node that was being built)."""
        return ConfigError(join_key(prefix, self.key), self.message)


class ArgumentError(ConfigError):
    """A constructor argument outside its allowed range: ``<param> must be <allowed>, got <value>``.

    Attributes:
        param: the parameter's name (dotted for cross-object checks); also ``key``.
        allowed: what is allowed, phrased to follow "must be".
        value: the value that was given.
    """

    def __init__(self, param: str, allowed: str, value: object) -> None:
        self.param = param
        self.allowed = allowed
        self.value = value
        super().__init__(param, f"must be {allowed}, got {value!r}")

    def __str__(self) -> str:
        return f"{self.param} must be {self.allowed}, got {self.value!r}"


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None and math.isfinite(low):
        return f"{'>' if low_open else '>='} {_num(low)}"
    if high is not None and math.isfinite(high):
        return f"{'<' if high_open else '<='} {_num(high)}"
    return ""


def integer(param: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """An ``int`` (not a bool, not a float) in ``[low, high]`` (either bound optional)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        bounds = _range(low, high)
        raise ArgumentError(param, f"an int {bounds}".strip(), value)
    return int(value)  # type: ignore[arg-type]


def real(
    param: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number (int or float, not a bool) in the given interval."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        bounds = _range(low, high, low_open, high_open)
        raise ArgumentError(param, f"a finite number {bounds}".strip(), value)
    return float(value)  # type: ignore[arg-type]


def boolean(param: str, value: object) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ArgumentError(param, "true or false", value)
    return value


def one_of(param: str, value: T, options: Sequence[T]) -> T:
    """One of ``options``."""
    if isinstance(value, bool) or value not in options:
        raise ArgumentError(param, f"one of {list(options)}", value)
    return value


def text(param: str, value: object, *, empty: bool = False) -> str:
    """A string (non-blank unless ``empty``)."""
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise ArgumentError(param, "a string" if empty else "a non-empty string", value)
    return value


def int_list(param: str, value: object, low: int | None = None, high: int | None = None,
             *, non_empty: bool = True) -> list[int]:
    """A list of ints, each in ``[low, high]``."""
    allowed = f"a {'non-empty ' if non_empty else ''}list of ints {_range(low, high)}".strip()
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or (non_empty and not value):
        raise ArgumentError(param, allowed, value)
    for item in value:
        try:
            integer(param, item, low, high)
        except ArgumentError:
            raise ArgumentError(param, allowed, value) from None
    return [int(v) for v in value]


def optional(check: Callable[..., T], param: str, value: Any, *args: Any, **kwargs: Any) -> T | None:
    """``None`` passes; anything else goes through ``check(param, value, *args, **kwargs)``.

    The allowed range of a failure says "or null".
    """
    if value is None:
        return None
    try:
        return check(param, value, *args, **kwargs)
    except ArgumentError as err:
        raise ArgumentError(param, f"{err.allowed} or null", value) from None
