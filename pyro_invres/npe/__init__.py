"""Neural posterior estimation: conditional flows ``q(theta | x)`` trained on simulations.

* :class:`ConditionalFlow`: a conditional flow with batched contexts, an optional
  embedding network, z-scoring kept in buffers and a bijection onto the prior's support;
* :func:`fit_conditional`: maximum likelihood with Pyro's SVI over shuffled mini-batches,
  a validation split and early stopping (as ``sbi`` trains), checkpoints and resume;
* :class:`Standardization`, :func:`support_transform`: the z-scoring and the support map.
"""

from .fit import ConditionalFitResult, fit_conditional
from .flow import ConditionalFlow
from .standardize import Standardization
from .support import support_transform

__all__ = [
    "ConditionalFitResult",
    "ConditionalFlow",
    "Standardization",
    "fit_conditional",
    "support_transform",
]
