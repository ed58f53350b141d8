"""pyro-invres: invertible residual networks and reversible blocks as Pyro transforms.

Start with :func:`iresnet` (one i-ResNet block) or :func:`residual_flow` (a stack), and
use them anywhere Pyro takes a transform.

The names below load on first use (PEP 562): ``import pyro_invres`` and the
``pyro-invres`` command's ``--help`` import no torch until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Each public name and the submodule that defines it.
_EXPORTS = {
    **dict.fromkeys(
        [
            "base_shape",
            "conditional_residual_flow",
            "conditional_spline_residual_flow",
            "glow",
            "glow_residual",
            "irevnet",
            "posterior_flow",
            "residual_flow",
        ],
        ".flows",
    ),
    "AutoResidualFlow": ".autoguide",
    **dict.fromkeys(["ConvergenceError", "ConvergenceWarning"], ".ops"),
    **dict.fromkeys(
        [
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
            "inverse",
            "invertible_conv1x1",
            "invertible_downsampling",
            "iresnet",
            "reversible_stack",
            "revnet_block",
        ],
        ".transforms",
    ),
}
_SUBMODULES = ("nn", "npe", "ops")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])

if TYPE_CHECKING:  # static tools see the names as before
    from . import nn, npe, ops  # noqa: F401
    from .autoguide import AutoResidualFlow  # noqa: F401
    from .flows import (  # noqa: F401
        base_shape,
        conditional_residual_flow,
        conditional_spline_residual_flow,
        glow,
        glow_residual,
        irevnet,
        posterior_flow,
        residual_flow,
    )
    from .ops import ConvergenceError, ConvergenceWarning  # noqa: F401
    from .transforms import *  # noqa: F401,F403


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
