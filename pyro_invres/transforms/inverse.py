"""The inverse of a transform module, as a transform module that keeps its parameters.

Pyro's ``t.inv`` is a plain ``_InverseTransform``: not an ``nn.Module``, so
``pyro.module`` and optimizers never see its parameters and a flow built from it silently
never trains. :class:`Inverse` is the first-class alternative.
"""

from __future__ import annotations

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform, constraints

__all__ = ["Inverse", "inverse"]


class Inverse(TransformModule):
    """``Inverse(t)`` maps ``y -> t^{-1}(y)``; its parameters are ``t``'s.

    .. math::

        \\log\\left|\\det \\frac{\\partial t^{-1}(y)}{\\partial y}\\right|
        = -\\log\\left|\\det \\frac{\\partial t(x)}{\\partial x}\\right|_{x = t^{-1}(y)}

    Caching is ``t``'s own: the pair computed in either direction is shared, so the
    inverse of a sample ``t`` produced (or the reverse) is never recomputed.

    Arguments:
        transform: a bijective :class:`~pyro.distributions.TransformModule`.

    Example:
        >>> import torch
        >>> from pyro_invres import iresnet
        >>> block = iresnet(2, [8])
        >>> flipped = Inverse(block)
        >>> len(list(flipped.parameters())) == len(list(block.parameters()))
        True
        >>> x = torch.randn(4, 2)
        >>> torch.allclose(flipped(block(x)), x, atol=1e-4)
        True
    """

    bijective = True

    def __init__(self, transform: Transform) -> None:
        if not isinstance(transform, torch.nn.Module):
            raise TypeError(f"Inverse wraps a TransformModule, got {type(transform).__name__}")
        if not getattr(transform, "bijective", False):
            raise ValueError(f"{type(transform).__name__} is not bijective")
        super().__init__(cache_size=0)
        self.transform = transform

    @constraints.dependent_property(is_discrete=False)
    def domain(self) -> constraints.Constraint:
        return self.transform.codomain

    @constraints.dependent_property(is_discrete=False)
    def codomain(self) -> constraints.Constraint:
        return self.transform.domain

    @property
    def sign(self) -> int:
        return self.transform.sign

    def _call(self, x: Tensor) -> Tensor:
        return self.transform._inv_call(x)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.transform(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return -self.transform.log_abs_det_jacobian(y, x)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        return self.transform.inverse_shape(shape)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return self.transform.forward_shape(shape)

    def __repr__(self) -> str:
        return torch.nn.Module.__repr__(self)


def inverse(transform: Transform) -> Inverse:
    """Factory for :class:`Inverse` (``inverse(t)`` rather than ``t.inv``).

    Example:
        >>> import torch
        >>> from pyro_invres import iresnet
        >>> block = iresnet(2, [8])
        >>> flipped = inverse(block)
        >>> isinstance(flipped, torch.nn.Module), isinstance(block.inv, torch.nn.Module)
        (True, False)
        >>> x = torch.randn(4, 2)
        >>> y = block(x)
        >>> ladj = flipped.log_abs_det_jacobian(y, x)
        >>> bool(torch.allclose(ladj, -block.log_abs_det_jacobian(x, y)))
        True
    """
    return Inverse(transform)
