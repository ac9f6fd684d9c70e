"""Per-token KL estimators from the log-probabilities of sampled tokens.

The one KL formula of the package (Schulman, "Approximating KL divergence",
2020). :func:`sampled_kl` estimates KL(p ‖ q) = E_{a~p}[log p(a) − log q(a)]
from tokens ``a`` sampled from ``p``, with ``d = log p(a) − log q(a)``:

- ``k1``  = d                       (unbiased, high variance, can be < 0)
- ``abs`` = |d|                     (biased, >= 0)
- ``k2``  = d^2 / 2                 (biased, low variance, >= 0)
- ``k3``  = e^x − x − 1, x = −d     (unbiased, low variance, >= 0; "low_var_kl" in verl)

The direction is in the argument order: the first argument is the policy the
tokens were sampled from. Its two callers:

- the reference-model penalty in the reward, KL(π_old ‖ π_ref) on the
  rollout's tokens: ``sampled_kl(old_log_probs, ref_log_probs, estimator)``;
- KL-Cov's penalty, KL(π_old ‖ π_θ), with the gradient through π_θ:
  ``sampled_kl(old_log_probs, log_probs, estimator, clamp=None)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from tre_lightning import checks
from tre_lightning.ppo._tensors import check_aligned
from tre_lightning.ppo.masked import _acc_dtype

__all__ = ["KLEstimator", "KL_ESTIMATORS", "sampled_kl"]

KLEstimator = Literal["k1", "abs", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)


def _k1(diff: Tensor, exp_clamp: float) -> Tensor:
    return diff


def _abs(diff: Tensor, exp_clamp: float) -> Tensor:
    return diff.abs()


def _k2(diff: Tensor, exp_clamp: float) -> Tensor:
    return 0.5 * diff.square()


def _k3(diff: Tensor, exp_clamp: float) -> Tensor:
    # x = log q - log p, clamped before the exponential so that e^x cannot overflow
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


def sampled_kl(
    log_p: Tensor,
    log_q: Tensor,
    estimator: KLEstimator,
    clamp: float | None = 10.0,
    *,
    exp_clamp: float = 20.0,
) -> Tensor:
    """Per-token estimate of KL(p ‖ q) from tokens sampled from ``p``.

    ``d = log_p − log_q``; the estimators are listed in the module docstring.
    Clamps, as in verl: ``k3`` clamps its exponent ``x = −d`` to
    ``[-exp_clamp, exp_clamp]`` (default 20; keeps ``e^x`` finite) and its
    result to ``[-clamp, clamp]`` (default 10; k3 >= 0, so in effect
    ``[0, 10]``). ``k1``, ``abs`` and ``k2`` are returned unclamped (verl does
    not clamp them; ``clamp`` does not apply to them). Where a clamp is active
    the gradient is 0. k3 is computed in float32 for 16-bit inputs (its
    ``e^x − x − 1`` cancels to 0 in bf16 for small ``x``). The gradient flows
    through whichever argument carries one. Padding is not masked here:
    apply the response mask downstream (:func:`token_level_rewards`,
    :func:`aggregate_loss`).

    Args:
        log_p: (...) log p(a) of the sampled tokens (the sampling policy).
        log_q: (...) log q(a) of the same tokens, same shape.
        estimator: one of "k1", "abs", "k2", "k3".
        clamp: bound on the k3 estimate, > 0, or None for no bound.
        exp_clamp: bound on k3's exponent, > 0.

    Returns:
        (...) tensor in the promoted dtype of the inputs.
    """
    check_aligned(("log_p", log_p), ("log_q", log_q))
    checks.one_of("estimator", estimator, KL_ESTIMATORS)
    clamp = checks.optional(checks.real, "clamp", clamp, 0.0, low_open=True)
    exp_clamp = checks.real("exp_clamp", exp_clamp, 0.0, low_open=True)

    kl = _ESTIMATOR_FNS[estimator](log_p - log_q, exp_clamp)
    if estimator == "k3" and clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl
