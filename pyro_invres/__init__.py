"""pyro-invres: invertible residual networks and reversible blocks as Pyro transforms.

Start with :func:`iresnet` (one i-ResNet block) or :func:`residual_flow` (a stack), and
use them anywhere Pyro takes a transform.
"""

from . import nn, ops
from .flows import residual_flow
from .ops import ConvergenceError, ConvergenceWarning
from .transforms import (
    ActNorm,
    ConditionalInvertibleResidual,
    InvertibleModule,
    InvertibleResidual,
    SolveStats,
    actnorm,
    conditional_iresnet,
    iresnet,
)

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "ConditionalInvertibleResidual",
    "ConvergenceError",
    "ConvergenceWarning",
    "InvertibleModule",
    "InvertibleResidual",
    "SolveStats",
    "actnorm",
    "conditional_iresnet",
    "iresnet",
    "nn",
    "ops",
    "residual_flow",
]
