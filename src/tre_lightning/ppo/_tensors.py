"""Tensor argument checks of the PPO maths: the one home for dtype and shape checks.

Scalar arguments (coefficients, clip ranges, modes) are checked with
:mod:`tre_lightning.checks` and raise its ``ArgumentError``. Tensor arguments
are checked here: a non-tensor raises ``TypeError``, a wrong dtype or shape
``ValueError``; both name the argument and say what it got.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_2d", "check_aligned", "check_float", "check_mask", "check_same_shape", "check_tensor"]


def check_tensor(name: str, x: object) -> Tensor:
    """Raise TypeError unless ``x`` is a tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name: str, x: object) -> Tensor:
    """Raise unless ``x`` is a floating-point tensor."""
    t = check_tensor(name, x)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def check_mask(name: str, mask: object) -> Tensor:
    """Raise unless ``mask`` is a bool, integer or floating tensor."""
    m = check_tensor(name, mask)
    if m.is_complex():
        raise ValueError(f"{name} must be a bool, integer or floating tensor, got dtype {m.dtype}")
    return m


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise ValueError naming both arguments and both shapes if they differ."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got "
            f"{name_a}.shape={tuple(a.shape)} and {name_b}.shape={tuple(b.shape)}"
        )


def check_2d(name: str, x: Tensor) -> None:
    """Raise ValueError unless ``x`` is (B, T)."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D with shape (B, T), got shape {tuple(x.shape)}")


def check_aligned(
    first: tuple[str, object],
    *others: tuple[str, object],
    mask: tuple[str, object] | None = None,
    two_d: bool = False,
) -> None:
    """Float tensors (and a mask) of one shape: the check every PPO function starts with.

    Each ``(name, tensor)`` must be a floating-point tensor, ``mask`` (when
    given) a bool/integer/float tensor, ``first`` 2-D when ``two_d``, and
    every other tensor and the mask of ``first``'s shape (the error names
    ``first`` and the one that differs).
    """
    tensors = [(name, check_float(name, x)) for name, x in (first, *others)]
    if mask is not None:
        tensors.append((mask[0], check_mask(*mask)))
    name0, x0 = tensors[0]
    if two_d:
        check_2d(name0, x0)
    for name, x in tensors[1:]:
        check_same_shape(name0, x0, name, x)
