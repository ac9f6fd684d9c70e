"""Per-token KL estimators between the policy and a reference policy.

All estimators are computed from the log-probabilities of the *sampled*
tokens only (Schulman, "Approximating KL divergence", 2020), with
``d = log_probs - ref_log_probs``:

- ``k1``  = d                       (unbiased for KL(pi || ref), high variance, can be < 0)
- ``abs`` = |d|
- ``k2``  = d^2 / 2                 (biased, low variance, >= 0)
- ``k3``  = e^x - x - 1, x = -d     (unbiased, low variance, >= 0; "low_var_kl" in verl)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from tre_lightning.ppo.masked import _acc_dtype, _check_choice, _check_float_tensor, _check_range, _check_same_shape

__all__ = ["KLEstimator", "KL_ESTIMATORS", "kl_penalty"]

KLEstimator = Literal["k1", "abs", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)


def _k1(diff: Tensor, exp_clamp: float) -> Tensor:
    return diff


def _abs(diff: Tensor, exp_clamp: float) -> Tensor:
    return diff.abs()


def _k2(diff: Tensor, exp_clamp: float) -> Tensor:
    return 0.5 * diff.square()


def _k3(diff: Tensor, exp_clamp: float) -> Tensor:
    # x = ref - logp, clamped before the exponential so that e^x cannot overflow
    # (verl clamps it to [-20, 20]). expm1(x) - x == e^x - x - 1 without the
    # cancellation of 1 + x + x^2/2 - x - 1 for small |x|; still, 16-bit floats
    # cannot hold x^2/2 next to x, so those are computed in float32 and cast back.
    x = (-diff).to(_acc_dtype(diff.dtype)).clamp(-exp_clamp, exp_clamp)
    return (torch.expm1(x) - x).to(diff.dtype)


_ESTIMATOR_FNS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "k1": _k1,
    "abs": _abs,
    "k2": _k2,
    "k3": _k3,
}


def kl_penalty(
    log_probs: Tensor,
    ref_log_probs: Tensor,
    estimator: KLEstimator = "k1",
    clamp: float | None = 10.0,
    *,
    exp_clamp: float = 20.0,
) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs.

    Clamps, as in verl: ``k3`` clamps its exponent ``x = ref - logp`` to
    ``[-exp_clamp, exp_clamp]`` (default 20; keeps ``e^x`` finite) and its
    result to ``[-clamp, clamp]`` (default 10; k3 >= 0, so in effect
    ``[0, 10]``). ``k1``, ``abs`` and ``k2`` are returned unclamped (verl does
    not clamp them; ``clamp`` does not apply to them). Where a clamp is active
    the gradient is 0. k3 is computed in float32 for 16-bit inputs (its
    ``e^x - x - 1`` cancels to 0 in bf16 for small ``x``). Padding is not masked here: apply the response mask
    downstream (:func:`token_level_rewards`, :func:`aggregate_loss`).

    Args:
        log_probs: (B, T) log pi(a_t | s_t) of the sampled tokens.
        ref_log_probs: (B, T) log pi_ref(a_t | s_t), same shape.
        estimator: one of "k1", "abs", "k2", "k3".
        clamp: bound on the k3 estimate, > 0, or None for no bound.
        exp_clamp: bound on k3's exponent, > 0.

    Returns:
        (B, T) tensor in the promoted dtype of the inputs.
    """
    _check_float_tensor("log_probs", log_probs)
    _check_float_tensor("ref_log_probs", ref_log_probs)
    _check_same_shape("log_probs", log_probs, "ref_log_probs", ref_log_probs)
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    if clamp is not None:
        clamp = _check_range("clamp", clamp, 0.0, low_inclusive=False)
    exp_clamp = _check_range("exp_clamp", exp_clamp, 0.0, low_inclusive=False)

    kl = _ESTIMATOR_FNS[estimator](log_probs - ref_log_probs, exp_clamp)
    if estimator == "k3" and clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl
