"""Affine autoregressive layer (IAF direction): explicit and one pass in the sampling direction.

.. math::

    y_i = x_i\\, e^{s_i(x_{<i})} + t_i(x_{<i}), \\qquad s = b \\tanh(a / b), \\qquad
    \\log|\\det J| = \\textstyle\\sum_i s_i ,

with ``(a, t)`` a :class:`~pyro_invres.nn.made.MADE` of ``x`` (``<i`` in its rank order).
The Jacobian is triangular in that order, so the log-det is exact and free. Sampling and
scoring its own samples is one network pass; the inverse, needed only for points the
flow did not draw, solves coordinate by coordinate (``D`` passes), as Pyro's
``AffineAutoregressive`` does. Each coordinate's scale depends on every earlier one, so
one layer already expresses a funnel's ``x_j | v ~ N(0, e^{v})`` or a centred hierarchy's
``theta_j = mu + tau eta_j`` when the conditioning coordinate comes first.

References:
    [1] Kingma et al., *Improved Variational Inference with Inverse Autoregressive Flow*,
        NeurIPS 2016. arXiv:1606.04934
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..nn.made import MADE
from .base import InvertibleModule
from .coupling import bounded_log_scale

__all__ = ["AffineAutoregressive", "affine_autoregressive"]


class AffineAutoregressive(InvertibleModule):
    """``y = x * exp(s(x)) + t(x)`` with ``s_i, t_i`` functions of the earlier coordinates.

    Arguments:
        nn: a :class:`~pyro_invres.nn.made.MADE` (or any autoregressive ``x -> (raw, t)``
            whose ``order`` buffer gives each coordinate's rank).
        log_scale_bound: ``b``; each coordinate is scaled by a factor in ``(e^-b, e^b)``.
        cache_size: 0 or 1.

    Example:
        >>> layer = affine_autoregressive(3, [8])
        >>> x = torch.randn(4, 3)
        >>> bool((layer(x) == x).all())   # the identity at initialisation
        True
    """

    sign = +1

    def __init__(self, nn: MADE, log_scale_bound: float = 4.0, cache_size: int = 1) -> None:
        if not (math.isfinite(log_scale_bound) and log_scale_bound > 0):
            raise ValueError(f"log_scale_bound must be positive and finite, got {log_scale_bound}")
        super().__init__((nn.input_dim,), cache_size=cache_size)
        self.nn = nn
        self.log_scale_bound = float(log_scale_bound)

    @property
    def order(self) -> Tensor:
        """Each coordinate's rank in the autoregressive order."""
        return self.nn.order

    def _scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = self.nn(x)
        return bounded_log_scale(raw, self.log_scale_bound), shift

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(x)
        return x * s.exp() + t, s.sum(-1)

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        # x's coordinate of rank r depends on y and x's coordinates of lower rank only, so
        # D sweeps (in rank order) fix every coordinate exactly
        x = torch.zeros_like(y)
        for r in range(self.event_shape[0]):
            s, t = self._scale_shift(x)
            x = torch.where(self.order == r, (y - t) * torch.exp(-s), x)
        s, _ = self._scale_shift(x)
        return x, s.sum(-1)

    def extra_repr(self) -> str:
        return f"order={self.order.tolist()}, log_scale_bound={self.log_scale_bound}"


def affine_autoregressive(
    input_dim: int,
    hidden_dims: Sequence[int] = (),
    *,
    order: Tensor | None = None,
    log_scale_bound: float = 4.0,
) -> AffineAutoregressive:
    """Build an :class:`AffineAutoregressive` layer on a zero-initialised MADE.

    Arguments:
        input_dim: ``D``.
        hidden_dims: ``[H]`` or ``[]`` (log-linear: only the linear skip path).
        order: each coordinate's rank (default ``0..D-1``; ``flip`` it in the next layer
            so that every coordinate conditions every other somewhere).
        log_scale_bound: ``b``.

    Example:
        >>> layer = affine_autoregressive(3, [], order=torch.tensor([2, 1, 0]))
        >>> layer.order.tolist()
        [2, 1, 0]
    """
    return AffineAutoregressive(
        MADE(int(input_dim), hidden_dims, order=order), log_scale_bound=log_scale_bound
    )
