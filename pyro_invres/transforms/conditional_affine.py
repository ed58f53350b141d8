"""A conditional elementwise affine map: location and scale computed from the context.

.. math::

    y = \\mu(c) + e^{s(c)} \\odot z, \\qquad s(c) = b \\tanh(\\tilde s(c) / b), \\qquad
    \\log|\\det J| = \\textstyle\\sum_i s_i(c),

with ``(mu, s~)`` the two heads of a small dense network of the context ``c`` and ``b`` the
log-scale bound (as the affine couplings bound theirs). The last layer starts at zero, so
the map starts as the identity. As the last layer of a conditional flow (on the data side)
it gives every observation its own posterior location and scale in one step, which
residual blocks (singular values in ``[1 - c, 1 + c]``) can only build up slowly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.nn import DenseNN
from torch import Tensor
from torch.distributions import constraints

from ..nn.conditioners import ContextBound
from .base import InvertibleModule
from .coupling import bounded_log_scale

__all__ = [
    "ConditionalElementwiseAffine",
    "ConditionedElementwiseAffine",
    "conditional_elementwise_affine",
]


class ConditionalElementwiseAffine(ConditionalTransformModule):
    """``z -> mu(c) + exp(s(c)) * z``, elementwise, ``mu`` and ``s`` from the context.

    ``.condition(context)`` returns a :class:`ConditionedElementwiseAffine` whose location
    and scale have the context's batch shape, so one context ``(C,)`` serves a batch
    ``(n, D)`` and contexts ``(B, C)`` serve ``(B, D)`` or ``(n, B, D)``. They are
    computed from the context at every call (not once at ``condition``), so one
    conditioned flow can be scored and back-propagated through any number of times.

    Arguments:
        input_dim: ``D``.
        context_dim: ``C``.
        hidden_dims: hidden sizes of the network of the context (``[]``: linear in ``c``).
        log_scale_bound: ``b``, the bound on each ``|s_i(c)|``.

    Example:
        >>> import torch
        >>> layer = ConditionalElementwiseAffine(2, 3, [16])
        >>> t = layer.condition(torch.randn(4, 3))
        >>> z = torch.randn(10, 4, 2)
        >>> torch.equal(t(z), z), t.log_abs_det_jacobian(z, t(z)).shape   # identity at first
        (True, torch.Size([10, 4]))
    """

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] = (32, 32),
        log_scale_bound: float = 5.0,
    ) -> None:
        super().__init__()
        for name, value in (("input_dim", input_dim), ("context_dim", context_dim)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not log_scale_bound > 0:
            raise ValueError(f"log_scale_bound must be positive, got {log_scale_bound!r}")
        self.input_dim, self.context_dim = int(input_dim), int(context_dim)
        self.log_scale_bound = float(log_scale_bound)
        dim = self.input_dim
        self.nn = DenseNN(self.context_dim, list(hidden_dims), param_dims=[dim, dim])
        last = self.nn.layers[-1]
        with torch.no_grad():  # identity at the start: the rest of the flow starts as it would
            last.weight.zero_()
            last.bias.zero_()

    def forward(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu(c), s(c))``, each ``(..., D)`` over the context's batch (``z`` unused)."""
        loc, raw = self.nn(context)
        return loc, bounded_log_scale(raw, self.log_scale_bound)

    def condition(self, context: Tensor) -> ConditionedElementwiseAffine:
        """The affine map for ``context`` ``(..., C)``: loc and scale ``(..., D)``."""
        if not isinstance(context, Tensor) or context.dim() == 0:
            raise ValueError(f"context must be a tensor (..., {self.context_dim})")
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"expected a context of shape (..., {self.context_dim}), got {tuple(context.shape)}"
            )
        return ConditionedElementwiseAffine(self, context)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, context_dim={self.context_dim}, "
            f"log_scale_bound={self.log_scale_bound}"
        )


class ConditionedElementwiseAffine(InvertibleModule):
    """A :class:`ConditionalElementwiseAffine` bound to one context (what ``.condition`` gives).

    Example:
        >>> layer = ConditionalElementwiseAffine(2, 3, [8])
        >>> t = layer.condition(torch.zeros(4, 3))
        >>> t(torch.ones(5, 4, 2)).shape
        torch.Size([5, 4, 2])
    """

    sign = 1

    def __init__(self, layer: ConditionalElementwiseAffine, context: Tensor) -> None:
        super().__init__((layer.input_dim,))
        # a ContextBound: checks the context's batch against each input's, and the cache
        # keys on the context it holds
        self.bound = ContextBound(layer, context, event_dim=1)

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loc, log_scale = self.bound(x)
        return loc + log_scale.exp() * x, log_scale.sum(-1).expand(x.shape[:-1])

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        loc, log_scale = self.bound(y)
        return (y - loc) * torch.exp(-log_scale), log_scale.sum(-1).expand(y.shape[:-1])


def conditional_elementwise_affine(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] = (32, 32),
    *,
    log_scale_bound: float = 5.0,
) -> ConditionalElementwiseAffine:
    """Build a :class:`ConditionalElementwiseAffine` (arguments as there).

    Example:
        >>> import torch
        >>> layer = conditional_elementwise_affine(3, 2)
        >>> layer.condition(torch.zeros(2))(torch.ones(5, 3)).shape
        torch.Size([5, 3])
    """
    return ConditionalElementwiseAffine(
        input_dim, context_dim, hidden_dims, log_scale_bound=log_scale_bound
    )
