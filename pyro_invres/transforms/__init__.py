"""Invertible blocks, each a Pyro ``TransformModule`` with a factory."""

from .actnorm import ActNorm, actnorm, initialize_actnorm
from .autoregressive import AffineAutoregressive, affine_autoregressive
from .base import InvertibleModule
from .conditional_affine import ConditionalElementwiseAffine, conditional_elementwise_affine
from .conditional_dense_residual import ConditionalDenseResidual, conditional_dense_residual
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
from .dense_residual import DenseResidual, dense_residual
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
from .pixel_residual import PixelResidual, pixel_residual
from .reversible import ReversibleStack, reversible_stack
from .revnet import ConditionalRevNetBlock, RevNetBlock, conditional_revnet_block, revnet_block
from .spline_autoregressive import (
    ConditionalSplineAutoregressive,
    SplineAutoregressive,
    conditional_spline_autoregressive,
    spline_autoregressive,
)
from .subset import ChannelSubset
from .triangular import TriangularAffine, triangular_affine

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineAutoregressive",
    "BoundedAffineCoupling",
    "ChannelPermutation",
    "ChannelSubset",
    "ConditionalAdditiveCoupling",
    "ConditionalBoundedAffineCoupling",
    "ConditionalDenseResidual",
    "ConditionalElementwiseAffine",
    "ConditionalInvertibleResidual",
    "ConditionalRevNetBlock",
    "ConditionalSplineAutoregressive",
    "DenseResidual",
    "Inverse",
    "InvertibleConv1x1",
    "InvertibleDownsampling",
    "InvertibleModule",
    "InvertibleResidual",
    "PixelResidual",
    "RevNetBlock",
    "ReversibleStack",
    "SolveStats",
    "SplineAutoregressive",
    "TriangularAffine",
    "actnorm",
    "additive_coupling",
    "affine_autoregressive",
    "affine_coupling",
    "channel_permutation",
    "conditional_additive_coupling",
    "conditional_affine_coupling",
    "conditional_dense_residual",
    "conditional_elementwise_affine",
    "conditional_iresnet",
    "conditional_revnet_block",
    "conditional_spline_autoregressive",
    "dense_residual",
    "initialize_actnorm",
    "inverse",
    "invertible_conv1x1",
    "invertible_downsampling",
    "iresnet",
    "pixel_residual",
    "reversible_stack",
    "revnet_block",
    "spline_autoregressive",
    "triangular_affine",
]
