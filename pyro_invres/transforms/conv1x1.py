"""The invertible 1x1 convolution of Glow, LU-parametrised.

A learned invertible linear map of the channels, applied at every pixel:

.. math::

    y_{:, h, w} = W x_{:, h, w}, \\qquad
    W = P L \\left(U + \\operatorname{diag}(\\sigma \\odot e^{s})\\right), \\qquad
    \\log|\\det J| = H W \\sum_c s_c ,

with ``P`` a fixed permutation, ``L`` unit lower triangular, ``U`` strictly upper
triangular, ``s`` the learned log-magnitudes of the pivots and ``sigma`` their fixed signs.
``W`` starts as a random rotation, factorised by :func:`torch.linalg.lu`. The inverse is
``W^{-1} = (U + diag(sigma e^s))^{-1} L^{-1} P^T``, from two triangular solves. On vectors
(``event_dim=1``) the block is a learned invertible linear map with ``H W = 1``.

Because ``P`` and ``sigma`` are fixed and the initial ``W`` is a rotation,
``det W = +1 \\cdot \\prod_c e^{s_c} > 0`` for ever, so the Jacobian determinant
``(\\det W)^{H W}`` is positive at any image size: ``sign = +1``.

References:
    [1] Kingma & Dhariwal, *Glow: Generative Flow with Invertible 1x1 Convolutions*,
        NeurIPS 2018. arXiv:1807.03039
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import InvertibleModule, as_event_shape
from .downsample import _check_event_dim, _check_positive, _generator, _permutation_sign

__all__ = ["InvertibleConv1x1", "invertible_conv1x1"]


def _random_rotation(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A random ``n x n`` rotation (orthogonal, determinant +1), in float64."""
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.where(r.diagonal() < 0, -1.0, 1.0)  # Haar-distributed orthogonal
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


class InvertibleConv1x1(InvertibleModule):
    """Glow's invertible 1x1 convolution ``y = W x`` per pixel, with ``W`` in LU form.

    Arguments:
        num_channels: channels ``C`` (or the dimension ``D`` of vectors).
        event_dim: 1 for vectors ``(D,)``, 3 for images ``(C, H, W)`` of any size.
        seed: seed of the initial rotation; None draws from torch's global generator, so
            stacked blocks differ and ``torch.manual_seed`` makes them reproducible.
        cache_size: 0 or 1.

    Parameters ``lower``, ``upper`` (only their strict triangles are used) and
    ``log_scale``; buffers ``permutation`` (the row order of ``P``) and ``sign_scale``.

    Cost and cache: ``O(C^3)`` per call to assemble ``W`` (or ``W^{-1}``, two triangular
    solves), then ``O(C^2)`` per pixel both ways; the log-det costs ``O(C)`` and needs
    neither ``x`` nor ``y``.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> conv = InvertibleConv1x1(3, seed=0)
        >>> pyro.module("conv", conv)  # doctest: +ELLIPSIS
        InvertibleConv1x1(...)
        >>> base = dist.Normal(torch.zeros(3, 4, 4), 1.0).to_event(3)
        >>> flow = dist.TransformedDistribution(base, [conv])
        >>> x = flow.sample((2,))
        >>> flow.log_prob(x).shape
        torch.Size([2])
        >>> torch.allclose(conv._inverse(conv._call(x)), x, atol=1e-5)
        True
    """

    sign = 1  # det W keeps the sign of the initial rotation (see the module docstring)

    permutation: Tensor
    sign_scale: Tensor

    def __init__(
        self,
        num_channels: int,
        event_dim: int = 3,
        seed: int | None = None,
        cache_size: int = 1,
    ) -> None:
        num_channels = _check_positive("num_channels", num_channels)
        event_dim = _check_event_dim(event_dim)
        super().__init__((num_channels,) + (-1,) * (event_dim - 1), cache_size=cache_size)
        self.num_channels = num_channels
        p, lower, upper = torch.linalg.lu(_random_rotation(num_channels, _generator(seed)))
        pivots = upper.diagonal()
        dtype = torch.get_default_dtype()
        # P[i, perm[i]] = 1, so (P M)[i] = M[perm[i]]
        self.register_buffer("permutation", p.argmax(dim=1))
        self.register_buffer("sign_scale", pivots.sign().to(dtype))
        self.lower = nn.Parameter(lower.tril(-1).to(dtype))
        self.upper = nn.Parameter(upper.triu(1).to(dtype))
        self.log_scale = nn.Parameter(pivots.abs().log().to(dtype))
        if _permutation_sign(self.permutation.tolist()) * int(self.sign_scale.prod()) != 1:
            raise AssertionError("the initial rotation must have determinant +1")

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.num_channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.sign_scale * self.log_scale.exp())
        return lower, upper

    def weight(self) -> Tensor:
        """The matrix ``W = P L (U + diag(sigma e^s))``, shaped ``(C, C)``."""
        lower, upper = self._factors()
        return (lower @ upper)[self.permutation]

    def inverse_weight(self) -> Tensor:
        """``W^{-1}`` by two triangular solves (no general matrix inverse)."""
        lower, upper = self._factors()
        dtype = lower.dtype
        if torch.finfo(dtype).bits < 32:  # torch has no float16/bfloat16 triangular solves
            lower, upper = lower.float(), upper.float()
        eye = torch.eye(self.num_channels, dtype=lower.dtype, device=lower.device)
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        inverse = torch.linalg.solve_triangular(upper, lower_inv, upper=True)
        # (A P^T)[:, j] = A[:, perm[j]]
        return inverse[:, self.permutation].to(dtype)

    def _per_channel(self, matrix: Tensor, x: Tensor) -> Tensor:
        channels_last = x.movedim(-self.event_dim, -1)
        return (channels_last @ matrix.mT).movedim(-1, -self.event_dim)

    def _call(self, x: Tensor) -> Tensor:
        return self._per_channel(self.weight(), x)

    def _inverse(self, y: Tensor) -> Tensor:
        return self._per_channel(self.inverse_weight(), y)

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        n_batch = x.dim() - self.event_dim
        positions = math.prod(x.shape[n_batch + 1 :])
        return (self.log_scale.sum() * positions).expand(x.shape[:n_batch])

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, event_dim={self.event_dim}"


def invertible_conv1x1(
    input_dim: int | Sequence[int], *, seed: int | None = None
) -> InvertibleConv1x1:
    """Build an :class:`InvertibleConv1x1` for vectors (an int) or images ``(C, H, W)``.

    Example:
        >>> invertible_conv1x1((3, 8, 8)).event_dim, invertible_conv1x1(5).event_dim
        (3, 1)
    """
    shape = as_event_shape(input_dim)
    return InvertibleConv1x1(shape[0], event_dim=len(shape), seed=seed)
