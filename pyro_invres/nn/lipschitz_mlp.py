"""Multi-layer perceptrons with a guaranteed Lipschitz bound in their input.

Each dense layer is spectrally normalised to ``c ** (1 / L)`` for ``L`` layers and the
activations are 1-Lipschitz, so the whole network satisfies

.. math::

    \\mathrm{Lip}(g) \\le \\prod_{l=1}^{L} c^{1/L} = c .

Only the product matters: with ``split="learned"`` layer ``l`` gets the bound
``c^{1/L} e^{\\lambda (a_l - \\bar a)}`` with learned ``a`` (the product is still ``c``), so
an early layer can take a large gain and a late one a small gain. That lets a block bend
sharply (its curvature grows with the early gains) while staying a contraction; the equal
split caps every layer's gain at ``c^{1/L}``. The factor
``\\lambda = \\min(1, A / \\max_l |a_l - \\bar a|)`` shrinks all log-gains together once one
leaves ``[-A, A]`` (``A = ln 10^3``): the gains stay finite and their product 1 for any
finite ``a`` (unbounded, ``e^{90}`` overflowed float32 and ``inf * 0`` gave NaNs).

The conditional twin feeds the context through unconstrained layers that are *added* to
the first hidden layer, so the bound holds in ``x`` for every fixed context.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import expansion, make_activation
from .conditioners import _check_context
from .linearization import Linearization, can_linearize, linearize_sequential
from .spectral import spectral_norm

__all__ = ["LipschitzMLP", "ConditionalLipschitzMLP", "SPLITS"]

#: How the Lipschitz budget ``c`` is shared between the layers.
SPLITS = ("equal", "learned")

# the log-gains are stored divided by this: Adam moves a parameter by about its learning
# rate per step, and the gains must reach 3-8x within a few hundred steps at lr 1e-2.
# Measured with `pyro-invres fit` (8 blocks, 1200 steps): rate 1 left them at 1.3-2.4x;
# rate 15 beat rate 5 on checkerboard (3.769/3.763 against 3.794/3.771 nats, seeds 0/1),
# tied on rings and 8gaussians, and lost 0.014 on moons
_GAIN_RATE = 15.0
# every layer's gain lies in [1e-3, 1e3]: far beyond what training reaches (0.15-4x on
# the default checkerboard fit), and the rounding a large gain amplifies stays small
_LOG_GAIN_CAP = math.log(1e3)


def _check_lipschitz(lipschitz: float) -> float:
    lipschitz = float(lipschitz)
    if not 0.0 < lipschitz < 1.0:
        raise ValueError(f"lipschitz must lie in (0, 1) for an invertible block, got {lipschitz}")
    return lipschitz


class LipschitzMLP(nn.Module):
    """A dense network ``g: R^D -> R^D`` with ``Lip(g) <= lipschitz``.

    .. math::

        g(x) = W_L\\,\\phi(\\cdots \\phi(W_1 s_1 x + b_1) \\cdots s_L) + b_L,
        \\qquad \\|W_l\\|_2 \\le c^{1/L}, \\quad
        s_l = e^{\\lambda (a_l - \\bar a)}, \\quad \\textstyle\\prod_l s_l = 1, \\quad
        \\lambda = \\min\\bigl(1, A / \\max_l |a_l - \\bar a|\\bigr)

    With ``split="equal"`` all ``s_l = 1``; with ``split="learned"`` the ``a_l`` are
    parameters (initialised to 0, so training starts from the equal split); every ``s_l``
    lies in ``[1e-3, 1e3]`` (``A = ln 10^3``), so no gain overflows however far the
    optimizer pushes ``a``.

    Arguments:
        input_dim: size ``D`` of the input (and output).
        hidden_dims: sizes of the hidden layers.
        lipschitz: the bound ``c`` on ``Lip(g)``, in ``(0, 1)``.
        activation: a name from :data:`~pyro_invres.nn.activations.ACTIVATIONS`.
        output_dim: size of the output (default ``input_dim``).
        split: ``"equal"`` or ``"learned"``: how ``c`` is shared between the layers.
        activation_kwargs: options of the activation, e.g. ``{"beta": 16.0}`` for a
            sharper starting LipSwish or ``{"omega": 4.0}`` for the sine's starting
            frequency (see :func:`~pyro_invres.nn.make_activation`).
        **spectral_kwargs: passed to :func:`~pyro_invres.nn.spectral_norm`.

    Example:
        >>> import torch
        >>> g = LipschitzMLP(2, [16, 16], lipschitz=0.9)
        >>> g(torch.randn(5, 2)).shape
        torch.Size([5, 2])
        >>> g = LipschitzMLP(2, [16, 16], lipschitz=0.9, split="learned")
        >>> g.gains().prod().item()
        1.0
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        lipschitz: float = 0.9,
        activation: str = "lipswish",
        output_dim: int | None = None,
        split: str = "equal",
        activation_kwargs: Mapping[str, object] | None = None,
        **spectral_kwargs: object,
    ) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.split = split
        self.lipschitz = _check_lipschitz(lipschitz)
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim if output_dim is not None else input_dim)
        dims = [self.input_dim, *[int(h) for h in hidden_dims], self.output_dim]
        if any(d < 1 for d in dims):
            raise ValueError(f"layer sizes must be positive, got {dims}")
        per_layer = self.lipschitz ** (1.0 / (len(dims) - 1))
        layers: list[nn.Module] = []
        width = 1  # CLipSwish doubles the features the next layer sees
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            linear = nn.Linear(d_in * width, d_out)
            layers.append(spectral_norm(linear, per_layer, **spectral_kwargs))
            if i < len(dims) - 2:
                layers.append(make_activation(activation, **dict(activation_kwargs or {})))
                width = expansion(layers[-1])
        self.net = nn.Sequential(*layers)
        self.log_gains = nn.Parameter(torch.zeros(len(dims) - 1)) if split == "learned" else None

    def gains(self) -> Tensor | None:
        """The per-layer input gains ``s_l`` (product 1), or ``None`` for the equal split.

        Example:
            >>> import torch
            >>> g = LipschitzMLP(2, [8, 8], split="learned").double()
            >>> with torch.no_grad():
            ...     _ = g.log_gains.copy_(torch.tensor([60.0, -30.0, -30.0]))
            >>> s = g.gains().detach()
            >>> [f"{v:.0e}" for v in s.tolist()], round(float(s.prod()), 12)
            (['1e+03', '3e-02', '3e-02'], 1.0)
        """
        if self.log_gains is None:
            return None
        a = _GAIN_RATE * self.log_gains
        t = a - a.mean()
        # Shrinking all centred log-gains by one factor keeps their sum 0 (the product of
        # the gains 1, so the bound c) and their ratios; inside the cap the factor is
        # exactly 1 and the gains are those of the plain parametrisation, bit for bit.
        # (a select, not A / max(m, A): torch divides a scalar by a tensor through a
        # reciprocal, and A * (1 / A) need not be 1).
        m = t.abs().amax()
        shrink = torch.where(m > _LOG_GAIN_CAP, _LOG_GAIN_CAP / m.clamp_min(_LOG_GAIN_CAP), 1.0)
        return torch.exp(t * shrink)

    def forward(self, x: Tensor) -> Tensor:
        gains = self.gains()
        if gains is None:
            return self.net(x)
        gains = gains.to(x.dtype)
        h, i = x, 0
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                h = layer(h * gains[i])
                i += 1
            else:
                h = layer(h)
        return h

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``g(x)`` and its Jacobian ``dg/dx``, shaped ``x.shape[:-1] + (D_out, D)``.

        The Jacobian is carried forward through the layers (forward mode, ``D`` tangents at
        once),

        .. math::

            J_1 = W_1 s_1, \\qquad J_{l+1} = W_{l+1} s_{l+1}\\, \\mathrm{diag}(\\phi'(h_l))\\, J_l,

        so it is one pass of explicit operations: differentiating it costs one ordinary
        backward, not the double backward of vector-Jacobian products. For small ``D``.

        Example:
            >>> import torch
            >>> g = LipschitzMLP(2, [8], lipschitz=0.9)
            >>> x = torch.randn(3, 2)
            >>> gx, jac = g.forward_with_jacobian(x)
            >>> jac.shape, bool(torch.allclose(gx, g(x)))
            (torch.Size([3, 2, 2]), True)
        """
        h, tangents = _forward_with_tangents(self.net, x, self.gains())
        return h, tangents.transpose(-1, -2)

    def linearize(self, x: Tensor, lazy: bool = False) -> tuple[Tensor, Linearization]:
        """``g(x)`` and its Jacobian at ``x`` kept as explicit factors.

        The output is the same tensor :meth:`forward` computes; the
        :class:`~pyro_invres.nn.linearization.Linearization` then gives vector-Jacobian
        products ``u^T J_g(x)`` as ``L`` matrix products, without autograd, or
        differentiably (one plain backward, no double backward). The i-ResNet block uses
        it for the Neumann-gradient log-det estimators; ``lazy=True`` defers the slopes to
        the first product (see :func:`~pyro_invres.nn.linearization.linearize_sequential`).

        Example:
            >>> import torch
            >>> g = LipschitzMLP(2, [8], lipschitz=0.9)
            >>> x = torch.randn(3, 2)
            >>> gx, lin = g.linearize(x)
            >>> torch.equal(gx, g(x)), lin.vjp(torch.randn(4, 3, 2)).shape
            (True, torch.Size([4, 3, 2]))
        """
        return linearize_sequential(self.net, x, self.gains(), lazy=lazy)

    def can_linearize(self) -> bool:
        """Whether :meth:`linearize` covers this network (every activation has slopes and
        no layer carries a forward hook, which :meth:`linearize` would bypass)."""
        return can_linearize(self.net) and not (self._forward_hooks or self._forward_pre_hooks)


def _forward_with_tangents(
    layers: nn.Sequential, x: Tensor, gains: Tensor | None, tangents: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Run ``layers`` (linear layers and activations) on ``x`` and carry ``dh/dx`` along.

    The derivative travels as rows of tangents, ``x.shape[:-1] + (D, width)`` (the
    Jacobian transposed): a linear layer then maps them with one ``F.linear`` over the
    flattened batch, where ``W @ J`` with ``J`` in ``(..., width, D)`` layout is a batched
    product about 10x slower on the CPU. ``tangents`` are those of ``x`` itself, if it is
    not the input (``None``: the identity).
    """
    if gains is not None:
        gains = gains.to(x.dtype)
    h, i = x, 0
    for layer in layers:
        if isinstance(layer, nn.Linear):
            weight = layer.weight  # one read: the spectral parametrization runs once
            if gains is not None:
                weight = weight * gains[i]
                i += 1
            h = F.linear(h, weight, layer.bias)
            # contiguous rows fold into one matrix product; a broadcast product can leave
            # them permuted, and F.linear then falls back to a batched product
            tangents = weight.t() if tangents is None else F.linear(tangents.contiguous(), weight)
        else:
            if tangents is None:
                tangents = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
            h, tangents = layer.forward_with_tangents(h, tangents)
    if tangents is None:
        tangents = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    return h, tangents.expand(*h.shape[:-1], *tangents.shape[-2:])


class ConditionalLipschitzMLP(nn.Module):
    """``g(x; z)`` with ``Lip_x(g) <= lipschitz`` for every context ``z``.

    .. math::

        h_1 = \\phi(W_1 x + V z + b_1), \\qquad g(x; z) = W_L\\,\\phi(\\cdots) + b_L

    Only the ``W_l`` are normalised; ``V`` is free because the context is held fixed
    while the block is inverted.

    Arguments:
        input_dim: size ``D`` of ``x`` (and of the output).
        context_dim: size of the context ``z``.
        hidden_dims: sizes of the hidden layers (at least one).
        lipschitz: the bound ``c`` in ``(0, 1)``.
        activation: a name from :data:`~pyro_invres.nn.activations.ACTIVATIONS`.
        activation_kwargs: options of the activation (``beta``, ``omega``).
        **spectral_kwargs: passed to :func:`~pyro_invres.nn.spectral_norm`.

    Example:
        >>> import torch
        >>> g = ConditionalLipschitzMLP(2, 3, [16])
        >>> g(torch.randn(5, 2), context=torch.randn(5, 3)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int],
        lipschitz: float = 0.9,
        activation: str = "lipswish",
        activation_kwargs: Mapping[str, object] | None = None,
        **spectral_kwargs: object,
    ) -> None:
        super().__init__()
        act_kwargs = dict(activation_kwargs or {})
        hidden_dims = [int(h) for h in hidden_dims]
        if not hidden_dims:
            raise ValueError("a conditional network needs at least one hidden layer")
        if context_dim < 1:
            raise ValueError(f"context_dim must be positive, got {context_dim}")
        self.lipschitz = _check_lipschitz(lipschitz)
        self.input_dim = int(input_dim)
        self.context_dim = int(context_dim)
        per_layer = self.lipschitz ** (1.0 / (len(hidden_dims) + 1))
        self.first = spectral_norm(
            nn.Linear(input_dim, hidden_dims[0]), per_layer, **spectral_kwargs
        )
        self.context_layer = nn.Linear(context_dim, hidden_dims[0], bias=False)
        layers: list[nn.Module] = [make_activation(activation, **act_kwargs)]
        width = expansion(layers[0])
        dims = [*hidden_dims, self.input_dim]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            linear = nn.Linear(d_in * width, d_out)
            layers.append(spectral_norm(linear, per_layer, **spectral_kwargs))
            if i < len(dims) - 2:
                layers.append(make_activation(activation, **act_kwargs))
                width = expansion(layers[-1])
        self.rest = nn.Sequential(*layers)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        _check_context(context, self.context_dim, x, expand_only=False)
        # batch shapes of x and context broadcast, as Pyro's conditional transforms do
        return self.rest(self.first(x) + self.context_layer(context))

    def forward_with_jacobian(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """``g(x; z)`` and ``dg/dx`` (``x.shape[:-1] + (D, D)``), as
        :meth:`LipschitzMLP.forward_with_jacobian`: the context only shifts the first
        pre-activation, so it enters the Jacobian through the slopes alone.

        Example:
            >>> import torch
            >>> g = ConditionalLipschitzMLP(2, 3, [8])
            >>> g.forward_with_jacobian(torch.randn(4, 2), torch.randn(4, 3))[1].shape
            torch.Size([4, 2, 2])
        """
        _check_context(context, self.context_dim, x, expand_only=False)
        weight = self.first.weight
        h = F.linear(x, weight, self.first.bias) + self.context_layer(context)
        h, tangents = _forward_with_tangents(self.rest, h, None, weight.t())
        return h, tangents.expand(*h.shape[:-1], *tangents.shape[-2:]).transpose(-1, -2)
