"""Exploration regularizers as strategy objects behind one protocol.

Each strategy lives in its own file and returns a
:class:`~tre_lightning.regularizers.base.RegularizerOutput` for one micro-batch
(:class:`~tre_lightning.regularizers.base.PolicyContext`). The module composes
any number of them; with every coefficient 0 the loss is vanilla PPO.

===============  ========================  =============================================
class            Hydra option              term
===============  ========================  =============================================
Ent              ``regularizer=ent``       -α H(π)                          (Eq. 4-6)
TREK             ``regularizer=tre_k``     -α log|V|/log K · H(π_local)     (Eq. 7-9)
TREP             ``regularizer=tre_p``     -α log|V|/log|TR| · H(π_local)   (Alg. 1)
MinEnt           ``regularizer=min_ent``   -α H∞(π), H∞ = -log max π        (sec. 7.3)
ForkingTokens    ``regularizer=forking``   surrogate on top-20 % entropy tokens only
KLCov            ``regularizer=kl_cov``    +β KL on top-cov tokens
ClipCov          ``regularizer=clip_cov``  surrogate detached on a few high-cov tokens
===============  ========================  =============================================

The kernels they use are in :mod:`tre_lightning.regularizers.functional`.
"""

from tre_lightning.regularizers.base import PolicyContext, Regularizer, RegularizerOutput
from tre_lightning.regularizers.clip_cov import ClipCov
from tre_lightning.regularizers.ent import Ent
from tre_lightning.regularizers.forking import ForkingTokens
from tre_lightning.regularizers.kl_cov import KLCov
from tre_lightning.regularizers.min_ent import MinEnt
from tre_lightning.regularizers.tre_k import TREK
from tre_lightning.regularizers.tre_p import TREP

__all__ = [
    "ClipCov",
    "Ent",
    "ForkingTokens",
    "KLCov",
    "MinEnt",
    "PolicyContext",
    "Regularizer",
    "RegularizerOutput",
    "TREK",
    "TREP",
]
