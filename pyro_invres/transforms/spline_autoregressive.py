"""Rational-quadratic spline autoregressive layer (MAF direction), plain and conditional.

.. math::

    z_i = s\\bigl(y_i;\\, \\theta_i(y_{<i}, c)\\bigr), \\qquad
    \\log\\Bigl|\\det \\frac{\\partial z}{\\partial y}\\Bigr| = \\sum_i \\log s'(y_i;\\theta_i),

with ``s`` a monotone rational-quadratic spline on ``[-B, B]`` (identity outside; Durkan
et al. 2019; :func:`~pyro_invres.ops.rq_spline.rq_spline`) whose ``K`` bin widths,
heights and interior derivatives come from a :class:`~pyro_invres.nn.masked_mlp.MaskedMLP`
of the earlier coordinates and the context. This is the layer of a neural spline flow in
the density direction: scoring a variable ``y`` (Pyro's inverse, variable to base) is one
network pass, and sampling (Pyro's forward, base to variable) fills the coordinates in
rank order, ``D`` passes, as a masked autoregressive flow does. That is the right trade in
neural posterior estimation, where training scores every simulated pair and the
parameter dimension is small.

References:
    [1] Durkan, Bekasov, Murray & Papamakarios, *Neural Spline Flows*, NeurIPS 2019.
        arXiv:1906.04087
    [2] Papamakarios, Pavlakou & Murray, *Masked Autoregressive Flow for Density
        Estimation*, NeurIPS 2017. arXiv:1705.07057
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn

from ..nn.conditioners import ContextBound, _check_context
from ..nn.masked_mlp import MaskedMLP
from ..ops.rq_spline import rq_spline
from .base import InvertibleModule

__all__ = [
    "ConditionalSplineAutoregressive",
    "SplineAutoregressive",
    "conditional_spline_autoregressive",
    "spline_autoregressive",
]

_MIN_DERIVATIVE = 1e-3


def _spline_net(
    input_dim: int,
    count_bins: int,
    hidden_dims: Sequence[int],
    context_dim: int,
    order: Tensor | Sequence[int] | None,
) -> MaskedMLP:
    """The masked network of a spline layer, whose output bias makes the layer the
    identity at first: equal bins and every derivative 1."""
    k = int(count_bins)
    derivative = math.log(math.expm1(1.0 - _MIN_DERIVATIVE))  # softplus^-1(1 - min)
    bias = torch.cat([torch.zeros(2 * k), torch.full((k - 1,), derivative)])
    return MaskedMLP(input_dim, 3 * k - 1, hidden_dims, context_dim, order, out_bias=bias)


class SplineAutoregressive(InvertibleModule):
    """A spline autoregressive layer, explicit (one pass) from the variable to the base.

    Pyro's forward (base ``x`` to variable ``y``) inverts the spline coordinate by
    coordinate in the network's rank order (``D`` passes); the inverse (``y`` to ``x``,
    scoring) is one pass. Both return the forward log-det ``log|det dy/dx|``.

    Arguments:
        nn: a :class:`~pyro_invres.nn.masked_mlp.MaskedMLP` with ``3 K - 1`` parameters
            per coordinate (or a module ``y -> theta (..., D, 3K-1)`` with an ``order``
            buffer and ``input_dim``, e.g. a context bound to one).
        count_bins: ``K``.
        bound: ``B``; the spline is the identity outside ``[-B, B]``.
        cache_size: 0 or 1.

    Example:
        >>> layer = spline_autoregressive(3, hidden_dims=[16])
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(layer(x), x, atol=1e-5)   # the identity at initialisation
        True
    """

    sign = +1

    def __init__(
        self, nn: nn.Module, count_bins: int = 8, bound: float = 5.0, cache_size: int = 1
    ) -> None:
        if isinstance(count_bins, bool) or int(count_bins) != count_bins or count_bins < 2:
            raise ValueError(f"count_bins must be an integer >= 2, got {count_bins!r}")
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound must be positive and finite, got {bound!r}")
        super().__init__((int(nn.input_dim),), cache_size=cache_size)
        self.nn = nn
        self.count_bins = int(count_bins)
        self.bound = float(bound)

    def _spline(self, value: Tensor, theta: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        k = self.count_bins
        widths, heights, derivs = theta[..., :k], theta[..., k : 2 * k], theta[..., 2 * k :]
        return rq_spline(
            value, widths, heights, derivs, self.bound, inverse=inverse,
            min_derivative=_MIN_DERIVATIVE,
        )  # fmt: skip

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x, log_dx = self._spline(y, self.nn(y), inverse=False)
        return x, -log_dx.sum(-1)

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # coordinate of rank r is right after pass r: it reads only lower ranks, already set
        y = torch.zeros_like(x)
        for _ in range(self.event_shape[0]):
            y, log_dy = self._spline(x, self.nn(y), inverse=True)
        return y, log_dy.sum(-1)

    def extra_repr(self) -> str:
        return f"input_dim={self.event_shape[0]}, count_bins={self.count_bins}, bound={self.bound}"


class _Bound(nn.Module):
    """A :class:`ContextBound` that keeps the masked network's ``order`` and size visible."""

    def __init__(self, net: MaskedMLP, context: Tensor) -> None:
        super().__init__()
        self.bound = ContextBound(net, context, event_dim=1)
        self.input_dim = net.input_dim
        self.register_buffer("order", net.order, persistent=False)

    def forward(self, y: Tensor) -> Tensor:
        return self.bound(y)


class ConditionalSplineAutoregressive(ConditionalTransformModule):
    """The conditional twin: the spline's parameters also depend on a context ``c``.

    ``.condition(context)`` returns a :class:`SplineAutoregressive` sharing this module's
    network; a context ``(C,)`` serves any batch, contexts ``(B, C)`` serve variables
    ``(B, D)`` and draws ``(n, B, D)``.

    Arguments:
        input_dim: ``D``.
        context_dim: ``C``.
        hidden_dims: the masked network's hidden sizes.
        count_bins: ``K``.
        bound: ``B``.
        order: the coordinates' ranks (default ``0..D-1``).

    Example:
        >>> import pyro.distributions as dist
        >>> layer = conditional_spline_autoregressive(2, context_dim=3, hidden_dims=[16])
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> q = dist.ConditionalTransformedDistribution(base, [layer])
        >>> q.condition(torch.randn(3)).sample((5,)).shape
        torch.Size([5, 2])
    """

    bijective = True
    event_dim = 1

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        count_bins: int = 8,
        bound: float = 5.0,
        order: Tensor | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(context_dim, bool) or int(context_dim) != context_dim or context_dim < 1:
            raise ValueError(f"context_dim must be a positive integer, got {context_dim!r}")
        self.nn = _spline_net(input_dim, count_bins, hidden_dims, int(context_dim), order)
        self.count_bins, self.bound = int(count_bins), float(bound)
        # check the arguments once, here, as the bound layers would
        SplineAutoregressive(self.nn, self.count_bins, self.bound)

    def condition(self, context: Tensor) -> SplineAutoregressive:
        _check_context(context, self.nn.context_dim)
        return SplineAutoregressive(_Bound(self.nn, context), self.count_bins, self.bound)

    def extra_repr(self) -> str:
        return f"count_bins={self.count_bins}, bound={self.bound}"


def spline_autoregressive(
    input_dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    count_bins: int = 8,
    bound: float = 5.0,
    order: Tensor | Sequence[int] | None = None,
) -> SplineAutoregressive:
    """Build a :class:`SplineAutoregressive` layer, the identity at initialisation.

    Example:
        >>> spline_autoregressive(4, [32]).nn.params_per_dim
        23
    """
    return SplineAutoregressive(
        _spline_net(input_dim, count_bins, hidden_dims, 0, order), count_bins, bound
    )


def conditional_spline_autoregressive(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    count_bins: int = 8,
    bound: float = 5.0,
    order: Tensor | Sequence[int] | None = None,
) -> ConditionalSplineAutoregressive:
    """Build a :class:`ConditionalSplineAutoregressive` layer (arguments as there).

    Example:
        >>> layer = conditional_spline_autoregressive(3, 2, [16])
        >>> t = layer.condition(torch.zeros(2))
        >>> x = torch.randn(6, 3)
        >>> torch.allclose(t.inv(x), x, atol=1e-5)
        True
    """
    return ConditionalSplineAutoregressive(
        input_dim, context_dim, hidden_dims, count_bins, bound, order
    )
