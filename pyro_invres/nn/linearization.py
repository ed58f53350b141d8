"""A dense residual branch linearised at a point: its Jacobian as explicit products.

For ``g = W_L \\circ \\phi \\circ \\cdots \\circ \\phi \\circ W_1`` (affine layers, activations
whose Jacobian is a diagonal, or CLipSwish's stacked pair of diagonals) the Jacobian at
``x`` is the product

.. math::

    J_g(x) = W_L\\, D_{L-1}\\, W_{L-1} \\cdots D_1\\, W_1, \\qquad D_l = \\phi'(h_l),

so once the forward pass has kept the weights and the slopes ``phi'(h_l)``, a
vector-Jacobian product ``u^T J_g`` is ``L`` small matrix products and ``L - 1``
elementwise products. No autograd traversal is needed, and a product built from the kept
tensors *with* their graph is an ordinary differentiable expression: differentiating
``w^T J_g(x) v`` (the Neumann-series surrogate of the log-det's gradient) costs one plain
backward instead of the double backward of an autograd vector-Jacobian product.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from .activations import forward_with_slope, slope_vjp

__all__ = ["Linearization", "can_linearize", "linearize_sequential"]


class Linearization:
    """The Jacobian of a dense branch at the points it was evaluated at.

    Built by :func:`linearize_sequential` (through
    :meth:`~pyro_invres.nn.LipschitzMLP.linearize`). ``steps`` lists, from the input to
    the output, ``("linear", W, gain)`` and ``("act", slope, expansion)``.

    Example:
        >>> import torch
        >>> from pyro_invres.nn import LipschitzMLP
        >>> g = LipschitzMLP(3, [8], lipschitz=0.9)
        >>> x = torch.randn(5, 3, requires_grad=True)
        >>> gx, lin = g.linearize(x)
        >>> u = torch.randn(5, 3)
        >>> (ref,) = torch.autograd.grad(gx, x, u)
        >>> bool(torch.allclose(lin.vjp(u), ref, atol=1e-6))
        True
    """

    def __init__(self, steps: Sequence[tuple]) -> None:
        self._steps = list(steps)
        self._detached: list[tuple] | None = None

    @property
    def steps(self) -> list[tuple]:
        """The factors, from the input to the output, with their graph."""
        if any(kind == "lazy" for kind, _, _ in self._steps):
            # slopes deferred by ``linearize_sequential(lazy=True)``: from the kept
            # pre-activations, now that a product is asked for
            self._steps = [
                ("act", forward_with_slope(a, b)[1], int(getattr(a, "expansion", 1)))
                if kind == "lazy"
                else (kind, a, b)
                for kind, a, b in self._steps
            ]
        return self._steps

    @property
    def detached(self) -> list[tuple]:
        """The same factors without their graph, for the products that need no gradient."""
        if self._detached is None:
            self._detached = [
                (kind, a.detach(), b.detach() if isinstance(b, Tensor) else b)
                for kind, a, b in self.steps
            ]
        return self._detached

    @staticmethod
    def _vjp(steps: Sequence[tuple], u: Tensor) -> Tensor:
        for kind, a, b in reversed(steps):
            if kind == "linear":
                u = u @ a  # (..., out) -> (..., in): u^T W
                if b is not None:
                    u = u * b
            else:
                u = slope_vjp(u, a, b)
        return u

    def vjp(self, u: Tensor) -> Tensor:
        """``u^T J_g(x)`` without a graph (``u``: the output's shape, or a batch of them)."""
        return self._vjp(self.detached, u)

    def graph_vjp(self, u: Tensor) -> Tensor:
        """``u^T J_g(x)`` differentiable in the weights, the slopes and so in ``x``."""
        return self._vjp(self.steps, u)


def linearize_sequential(
    layers: nn.Sequential, x: Tensor, gains: Tensor | None = None, lazy: bool = False
) -> tuple[Tensor, Linearization]:
    """Run dense ``layers`` on ``x`` as their ``forward`` does and keep their Jacobian.

    Every weight is read once (a spectral parametrization runs once), and the output is
    computed by the same operations as the layers' own forward passes, so it is the same
    tensor as ``layers(x)`` (with ``gains``: as :class:`~pyro_invres.nn.LipschitzMLP`
    applies them, to each linear layer's input).

    With ``lazy=True`` the activations run their plain forward and only their inputs are
    kept (the graph saves them anyway); the slopes are computed when a product is first
    asked for. A stack of blocks evaluates every block before any log-det, so eager
    slopes (and their graph) of all blocks would be alive at once: the memory-saving
    gradient mode, which frees each block's log-det graph at once, defers them.

    Example:
        >>> import torch
        >>> from pyro_invres.nn import LipSwish
        >>> net = nn.Sequential(nn.Linear(2, 4), LipSwish(), nn.Linear(4, 2))
        >>> x = torch.randn(3, 2)
        >>> gx, lin = linearize_sequential(net, x)
        >>> torch.equal(gx, net(x)), lin.vjp(torch.ones(3, 2)).shape
        (True, torch.Size([3, 2]))
    """
    if gains is not None:
        gains = gains.to(x.dtype)
    h, i = x, 0
    steps: list[tuple] = []
    for layer in layers:
        if isinstance(layer, nn.Linear):
            gain = None
            if gains is not None:
                gain = gains[i]
                h = h * gain
                i += 1
            weight = layer.weight  # one read: the spectral parametrization runs once
            h = F.linear(h, weight, layer.bias)
            steps.append(("linear", weight, gain))
        elif lazy:
            steps.append(("lazy", layer, h))
            h = layer(h)
        else:
            h, slope = forward_with_slope(layer, h)
            steps.append(("act", slope, int(getattr(layer, "expansion", 1))))
    return h, Linearization(steps)


def can_linearize(layers: nn.Sequential) -> bool:
    """Whether :func:`linearize_sequential` handles every layer of ``layers`` (dense
    layers, activations with slopes, and no forward hook that it would bypass).

    Example:
        >>> from pyro_invres.nn import LipSwish
        >>> net = nn.Sequential(nn.Linear(2, 4), LipSwish(), nn.Linear(4, 2))
        >>> can_linearize(net), can_linearize(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
        (True, False)
    """
    return all(
        isinstance(layer, nn.Linear) or hasattr(layer, "forward_with_slope") for layer in layers
    ) and not any(m._forward_hooks or m._forward_pre_hooks for m in layers.modules())
