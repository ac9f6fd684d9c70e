"""Exploration regularizers as strategy objects behind one protocol.

Each strategy lives in its own file, inherits from
:class:`~tre_lightning.regularizers.base.Regularizer` (a protocol: any object
with a ``name`` and ``__call__`` also works) and returns a
:class:`~tre_lightning.regularizers.base.RegularizerOutput` for one micro-batch
(:class:`~tre_lightning.regularizers.base.PolicyContext`). The module composes
any number of them. ``coef`` is only ever the weight of a loss term; the two
strategies that act on the surrogate have their own parameter. At the neutral
value in the last column the output is empty and the loss is vanilla PPO.

=============  ========================  ==================================================  =======================
class          Hydra option              effect on the loss                                  neutral value
=============  ========================  ==================================================  =======================
Ent            ``regularizer=ent``       + coef · (-H(π))  (Eq. 4-6)                         ``coef=0``
TREK           ``regularizer=tre_k``     + coef · (-log|V|/log K · H(π_local))  (Eq. 7-9)    ``coef=0``
TREP           ``regularizer=tre_p``     + coef · (-log|V|/log|TR| · H(π_local))  (Alg. 1)   ``coef=0``
MinEnt         ``regularizer=min_ent``   + coef · (-H∞(π)), H∞ = -log max π  (sec. 7.3)      ``coef=0``
ForkingTokens  ``regularizer=forking``   surrogate weight 1 on the top-20 % entropy tokens,  ``unselected_weight=1``
                                         ``unselected_weight`` on the others
KLCov          ``regularizer=kl_cov``    + coef · KL(π_old ‖ π_θ) on the top-cov tokens      ``coef=0``
ClipCov        ``regularizer=clip_cov``  surrogate detached on a few high-cov tokens,        ``detach_prob=0``
                                         each with probability ``detach_prob``
=============  ========================  ==================================================  =======================

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
