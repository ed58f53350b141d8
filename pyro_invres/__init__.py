"""pyro-invres: invertible residual networks and reversible blocks as Pyro transforms.

Start with :func:`iresnet` (one i-ResNet block) or :func:`residual_flow` (a stack), and
use them anywhere Pyro takes a transform.
"""

from . import nn, ops
from .flows import base_shape, glow, irevnet, residual_flow
from .ops import ConvergenceError, ConvergenceWarning
from .transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ChannelPermutation,
    ChannelSubset,
    ConditionalAdditiveCoupling,
    ConditionalAffineCoupling,
    ConditionalInvertibleResidual,
    ConditionalRevNetBlock,
    Inverse,
    InvertibleConv1x1,
    InvertibleDownsampling,
    InvertibleModule,
    InvertibleResidual,
    RevNetBlock,
    SolveStats,
    actnorm,
    additive_coupling,
    affine_coupling,
    channel_permutation,
    conditional_additive_coupling,
    conditional_affine_coupling,
    conditional_iresnet,
    conditional_revnet_block,
    inverse,
    invertible_conv1x1,
    invertible_downsampling,
    iresnet,
    revnet_block,
)

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "ChannelPermutation",
    "ChannelSubset",
    "ConditionalAdditiveCoupling",
    "ConditionalAffineCoupling",
    "ConditionalInvertibleResidual",
    "ConditionalRevNetBlock",
    "ConvergenceError",
    "ConvergenceWarning",
    "Inverse",
    "InvertibleConv1x1",
    "InvertibleDownsampling",
    "InvertibleModule",
    "InvertibleResidual",
    "RevNetBlock",
    "SolveStats",
    "actnorm",
    "additive_coupling",
    "affine_coupling",
    "base_shape",
    "channel_permutation",
    "conditional_additive_coupling",
    "conditional_affine_coupling",
    "conditional_iresnet",
    "conditional_revnet_block",
    "glow",
    "inverse",
    "invertible_conv1x1",
    "invertible_downsampling",
    "iresnet",
    "irevnet",
    "nn",
    "ops",
    "residual_flow",
    "revnet_block",
]
