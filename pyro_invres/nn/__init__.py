"""Networks for invertible blocks: Lipschitz-constrained branches and coupling conditioners."""

from .activations import LipELU, LipReLU, LipSine, LipSwish, make_activation
from .conditioners import (
    ConditionalConvConditioner,
    ContextBound,
    ConvConditioner,
    default_hidden_dims,
    make_conditioner,
)
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
    "ConditionalConvConditioner",
    "ConditionalLipschitzMLP",
    "ContextBound",
    "ConvConditioner",
    "ConvSpectralNormScale",
    "LipELU",
    "LipReLU",
    "LipSine",
    "LipSwish",
    "LipschitzCNN",
    "LipschitzMLP",
    "SpectralNormScale",
    "default_hidden_dims",
    "default_power_tolerance",
    "make_activation",
    "make_conditioner",
    "operator_norm",
    "spectral_norm",
]
