"""Conditioner networks for coupling and reversible blocks.

A coupling block changes one part of its input with coefficients that a *conditioner*
computes from the other part; the block never looks inside the network, so any module with
the right input and output shapes will do. :func:`make_conditioner` builds the default one:

* vectors ``(D,)``: Pyro's :class:`~pyro.nn.DenseNN` (or
  :class:`~pyro.nn.ConditionalDenseNN`, the context concatenated to the input);
* images ``(C, H, W)``: :class:`ConvConditioner`, a 3x3 conv, 1x1 convs, a 3x3 conv,
  padded so that ``H, W`` are kept (or :class:`ConditionalConvConditioner`, the context
  mapped by a linear layer and added to the first hidden layer at every position).

The last layer of every conditioner starts at zero, so a block built on one starts as the
identity (Glow's initialisation) and training moves it away from there.

With ``num_outputs=k > 1`` a conditioner returns a tuple of ``k`` tensors, each shaped like
one output (``(..., out)`` for vectors, ``(..., out, H, W)`` for images); with ``k = 1`` a
single tensor. A conditional conditioner is called as ``net(x, context=context)``, and the
context (shape ``(..., context_dim)``) is broadcast to the batch shape of ``x``.

References:
    [1] Kingma & Dhariwal, *Glow: Generative Flow with Invertible 1x1 Convolutions*,
        NeurIPS 2018. arXiv:1807.03039
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pyro.distributions import is_validation_enabled
from pyro.nn import ConditionalDenseNN, DenseNN
from torch import Tensor, nn

from .activations import ACTIVATIONS, expansion, make_activation

__all__ = [
    "ConditionalConvConditioner",
    "ContextBound",
    "ConvConditioner",
    "default_hidden_dims",
    "make_conditioner",
]


def _activation(name: str) -> nn.Module:
    # the package's one vocabulary (nn.activations.ACTIVATIONS), less the activations that
    # change the width, which a conditioner's fixed layer sizes cannot take
    names = tuple(k for k, v in ACTIVATIONS.items() if getattr(v, "expansion", 1) == 1)
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {names}")
    act = make_activation(name)
    if expansion(act) != 1:
        raise ValueError(
            f"activation {name!r} changes the width, which a conditioner cannot take; "
            f"expected one of {names}"
        )
    return act


def _shape(in_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (int(in_shape),) if isinstance(in_shape, int) else tuple(int(d) for d in in_shape)
    if len(shape) not in (1, 3) or any(d < 1 for d in shape):
        raise ValueError(
            f"in_shape must be a positive int (vectors) or (C, H, W) (images), got {in_shape!r}"
        )
    return shape


def _positive(name: str, value: int, low: int = 1) -> int:
    if int(value) != value or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _hidden(hidden_dims: Sequence[int]) -> list[int]:
    hidden = [int(h) for h in hidden_dims]
    if not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"hidden_dims must be a non-empty list of positive sizes, got {hidden}")
    return hidden


def _check_context(
    context: Tensor,
    context_dim: int,
    x: Tensor | None = None,
    event_dim: int = 1,
    expand_only: bool = True,
) -> None:
    """Refuse a context that is not ``(..., context_dim)`` or whose batch does not fit ``x``.

    Shapes only (no device synchronisation). ``x`` has ``event_dim`` event dimensions; its
    batch shape must absorb the context's (``expand_only``: the context is expanded to
    it, as Pyro's conditional networks do) or at least broadcast with it.
    """
    if not isinstance(context, Tensor):
        raise TypeError(f"context must be a Tensor, got {type(context).__name__}")
    if context.dim() == 0 or context.shape[-1] != context_dim:
        raise ValueError(
            f"expected a context of shape (..., {context_dim}) (context_dim={context_dim}), "
            f"got shape {tuple(context.shape)}"
        )
    if x is None:
        return
    x_batch, c_batch = x.shape[: x.dim() - event_dim], context.shape[:-1]
    if c_batch == x_batch or not c_batch:
        return
    try:
        joint = torch.broadcast_shapes(x_batch, c_batch)
    except RuntimeError:
        joint = None
    if joint is None or (expand_only and joint != x_batch):
        fits = "expand to" if expand_only else "broadcast with"
        raise ValueError(
            f"the context's batch shape {tuple(c_batch)} does not {fits} the batch shape "
            f"{tuple(x_batch)} of the network's input (context shape "
            f"{tuple(context.shape)}, input shape {tuple(x.shape)})"
        )


def default_hidden_dims(in_shape: int | Sequence[int]) -> list[int]:
    """Hidden sizes used when a factory gets ``hidden_dims=None``.

    ``[max(64, 10 D)] * 2`` units for vectors (as :func:`~pyro_invres.iresnet`), ``[64, 64]``
    channels for images.

    Example:
        >>> default_hidden_dims(3), default_hidden_dims((4, 8, 8))
        ([64, 64], [64, 64])
    """
    shape = _shape(in_shape)
    width = max(64, 10 * shape[0]) if len(shape) == 1 else 64
    return [width, width]


class ConvConditioner(nn.Module):
    """A small convolutional network ``(..., C_in, H, W) -> (..., C_out, H, W)``.

    ``3x3 conv -> act -> (1x1 conv -> act) * (L - 1) -> 3x3 conv`` for ``L`` hidden layers
    (``hidden_dims=[h1, h2]`` gives Glow's 3x3 / 1x1 / 3x3 stack), zero padding so that
    ``H, W`` are kept, the last convolution initialised to zero.

    Arguments:
        in_channels: channels of the input.
        out_channels: channels of each output.
        hidden_dims: channels of the hidden layers.
        num_outputs: how many outputs (``k``); the last layer has ``k * out_channels``.
        activation: a name from :data:`~pyro_invres.nn.activations.ACTIVATIONS`
            (``"relu"``, ``"elu"``, ...; not ``"clipswish"``).

    Example:
        >>> import torch
        >>> net = ConvConditioner(2, 3, [8, 8], num_outputs=2)
        >>> s, t = net(torch.randn(5, 2, 4, 4))
        >>> s.shape, bool(t.abs().max() == 0)
        (torch.Size([5, 3, 4, 4]), True)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_dims: Sequence[int],
        num_outputs: int = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_channels = _positive("in_channels", in_channels)
        self.out_channels = _positive("out_channels", out_channels)
        self.num_outputs = _positive("num_outputs", num_outputs)
        hidden = _hidden(hidden_dims)
        self.first = nn.Conv2d(self.in_channels, hidden[0], 3, padding=1)
        middle: list[nn.Module] = [_activation(activation)]
        for h_in, h_out in zip(hidden[:-1], hidden[1:]):
            middle += [nn.Conv2d(h_in, h_out, 1), _activation(activation)]
        self.middle = nn.Sequential(*middle)
        self.last = nn.Conv2d(hidden[-1], self.num_outputs * self.out_channels, 3, padding=1)
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    def _run(self, x: Tensor, shift: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
        batch = x.shape[:-3]
        h = self.first(x.reshape(-1, *x.shape[-3:]))
        if shift is not None:
            h = h + shift.reshape(-1, shift.shape[-1], 1, 1)
        out = self.last(self.middle(h))
        out = out.reshape(*batch, *out.shape[1:])
        if self.num_outputs == 1:
            return out
        return tuple(out.split(self.out_channels, dim=-3))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        return self._run(x)


class ConditionalConvConditioner(ConvConditioner):
    """:class:`ConvConditioner` whose first hidden layer also sees a context vector.

    .. math::

        h_1 = \\mathrm{conv}_{3\\times 3}(x) + W c + b \\quad \\text{(at every position)}

    Arguments:
        in_channels: channels of the input.
        context_dim: the dimension of the context ``c``.
        out_channels: channels of each output.
        hidden_dims: channels of the hidden layers.
        num_outputs: how many outputs.
        activation: a name from :data:`~pyro_invres.nn.activations.ACTIVATIONS`
            (``"relu"``, ``"elu"``, ...; not ``"clipswish"``).

    Example:
        >>> import torch
        >>> net = ConditionalConvConditioner(2, 5, 3, [8])
        >>> net(torch.randn(4, 2, 6, 6), context=torch.randn(5)).shape
        torch.Size([4, 3, 6, 6])
    """

    def __init__(
        self,
        in_channels: int,
        context_dim: int,
        out_channels: int,
        hidden_dims: Sequence[int],
        num_outputs: int = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__(in_channels, out_channels, hidden_dims, num_outputs, activation)
        self.context_dim = _positive("context_dim", context_dim)
        self.context_layer = nn.Linear(self.context_dim, self.first.out_channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor | tuple[Tensor, ...]:  # type: ignore[override]
        # a wrong context used to fail inside expand, or (a scalar) to broadcast silently
        _check_context(context, self.context_dim, x, event_dim=3)
        context = context.expand(*x.shape[:-3], self.context_dim)
        return self._run(x, self.context_layer(context))


class ContextBound(nn.Module):
    """``x -> net(x, context=context)`` for a fixed context, sharing ``net``'s parameters.

    What a conditional block's ``.condition(context)`` hands to the unconditional block.

    With ``event_dim`` given, every call checks that the context's batch shape expands to
    the batch shape of ``x`` (its shape less ``event_dim`` trailing dimensions): a block
    must return its input's shape, and a network that broadcasts ``x`` against a larger
    context batch would silently return a larger tensor.

    Arguments:
        net: a conditional network ``net(x, context=c)``.
        context: the context, ``(..., context_dim)``.
        event_dim: the event dimensions of ``x`` (``None``: no shape check here, the
            network checks what it needs).

    Example:
        >>> import torch
        >>> net = make_conditioner(2, 2, [8], context_dim=3)
        >>> ContextBound(net, torch.zeros(3))(torch.randn(4, 2)).shape
        torch.Size([4, 2])
        >>> ContextBound(net, torch.zeros(5, 3), event_dim=1)(torch.randn(4, 2))
        Traceback (most recent call last):
        ...
        ValueError: the context's batch shape (5,) does not expand to the batch shape (4,) ...
    """

    def __init__(self, net: nn.Module, context: Tensor, event_dim: int | None = None) -> None:
        super().__init__()
        if not isinstance(context, Tensor):
            raise TypeError(f"context must be a Tensor, got {type(context).__name__}")
        reference = next(net.parameters(), None)
        if reference is not None and context.dtype != reference.dtype:
            raise ValueError(
                f"context has dtype {context.dtype} but the parameters are "
                f"{reference.dtype}; convert the context or call .to({context.dtype})"
            )
        if reference is not None and context.device != reference.device:
            raise ValueError(
                f"context is on {context.device} but the parameters are on "
                f"{reference.device}; move it with .to(device)"
            )
        if is_validation_enabled() and not bool(torch.isfinite(context).all()):
            raise ValueError("context has non-finite values (nan or inf)")
        self.net = net
        self.context = context
        self.event_dim = event_dim

    def _check(self, x: Tensor) -> None:
        # a scalar context is left to the network, whose message names its context_dim
        if self.event_dim is None or not self.context.dim():
            return
        try:
            _check_context(self.context, self.context.shape[-1], x, event_dim=self.event_dim)
        except ValueError as err:
            # the usual way here: Pyro's ConditionalTransformedDistribution draws (n, D)
            # from its base whatever the contexts' batch is
            raise ValueError(
                f"{err}; to draw samples (n, B, D) for contexts (B, C), the base distribution "
                "needs batch shape (B,): pyro_invres.npe.ConditionalFlow builds it so"
            ) from None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        self._check(x)
        return self.net(x, context=self.context)

    @property
    def forward_with_jacobian(self) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """``x -> net.forward_with_jacobian(x, context)``, where ``net`` has it.

        A property so that ``hasattr`` answers whether the wrapped network carries its
        Jacobian forward (an ``AttributeError`` means it does not).
        """
        inner = getattr(self.net, "forward_with_jacobian", None)
        if inner is None:
            raise AttributeError(f"{type(self.net).__name__} has no forward_with_jacobian")

        def call(x: Tensor) -> tuple[Tensor, Tensor]:
            self._check(x)
            return inner(x, context=self.context)

        return call


def _lean_forward(net: ConditionalDenseNN, x: Tensor) -> Tensor | tuple[Tensor, ...]:
    """Pyro's ``ConditionalDenseNN._forward`` without slicing the ``ModuleList``.

    ``self.layers[:-1]`` builds a new ``ModuleList`` (a module ``__init__``) on every call:
    about a third of the Python time of a small coupling network, paid twice per block by
    reversible back-propagation (forward pass, then recomputation).
    """
    h = x
    last = len(net.layers) - 1
    for i, layer in enumerate(net.layers):
        h = layer(h)
        if i < last:
            h = net.f(h)
    if net.output_multiplier == 1:
        return h
    h = h.reshape(*x.shape[:-1], net.output_multiplier)
    if net.count_params == 1:
        return h
    return tuple(h[..., s] for s in net.param_slices)


class _LeanDenseNN(DenseNN):
    """:class:`pyro.nn.DenseNN` (same parameters, names and outputs), a faster forward."""

    def _forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:  # type: ignore[override]
        return _lean_forward(self, x)


class _LeanConditionalDenseNN(ConditionalDenseNN):
    """:class:`pyro.nn.ConditionalDenseNN` with the faster forward of :class:`_LeanDenseNN`."""

    def forward(self, x: Tensor, context: Tensor) -> Tensor | tuple[Tensor, ...]:  # type: ignore[override]
        # Pyro's fails with a matrix-multiply error (an IndexError for a scalar context)
        _check_context(context, self.context_dim, x)
        return super().forward(x, context)

    def _forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:  # type: ignore[override]
        return _lean_forward(self, x)


def make_conditioner(
    in_shape: int | Sequence[int],
    out_features: int,
    hidden_dims: Sequence[int] | None = None,
    context_dim: int = 0,
    num_outputs: int = 1,
    activation: str = "relu",
) -> nn.Module:
    """Build a conditioner whose last layer is zero (so its outputs start at zero).

    Arguments:
        in_shape: the input's event shape, ``D`` (vectors) or ``(C, H, W)`` (images).
        out_features: dimensions (vectors) or channels (images) of each output; images
            keep ``H, W``.
        hidden_dims: hidden units (vectors) or channels (images); default
            :func:`default_hidden_dims`.
        context_dim: the dimension of a context vector; 0 builds an unconditional network.
        num_outputs: how many outputs (2 for a scale and a shift).
        activation: a name from :data:`~pyro_invres.nn.activations.ACTIVATIONS`
            (``"relu"``, ``"elu"``, ...; not ``"clipswish"``).

    Returns:
        ``net(x)`` (or ``net(x, context=c)`` when ``context_dim > 0``) returning one tensor,
        or a tuple of ``num_outputs`` tensors.

    Example:
        >>> import torch
        >>> net = make_conditioner(3, 2, [16], num_outputs=2)
        >>> [tuple(p.shape) for p in net(torch.randn(7, 3))]
        [(7, 2), (7, 2)]
    """
    shape = _shape(in_shape)
    out_features = _positive("out_features", out_features)
    context_dim = _positive("context_dim", context_dim, low=0)
    num_outputs = _positive("num_outputs", num_outputs)
    hidden = _hidden(default_hidden_dims(shape) if hidden_dims is None else hidden_dims)
    if len(shape) == 3:
        if context_dim:
            return ConditionalConvConditioner(
                shape[0], context_dim, out_features, hidden, num_outputs, activation
            )
        return ConvConditioner(shape[0], out_features, hidden, num_outputs, activation)
    param_dims = [out_features] * num_outputs
    if context_dim:
        net: ConditionalDenseNN = _LeanConditionalDenseNN(
            shape[0], context_dim, hidden, param_dims, nonlinearity=_activation(activation)
        )
    else:
        net = _LeanDenseNN(shape[0], hidden, param_dims, nonlinearity=_activation(activation))
    nn.init.zeros_(net.layers[-1].weight)
    nn.init.zeros_(net.layers[-1].bias)
    return net
