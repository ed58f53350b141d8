"""Invertible blocks, each a Pyro ``TransformModule`` with a factory."""

from .actnorm import ActNorm, actnorm
from .base import InvertibleModule
from .iresnet import (
    ConditionalInvertibleResidual,
    InvertibleResidual,
    SolveStats,
    conditional_iresnet,
    iresnet,
)

__all__ = [
    "ActNorm",
    "ConditionalInvertibleResidual",
    "InvertibleModule",
    "InvertibleResidual",
    "SolveStats",
    "actnorm",
    "conditional_iresnet",
    "iresnet",
]
