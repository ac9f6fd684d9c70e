"""KL-Cov: a KL penalty on the tokens of highest covariance (Cui et al. 2025)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from tre_lightning.regularizers._utils import (
    check_coef,
    check_fraction,
    make_repr,
    select_top_fraction,
    token_covariance,
)
from tre_lightning.regularizers.base import PolicyContext, RegularizerOutput

KLEstimator = Literal["k1", "abs", "k3"]
_ESTIMATORS = ("k1", "abs", "k3")


def sampled_token_kl(log_probs: Tensor, old_log_probs: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token estimate of D_KL(pi_old || pi_theta) from the sampled token (a ~ pi_old).

    With x = log pi_theta(a) - log pi_old(a):

    * ``"k1"``: -x (unbiased; can be negative);
    * ``"abs"``: |x| (what the KL-Cov code ran);
    * ``"k3"``: e^x - x - 1 (unbiased, >= 0, low variance; x clamped to
      [-20, 20] for stability).

    The gradient flows through ``log_probs``.
    """
    x = log_probs - old_log_probs.detach()
    if estimator == "k1":
        return -x
    if estimator == "abs":
        return x.abs()
    if estimator == "k3":
        x = x.clamp(-20.0, 20.0)
        return torch.expm1(x) - x
    raise ValueError(f"kl_estimator must be one of {_ESTIMATORS}, got {estimator!r}")


class KLCov:
    """Extra β · KL on the top ``top_fraction`` of valid tokens by covariance.

    cov_i = (A_i - mean A)(log pi_i - mean log pi) over the valid tokens of
    the micro-batch (detached); the k = max(1, int(N * top_fraction))
    tokens of largest cov get the per-token loss ``kl_estimator(log pi,
    log pi_old)``; the module adds ``coef * aggregate(loss)`` (with
    token-mean: the sum over the selected tokens divided by all valid
    tokens, as in the reference code).

    Paper text vs the code it was run with (both offered, paper by default):

    ===============  ==========================  =====================================
    parameter        paper (default)             code as run
    ===============  ==========================  =====================================
    top_fraction     0.2 (20 %)                  0.002 (0.2 %: ``k_percent`` 0.2 / 100)
    kl_estimator     D_KL(pi_old || pi_theta):   ``"abs"``: |log pi - log pi_old|
                     ``"k3"`` (see below)
    coef (β)         1.0                         1.0
    ===============  ==========================  =====================================

    The paper names the divergence, not an estimator. ``"k3"`` estimates it
    without bias from the sampled token, is never negative, and its
    gradient (r - 1) ∇log pi pulls the token back to pi_old like the code's
    |·| does. ``"k1"`` (log pi_old - log pi) is also unbiased, but its
    per-token gradient -∇log pi raises the selected tokens' probability
    whichever way they moved, so it is offered only for completeness.

    Args:
        coef: β >= 0; 0 gives vanilla PPO.
        top_fraction: fraction of valid tokens penalised, in (0, 1].
        kl_estimator: ``"k3"``, ``"abs"`` or ``"k1"``.

    Metrics: ``policy/klcov_selected`` (number of tokens penalised),
    ``policy/klcov_kl`` (mean KL estimate over them).
    """

    name: ClassVar[str] = "kl_cov"
    coef: float

    def __init__(self, coef: float = 1.0, top_fraction: float = 0.2, kl_estimator: KLEstimator = "k3") -> None:
        self.coef = check_coef(coef)
        self.top_fraction = check_fraction(top_fraction, name="top_fraction")
        if kl_estimator not in _ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {_ESTIMATORS}, got {kl_estimator!r}")
        self.kl_estimator: KLEstimator = kl_estimator

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        if self.coef == 0.0:
            return RegularizerOutput()
        cov = token_covariance(ctx.advantages, ctx.log_probs, ctx.mask)
        selected, k = select_top_fraction(cov, ctx.mask, self.top_fraction, "floor")
        kl = sampled_token_kl(ctx.log_probs, ctx.old_log_probs, self.kl_estimator)
        loss = torch.where(selected, kl, 0.0)
        kl_sel = kl.detach()[selected].float().mean() if k > 0 else kl.new_zeros((), dtype=torch.float32)
        metrics = {
            "policy/klcov_selected": torch.as_tensor(float(k), device=kl.device),
            "policy/klcov_kl": kl_sel,
        }
        return RegularizerOutput(loss=loss, metrics=metrics)

    def __repr__(self) -> str:
        return make_repr(self, "coef", "top_fraction", "kl_estimator")
