"""KL-Cov: a KL penalty on the tokens of highest covariance (Cui et al. 2025)."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from tre_lightning import checks
from tre_lightning.ppo.kl import sampled_kl
from tre_lightning.ppo.masked import masked_mean
from tre_lightning.regularizers._utils import make_repr, select_top_fraction, token_covariance
from tre_lightning.regularizers.base import PolicyContext, Regularizer, RegularizerOutput

KLCovEstimator = Literal["k1", "abs", "k3"]
"""The estimators KL-Cov offers (:func:`~tre_lightning.ppo.kl.sampled_kl`'s, without k2)."""


class KLCov(Regularizer):
    """Extra β · KL on the top ``top_fraction`` of valid tokens by covariance.

    cov_i = (A_i - mean A)(log pi_i - mean log pi) over the valid tokens of
    the micro-batch (detached); the k = max(1, int(N * top_fraction))
    tokens of largest cov get the per-token loss
    ``sampled_kl(log pi_old, log pi, kl_estimator, clamp=None)``, an
    estimate of D_KL(pi_old || pi_theta) from the rollout's tokens with the
    gradient through log pi; the module adds ``coef * aggregate(loss)``
    (with token-mean: the sum over the selected tokens divided by all valid
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

    name = "kl_cov"
    coef: float

    def __init__(self, coef: float = 1.0, top_fraction: float = 0.2, kl_estimator: KLCovEstimator = "k3") -> None:
        self.coef = checks.real("coef", coef, 0.0)
        self.top_fraction = checks.real("top_fraction", top_fraction, 0.0, 1.0, low_open=True)
        self.kl_estimator: KLCovEstimator = checks.one_of("kl_estimator", kl_estimator, get_args(KLCovEstimator))

    def __call__(self, ctx: PolicyContext) -> RegularizerOutput:
        if self.coef == 0.0:
            return RegularizerOutput()
        cov = token_covariance(ctx.advantages, ctx.log_probs, ctx.mask)
        selected, k = select_top_fraction(cov, ctx.mask, self.top_fraction, "floor")
        kl = sampled_kl(ctx.old_log_probs.detach(), ctx.log_probs, self.kl_estimator, clamp=None)
        loss = torch.where(selected, kl, 0.0)
        metrics = {
            "policy/klcov_selected": torch.as_tensor(float(k), device=kl.device),
            "policy/klcov_kl": masked_mean(kl.detach().float(), selected),
        }
        return RegularizerOutput(loss=loss, metrics=metrics)

    def __repr__(self) -> str:
        return make_repr(self, "coef", "top_fraction", "kl_estimator")
