"""Lipschitz-constrained networks for invertible residual blocks."""

from .activations import LipELU, LipSwish, make_activation
from .lipschitz_cnn import LipschitzCNN
from .lipschitz_mlp import ConditionalLipschitzMLP, LipschitzMLP
from .spectral import (
    ConvSpectralNormScale,
    SpectralNormScale,
    default_power_tolerance,
    operator_norm,
    spectral_norm,
)

__all__ = [
    "ConditionalLipschitzMLP",
    "ConvSpectralNormScale",
    "LipELU",
    "LipSwish",
    "LipschitzCNN",
    "LipschitzMLP",
    "SpectralNormScale",
    "default_power_tolerance",
    "make_activation",
    "operator_norm",
    "spectral_norm",
]
