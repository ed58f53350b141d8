"""The reversible two-stream block of RevNet, for vectors and images.

The event is split along its first axis into ``x = (x_1, x_2)`` (``split_dim`` entries or
channels, and the rest) and the two streams update each other in turn:

.. math::

    y_1 = x_1 + f(x_2), \\qquad y_2 = x_2 + g(y_1), \\qquad \\log|\\det J| = 0 ,

or, with ``affine=True``, each stream is also scaled by a bounded log-scale:

.. math::

    y_1 = x_1 \\odot e^{s_f(x_2)} + t_f(x_2), \\qquad
    y_2 = x_2 \\odot e^{s_g(y_1)} + t_g(y_1), \\qquad
    \\log|\\det J| = \\textstyle\\sum s_f(x_2) + \\sum s_g(y_1) .

The inverse undoes the two steps in reverse order, ``x_2 = (y_2 - t_g(y_1)) e^{-s_g(y_1)}``
then ``x_1 = (y_1 - t_f(x_2)) e^{-s_f(x_2)}``: no iteration, exact to rounding. The block
is two coupling layers with the roles swapped, so the Jacobian is a product of two block
triangular matrices with positive diagonals (``sign = 1``) and every coordinate changes.

Why the log-scale is bounded: ``s = b tanh(raw / b)`` keeps each factor ``e^s`` in
``(e^-b, e^b)``. The inverse divides by those factors, so the bound caps the part of a
block's amplification of rounding errors that comes from the scales (at most ``e^b`` per
stream, 7.4 at the default ``b = 2``), and float32 round trips stay accurate, which is
what lets a RevNet recompute activations from outputs instead of storing them. (On blocks
with randomly perturbed weights the worst float32 round-trip error was about ``2e-5`` at
``b = 2`` and ``0.1`` at ``b = 8``.) It also keeps one bad optimizer step from driving a
scale to 0 or infinity (a log-det of ``-inf``/``+inf``).
``tanh`` rather than a clamp keeps a gradient at the bound and has slope 1 at 0, so small
log-scales pass unchanged; a sigmoid scale (Glow) bounds ``e^s`` above but not below.

Cost and cache: ``f`` and ``g`` run once each way; the log-scales computed on the way are
kept so that the log-det of the cached pair costs two sums.

References:
    [1] Gomez, Ren, Urtasun & Grosse, *The Reversible Residual Network: Backpropagation
        Without Storing Activations*, NeurIPS 2017. arXiv:1707.04585
    [2] Dinh, Sohl-Dickstein & Bengio, *Density estimation using Real NVP*, ICLR 2017.
        arXiv:1605.08803
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from torch import nn

from ..nn.conditioners import make_conditioner
from .coupling import (
    Coupling,
    CouplingUpdate,
    _block_shape,
    _check_bound,
    _check_context_dim,
    _ConditionalBlock,
    _resolve_split,
    _SplitBlock,
)

__all__ = ["ConditionalRevNetBlock", "RevNetBlock", "conditional_revnet_block", "revnet_block"]

Block = TypeVar("Block", bound=nn.Module)


class RevNetBlock(_SplitBlock):
    """``y_1 = x_1 + f(x_2)``, ``y_2 = x_2 + g(y_1)`` (optionally scaled; see the module).

    Arguments:
        f: maps ``x_2`` to a tensor shaped like ``x_1`` (a pair ``(raw, t)`` of them when
            ``affine``).
        g: maps ``y_1`` to a tensor shaped like ``x_2`` (a pair when ``affine``).
        input_dim: the event shape, ``D`` or ``(C, H, W)``.
        affine: also scale each stream by ``e^s``, ``s = b tanh(raw / b)``.
        split_dim: the size of ``x_1`` (default: half, rounded down).
        log_scale_bound: ``b``, used when ``affine``.
        cache_size: 0 or 1.

    Example:
        >>> import torch
        >>> block = revnet_block(4, [16], affine=True)
        >>> x = torch.randn(3, 4)
        >>> bool((block(x) == x).all())   # the identity at initialisation
        True
    """

    def __init__(
        self,
        f: nn.Module,
        g: nn.Module,
        input_dim: int | Sequence[int],
        *,
        affine: bool = False,
        split_dim: int | None = None,
        log_scale_bound: float = 2.0,
        cache_size: int = 1,
    ) -> None:
        super().__init__(input_dim, split_dim, cache_size)
        self.f = f
        self.g = g
        self.affine = bool(affine)
        self.log_scale_bound = _check_bound(log_scale_bound)

    def as_coupling(self) -> Coupling:
        """Two updates with the roles swapped: ``x_1`` by ``f(x_2)``, then ``x_2`` by ``g(y_1)``."""
        bound = self.log_scale_bound if self.affine else None
        updates = (CouplingUpdate(1, self.f, bound), CouplingUpdate(0, self.g, bound))
        return Coupling(self._split, self._merge, updates, self.event_dim)

    def extra_repr(self) -> str:
        bound = f", log_scale_bound={self.log_scale_bound}" if self.affine else ""
        return f"{super().extra_repr()}, affine={self.affine}{bound}"


class ConditionalRevNetBlock(_ConditionalBlock):
    """The conditional twin of :class:`RevNetBlock`: ``f`` and ``g`` also see a context.

    ``.condition(context)`` returns a :class:`RevNetBlock` sharing the parameters.

    Arguments:
        f: a conditional network ``f(x_2, context=c)``.
        g: a conditional network ``g(y_1, context=c)``.
        input_dim: the event shape, ``D`` or ``(C, H, W)``.
        affine: also scale each stream.
        split_dim: the size of ``x_1``.
        log_scale_bound: ``b``, used when ``affine``.
        cache_size: 0 or 1, for the conditioned blocks.

    Example:
        >>> import torch
        >>> block = conditional_revnet_block((4, 4, 4), context_dim=2, hidden_dims=[8])
        >>> block.condition(torch.randn(2))(torch.randn(3, 4, 4, 4)).shape
        torch.Size([3, 4, 4, 4])
    """

    block = RevNetBlock

    def __init__(
        self,
        f: nn.Module,
        g: nn.Module,
        input_dim: int | Sequence[int],
        *,
        affine: bool = False,
        split_dim: int | None = None,
        log_scale_bound: float = 2.0,
        cache_size: int = 1,
    ) -> None:
        super().__init__(
            {"f": f, "g": g},
            input_dim,
            affine=affine,
            split_dim=split_dim,
            log_scale_bound=log_scale_bound,
            cache_size=cache_size,
        )


def _build_revnet(
    cls: type[Block],
    input_dim: int | Sequence[int],
    hidden_dims: Sequence[int] | None,
    context_dim: int,
    affine: bool,
    split_dim: int | None,
    activation: str,
    **options: object,
) -> Block:
    """The one builder behind both RevNet factories."""
    shape = _block_shape(input_dim)
    split = _resolve_split(shape, split_dim)
    sizes = (split, shape[0] - split)
    nets = [
        make_conditioner(
            (n_in, *shape[1:]),
            n_out,
            hidden_dims,
            context_dim=context_dim,
            num_outputs=2 if affine else 1,
            activation=activation,
        )
        for n_in, n_out in [(sizes[1], sizes[0]), (sizes[0], sizes[1])]
    ]
    return cls(*nets, shape, affine=affine, split_dim=split, **options)


def revnet_block(
    input_dim: int | Sequence[int],
    hidden_dims: Sequence[int] | None = None,
    *,
    affine: bool = False,
    split_dim: int | None = None,
    log_scale_bound: float = 2.0,
    activation: str = "relu",
    cache_size: int = 1,
) -> RevNetBlock:
    """Build a :class:`RevNetBlock` whose ``f`` and ``g`` start at zero (the identity).

    Arguments:
        input_dim: ``D`` (vectors) or ``(C, H, W)`` (images, split over channels).
        hidden_dims: hidden units or channels of ``f`` and ``g`` (default
            :func:`~pyro_invres.nn.conditioners.default_hidden_dims`).
        affine: also scale each stream by a bounded ``e^s``.
        split_dim: the size of ``x_1`` (default ``D // 2`` or ``C // 2``).
        log_scale_bound: ``b``, used when ``affine``.
        activation: ``"relu"`` or ``"elu"``.
        cache_size: 0 or 1.

    Example:
        >>> import torch
        >>> block = revnet_block((2, 8, 8), [16, 16])
        >>> x = torch.randn(4, 2, 8, 8)
        >>> torch.allclose(block._inverse(block._call(x)), x)
        True
    """
    return _build_revnet(
        RevNetBlock,
        input_dim,
        hidden_dims,
        0,
        affine,
        split_dim,
        activation,
        log_scale_bound=log_scale_bound,
        cache_size=cache_size,
    )


def conditional_revnet_block(
    input_dim: int | Sequence[int],
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    affine: bool = False,
    split_dim: int | None = None,
    log_scale_bound: float = 2.0,
    activation: str = "relu",
    cache_size: int = 1,
) -> ConditionalRevNetBlock:
    """Build a :class:`ConditionalRevNetBlock` (arguments as :func:`revnet_block`).

    Arguments:
        input_dim: ``D`` or ``(C, H, W)``.
        context_dim: the dimension of the context vector.
        hidden_dims: hidden units or channels of ``f`` and ``g``.
        affine: also scale each stream by a bounded ``e^s``.
        split_dim: the size of ``x_1``.
        log_scale_bound: ``b``, used when ``affine``.
        activation: ``"relu"`` or ``"elu"``.
        cache_size: 0 or 1.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> block = conditional_revnet_block(2, context_dim=1, hidden_dims=[16], affine=True)
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> flow = dist.ConditionalTransformedDistribution(base, [block])
        >>> flow.condition(torch.ones(1)).sample((3,)).shape
        torch.Size([3, 2])
    """
    return _build_revnet(
        ConditionalRevNetBlock,
        input_dim,
        hidden_dims,
        _check_context_dim(context_dim),
        affine,
        split_dim,
        activation,
        log_scale_bound=log_scale_bound,
        cache_size=cache_size,
    )
