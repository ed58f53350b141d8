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

from .base import InvertibleModule

__all__ = ["Inverse", "inverse"]


def _has_contract(transform: Transform) -> bool:
    """Whether ``transform`` keeps this package's block contract (``cached=`` included).

    By type, not by attribute: zuko adds a ``call_and_ladj(x)`` without ``cached`` to every
    ``torch.distributions.Transform`` when it is imported.
    """
    return isinstance(transform, (InvertibleModule, Inverse))


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
        return self.transform.inv(x)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.transform(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return -self.transform.log_abs_det_jacobian(y, x)

    # the block contract of :class:`~pyro_invres.transforms.InvertibleModule`, by the
    # wrapped block's (or, for another Pyro transform, by its public methods)
    def call_and_ladj(self, x: Tensor, cached: bool = True) -> tuple[Tensor, Tensor]:
        """``(f^{-1}(x), log|det d f^{-1}/dx|)`` for the wrapped ``f``.

        Example:
            >>> import torch
            >>> from pyro_invres.transforms import affine_coupling
            >>> block = affine_coupling(4, [8])
            >>> x = torch.randn(3, 4)
            >>> y, ladj = Inverse(block).call_and_ladj(x, cached=False)
            >>> x2, ladj2 = block.call_and_ladj(y, cached=False)
            >>> torch.allclose(x2, x, atol=1e-6), torch.allclose(ladj, -ladj2, atol=1e-6)
            (True, True)
        """
        if _has_contract(self.transform):
            out, ladj = self.transform.inverse_and_ladj(x, cached=cached)
            return out, -ladj
        out = self.transform.inv(x)
        return out, -self.transform.log_abs_det_jacobian(out, x)

    def inverse_and_ladj(self, y: Tensor, cached: bool = True) -> tuple[Tensor, Tensor]:
        """``(f(y), log|det d f^{-1}/dx|)`` at ``x = f(y)`` for the wrapped ``f``.

        Example:
            >>> import torch
            >>> from pyro_invres.transforms import affine_coupling
            >>> x, ladj = Inverse(affine_coupling(4, [8])).inverse_and_ladj(torch.ones(2, 4))
            >>> x.shape, ladj.shape
            (torch.Size([2, 4]), torch.Size([2]))
        """
        if _has_contract(self.transform):
            out, ladj = self.transform.call_and_ladj(y, cached=cached)
            return out, -ladj
        out = self.transform(y)
        return out, -self.transform.log_abs_det_jacobian(y, out)

    def as_coupling(self) -> None:
        """``None``: a reversible stack unwraps an ``Inverse`` and runs the block backwards.

        Example:
            >>> from pyro_invres.transforms import affine_coupling
            >>> Inverse(affine_coupling(4, [8])).as_coupling() is None
            True
        """
        return None

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
