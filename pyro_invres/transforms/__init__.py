"""Invertible blocks, each a Pyro ``TransformModule`` with a factory."""

from .actnorm import ActNorm, actnorm, initialize_actnorm
from .base import InvertibleModule
from .conv1x1 import InvertibleConv1x1, invertible_conv1x1
from .coupling import (
    AdditiveCoupling,
    BoundedAffineCoupling,
    ConditionalAdditiveCoupling,
    ConditionalBoundedAffineCoupling,
    additive_coupling,
    affine_coupling,
    conditional_additive_coupling,
    conditional_affine_coupling,
)
from .downsample import (
    ChannelPermutation,
    InvertibleDownsampling,
    channel_permutation,
    invertible_downsampling,
)
from .inverse import Inverse, inverse
from .iresnet import (
    ConditionalInvertibleResidual,
    InvertibleResidual,
    SolveStats,
    conditional_iresnet,
    iresnet,
)
from .reversible import ReversibleStack, reversible_stack
from .revnet import ConditionalRevNetBlock, RevNetBlock, conditional_revnet_block, revnet_block
from .subset import ChannelSubset

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "BoundedAffineCoupling",
    "ChannelPermutation",
    "ChannelSubset",
    "ConditionalAdditiveCoupling",
    "ConditionalBoundedAffineCoupling",
    "ConditionalInvertibleResidual",
    "ConditionalRevNetBlock",
    "Inverse",
    "InvertibleConv1x1",
    "InvertibleDownsampling",
    "InvertibleModule",
    "InvertibleResidual",
    "ReversibleStack",
    "RevNetBlock",
    "SolveStats",
    "actnorm",
    "additive_coupling",
    "affine_coupling",
    "channel_permutation",
    "conditional_additive_coupling",
    "conditional_affine_coupling",
    "conditional_iresnet",
    "conditional_revnet_block",
    "initialize_actnorm",
    "invertible_conv1x1",
    "invertible_downsampling",
    "inverse",
    "iresnet",
    "reversible_stack",
    "revnet_block",
]
