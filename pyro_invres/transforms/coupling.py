"""Coupling blocks (NICE, Real NVP, Glow) for vectors and images.

The event is split in two along its first axis (the last dim of a vector ``(D,)``, the
channels of an image ``(C, H, W)``), ``x = (x_1, x_2)`` with ``x_1`` the first
``split_dim`` entries or channels, and only ``x_2`` changes:

.. math::

    \\text{additive:}\\quad y_1 = x_1, \\quad y_2 = x_2 + t(x_1),
    \\qquad \\log|\\det J| = 0 ;

    \\text{affine:}\\quad y_1 = x_1, \\quad y_2 = x_2 \\odot e^{s(x_1)} + t(x_1),
    \\qquad \\log|\\det J| = \\textstyle\\sum s(x_1) ,

with ``s = b tanh(raw / b)``: a log-scale bounded by ``b`` (``log_scale_bound``) that is
the raw output itself near 0. The inverses are closed form, ``x_2 = y_2 - t(y_1)`` and
``x_2 = (y_2 - t(y_1)) e^{-s(y_1)}``; the Jacobian is block triangular with a positive
diagonal, so the determinant is positive (``sign = 1``).

Cost and cache: both directions and the log-det cost one pass of the conditioner; the
log-scale computed by ``_call`` or ``_inverse`` is kept so that the log-det of the cached
pair costs a sum. Stack blocks with permutations (or alternate ``split_dim``) so that every
coordinate gets transformed.

References:
    [1] Dinh, Krueger & Bengio, *NICE: Non-linear Independent Components Estimation*,
        ICLR 2015 workshop. arXiv:1410.8516
    [2] Dinh, Sohl-Dickstein & Bengio, *Density estimation using Real NVP*, ICLR 2017.
        arXiv:1605.08803
    [3] Kingma & Dhariwal, *Glow: Generative Flow with Invertible 1x1 Convolutions*,
        NeurIPS 2018. arXiv:1807.03039
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, TypeVar

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn

from ..nn.conditioners import ContextBound, _check_context, make_conditioner
from .base import InvertibleModule, as_event_shape

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "ConditionalAdditiveCoupling",
    "ConditionalAffineCoupling",
    "additive_coupling",
    "affine_coupling",
    "bounded_log_scale",
    "conditional_additive_coupling",
    "conditional_affine_coupling",
]

Block = TypeVar("Block", bound=nn.Module)


# -- small pure helpers (shared with :mod:`.revnet`) -------------------------------------------
def bounded_log_scale(raw: Tensor, bound: float) -> Tensor:
    """``bound * tanh(raw / bound)``: slope 1 at 0, values in ``(-bound, bound)``.

    Example:
        >>> import torch
        >>> bounded_log_scale(torch.tensor([0.0, 100.0]), 2.0)
        tensor([0., 2.])
    """
    return bound * torch.tanh(raw / bound)


def _sum_event(t: Tensor, event_dim: int) -> Tensor:
    return t.flatten(-event_dim).sum(-1)


def _check_bound(bound: float) -> float:
    bound = float(bound)
    if not (bound > 0.0 and math.isfinite(bound)):
        raise ValueError(f"log_scale_bound must be a positive finite number, got {bound}")
    return bound


def _block_shape(input_dim: int | Sequence[int]) -> tuple[int, ...]:
    shape = as_event_shape(input_dim)
    if len(shape) not in (1, 3):
        raise ValueError(f"input_dim must be an int D or an image shape (C, H, W), got {shape}")
    return shape


def _resolve_split(shape: tuple[int, ...], split_dim: int | None) -> int:
    n = shape[0]
    split = n // 2 if split_dim is None else split_dim
    if int(split) != split or not 0 < split < n:
        what = "dims" if len(shape) == 1 else "channels"
        raise ValueError(
            f"split_dim must lie in [1, {n - 1}] so that both parts of the {n} {what} of "
            f"input_dim={shape} are non-empty, got {split_dim!r}"
        )
    return int(split)


def _check_context_dim(context_dim: int) -> int:
    if int(context_dim) != context_dim or context_dim < 1:
        raise ValueError(f"context_dim must be a positive integer, got {context_dim!r}")
    return int(context_dim)


# -- the shared bases -------------------------------------------------------------------------
class _SplitBlock(InvertibleModule):
    """A block that splits its event along the first axis into ``split_dim`` + the rest."""

    sign = 1

    def __init__(
        self, input_dim: int | Sequence[int], split_dim: int | None, cache_size: int
    ) -> None:
        shape = _block_shape(input_dim)
        super().__init__(shape, cache_size=cache_size)
        self.split_dim = _resolve_split(shape, split_dim)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        sizes = [self.split_dim, self.event_shape[0] - self.split_dim]
        x1, x2 = x.split(sizes, dim=-self.event_dim)
        return x1, x2

    def _merge(self, x1: Tensor, x2: Tensor) -> Tensor:
        return torch.cat([x1, x2], dim=-self.event_dim)

    def _zero_ladj(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[: x.dim() - self.event_dim])

    def extra_repr(self) -> str:
        return f"input_dim={self.event_shape}, split_dim={self.split_dim}"


class _ConditionalBlock(ConditionalTransformModule):
    """The body of every conditional twin here: conditional networks, bound on ``condition``.

    ``nets`` maps the unconditional block's network arguments (``nn``, or ``f`` and ``g``)
    to conditional networks ``net(x, context=c)``; ``.condition(context)`` builds a
    ``block`` whose networks are these with the context bound, so parameters are shared.
    """

    bijective = True
    block: ClassVar[type[InvertibleModule]]

    def __init__(
        self, nets: dict[str, nn.Module], input_dim: int | Sequence[int], **options: object
    ) -> None:
        super().__init__()
        self.net_names = tuple(nets)
        for name, net in nets.items():
            self.add_module(name, net)
        self.event_shape = _block_shape(input_dim)
        self.options = options
        # build one conditioned block now so that bad options fail here, not at first use
        dims = self._context_dims()
        self.condition(torch.zeros(dims[0] if dims else 1))

    def _context_dims(self) -> list[int]:
        """The context sizes the networks declare (Pyro's unconditional DenseNN says 0)."""
        dims = [getattr(getattr(self, name), "context_dim", None) for name in self.net_names]
        return [d for d in dims if isinstance(d, int) and d > 0]

    def condition(self, context: Tensor) -> InvertibleModule:
        for dim in self._context_dims():
            # here, not as a matrix-multiply error (an IndexError for a scalar) at first use
            _check_context(context, dim)
        bound = {name: ContextBound(getattr(self, name), context) for name in self.net_names}
        return self.block(input_dim=self.event_shape, **bound, **self.options)

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"input_dim={self.event_shape}{options}"


# -- the blocks ---------------------------------------------------------------------------------
class AdditiveCoupling(_SplitBlock):
    """NICE's additive coupling ``y_2 = x_2 + t(x_1)``: volume preserving.

    Arguments:
        nn: the conditioner ``t``, mapping ``x_1`` (event ``(split_dim,)`` or
            ``(split_dim, H, W)``) to a tensor shaped like ``x_2``.
        input_dim: the event shape, ``D`` or ``(C, H, W)``.
        split_dim: the size of ``x_1`` (default: half, rounded down).
        cache_size: 0 or 1.

    Cost and cache: one pass of ``t`` each way; the log-det is zero and costs nothing.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> block = additive_coupling(4, [16])
        >>> base = dist.Normal(torch.zeros(4), 1.0).to_event(1)
        >>> flow = dist.TransformedDistribution(base, [block])
        >>> flow.log_prob(torch.zeros(3, 4)).shape
        torch.Size([3])
    """

    def __init__(
        self,
        nn: nn.Module,
        input_dim: int | Sequence[int],
        split_dim: int | None = None,
        cache_size: int = 1,
    ) -> None:
        super().__init__(input_dim, split_dim, cache_size)
        self.nn = nn

    def _call(self, x: Tensor) -> Tensor:
        x1, x2 = self._split(x)
        self._remember_ladj(self._zero_ladj(x))
        return self._merge(x1, x2 + self.nn(x1))

    def _inverse(self, y: Tensor) -> Tensor:
        y1, y2 = self._split(y)
        self._remember_ladj(self._zero_ladj(y))
        return self._merge(y1, y2 - self.nn(y1))

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor, memo: object) -> Tensor:
        return self._zero_ladj(x)


class AffineCoupling(_SplitBlock):
    """Affine coupling ``y_2 = x_2 e^{s(x_1)} + t(x_1)`` with a bounded log-scale.

    Arguments:
        nn: the conditioner, mapping ``x_1`` to a pair ``(raw, t)`` of tensors shaped like
            ``x_2``; the log-scale is ``s = b tanh(raw / b)``.
        input_dim: the event shape, ``D`` or ``(C, H, W)``.
        split_dim: the size of ``x_1`` (default: half, rounded down).
        log_scale_bound: ``b``; each coordinate is scaled by a factor in ``(e^-b, e^b)``.
        cache_size: 0 or 1.

    Cost and cache: one pass of the conditioner each way; the log-det of the pair the block
    just computed (either direction) is a sum of the kept log-scale.

    Example:
        >>> import torch
        >>> block = affine_coupling((4, 8, 8), [16, 16])
        >>> x = torch.randn(2, 4, 8, 8)
        >>> bool((block(x) == x).all())   # the identity at initialisation
        True
        >>> block.log_abs_det_jacobian(x, block(x)).tolist()
        [0.0, 0.0]
    """

    def __init__(
        self,
        nn: nn.Module,
        input_dim: int | Sequence[int],
        split_dim: int | None = None,
        log_scale_bound: float = 2.0,
        cache_size: int = 1,
    ) -> None:
        super().__init__(input_dim, split_dim, cache_size)
        self.nn = nn
        self.log_scale_bound = _check_bound(log_scale_bound)

    def _scale_shift(self, x1: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = self.nn(x1)
        return bounded_log_scale(raw, self.log_scale_bound), shift

    def _call(self, x: Tensor) -> Tensor:
        x1, x2 = self._split(x)
        s, t = self._scale_shift(x1)
        self._remember_ladj(_sum_event(s, self.event_dim))
        return self._merge(x1, x2 * s.exp() + t)

    def _inverse(self, y: Tensor) -> Tensor:
        y1, y2 = self._split(y)
        s, t = self._scale_shift(y1)
        self._remember_ladj(_sum_event(s, self.event_dim))
        return self._merge(y1, (y2 - t) * torch.exp(-s))

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor, memo: object) -> Tensor:
        s, _ = self._scale_shift(self._split(x)[0])
        return _sum_event(s, self.event_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, log_scale_bound={self.log_scale_bound}"


class ConditionalAdditiveCoupling(_ConditionalBlock):
    """The conditional twin of :class:`AdditiveCoupling`: ``y_2 = x_2 + t(x_1; c)``.

    ``.condition(context)`` returns an :class:`AdditiveCoupling` sharing the parameters.

    Arguments:
        nn: a conditional conditioner ``t(x_1, context=c)``.
        input_dim: the event shape, ``D`` or ``(C, H, W)``.
        split_dim: the size of ``x_1``.
        cache_size: 0 or 1, for the conditioned blocks.

    Example:
        >>> import torch
        >>> block = conditional_additive_coupling(4, context_dim=2, hidden_dims=[16])
        >>> block.condition(torch.randn(2))(torch.randn(5, 4)).shape
        torch.Size([5, 4])
    """

    block = AdditiveCoupling

    def __init__(
        self,
        nn: nn.Module,
        input_dim: int | Sequence[int],
        split_dim: int | None = None,
        cache_size: int = 1,
    ) -> None:
        super().__init__({"nn": nn}, input_dim, split_dim=split_dim, cache_size=cache_size)


class ConditionalAffineCoupling(_ConditionalBlock):
    """The conditional twin of :class:`AffineCoupling`: ``s, t`` also depend on a context.

    ``.condition(context)`` returns an :class:`AffineCoupling` sharing the parameters.

    Arguments:
        nn: a conditional conditioner returning ``(raw, t)`` from ``(x_1, context=c)``.
        input_dim: the event shape, ``D`` or ``(C, H, W)``.
        split_dim: the size of ``x_1``.
        log_scale_bound: the bound ``b`` on the log-scale.
        cache_size: 0 or 1, for the conditioned blocks.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> block = conditional_affine_coupling((2, 4, 4), context_dim=3, hidden_dims=[8])
        >>> base = dist.Normal(torch.zeros(2, 4, 4), 1.0).to_event(3)
        >>> flow = dist.ConditionalTransformedDistribution(base, [block])
        >>> flow.condition(torch.randn(3)).sample((5,)).shape
        torch.Size([5, 2, 4, 4])
    """

    block = AffineCoupling

    def __init__(
        self,
        nn: nn.Module,
        input_dim: int | Sequence[int],
        split_dim: int | None = None,
        log_scale_bound: float = 2.0,
        cache_size: int = 1,
    ) -> None:
        super().__init__(
            {"nn": nn},
            input_dim,
            split_dim=split_dim,
            log_scale_bound=log_scale_bound,
            cache_size=cache_size,
        )


# -- the factories --------------------------------------------------------------------------------
def _build_coupling(
    cls: type[Block],
    input_dim: int | Sequence[int],
    hidden_dims: Sequence[int] | None,
    split_dim: int | None,
    context_dim: int,
    num_outputs: int,
    activation: str,
    **options: object,
) -> Block:
    """The one builder behind the four coupling factories."""
    shape = _block_shape(input_dim)
    split = _resolve_split(shape, split_dim)
    net = make_conditioner(
        (split, *shape[1:]),
        shape[0] - split,
        hidden_dims,
        context_dim=context_dim,
        num_outputs=num_outputs,
        activation=activation,
    )
    return cls(net, shape, split_dim=split, **options)


def additive_coupling(
    input_dim: int | Sequence[int],
    hidden_dims: Sequence[int] | None = None,
    split_dim: int | None = None,
    *,
    activation: str = "relu",
    cache_size: int = 1,
) -> AdditiveCoupling:
    """Build an :class:`AdditiveCoupling` with a zero-initialised conditioner.

    Arguments:
        input_dim: ``D`` (vectors) or ``(C, H, W)`` (images, split over channels).
        hidden_dims: hidden units or channels of the conditioner (default
            :func:`~pyro_invres.nn.conditioners.default_hidden_dims`).
        split_dim: the size of the unchanged part ``x_1`` (default ``D // 2`` or ``C // 2``).
        activation: ``"relu"`` or ``"elu"``.
        cache_size: 0 or 1.

    Example:
        >>> import torch
        >>> block = additive_coupling((4, 6, 6), [8, 8])
        >>> block(torch.randn(3, 4, 6, 6)).shape
        torch.Size([3, 4, 6, 6])
    """
    return _build_coupling(
        AdditiveCoupling, input_dim, hidden_dims, split_dim, 0, 1, activation, cache_size=cache_size
    )


def affine_coupling(
    input_dim: int | Sequence[int],
    hidden_dims: Sequence[int] | None = None,
    split_dim: int | None = None,
    *,
    log_scale_bound: float = 2.0,
    activation: str = "relu",
    cache_size: int = 1,
) -> AffineCoupling:
    """Build an :class:`AffineCoupling` with a zero-initialised conditioner.

    Arguments:
        input_dim: ``D`` (vectors) or ``(C, H, W)`` (images, split over channels).
        hidden_dims: hidden units or channels of the conditioner.
        split_dim: the size of the unchanged part ``x_1`` (default ``D // 2`` or ``C // 2``).
        log_scale_bound: the bound ``b`` on the log-scale.
        activation: ``"relu"`` or ``"elu"``.
        cache_size: 0 or 1.

    Example:
        >>> import torch
        >>> block = affine_coupling(5, [32], split_dim=2)
        >>> x = torch.randn(10, 5)
        >>> torch.allclose(block._inverse(block._call(x)), x)
        True
    """
    return _build_coupling(
        AffineCoupling,
        input_dim,
        hidden_dims,
        split_dim,
        0,
        2,
        activation,
        log_scale_bound=log_scale_bound,
        cache_size=cache_size,
    )


def conditional_additive_coupling(
    input_dim: int | Sequence[int],
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    split_dim: int | None = None,
    *,
    activation: str = "relu",
    cache_size: int = 1,
) -> ConditionalAdditiveCoupling:
    """Build a :class:`ConditionalAdditiveCoupling` (arguments as :func:`additive_coupling`).

    Arguments:
        input_dim: ``D`` or ``(C, H, W)``.
        context_dim: the dimension of the context vector.
        hidden_dims: hidden units or channels of the conditioner.
        split_dim: the size of ``x_1``.
        activation: ``"relu"`` or ``"elu"``.
        cache_size: 0 or 1.

    Example:
        >>> import torch
        >>> block = conditional_additive_coupling((2, 4, 4), 3, [8])
        >>> block.condition(torch.randn(5, 3))(torch.randn(5, 2, 4, 4)).shape
        torch.Size([5, 2, 4, 4])
    """
    return _build_coupling(
        ConditionalAdditiveCoupling,
        input_dim,
        hidden_dims,
        split_dim,
        _check_context_dim(context_dim),
        1,
        activation,
        cache_size=cache_size,
    )


def conditional_affine_coupling(
    input_dim: int | Sequence[int],
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    split_dim: int | None = None,
    *,
    log_scale_bound: float = 2.0,
    activation: str = "relu",
    cache_size: int = 1,
) -> ConditionalAffineCoupling:
    """Build a :class:`ConditionalAffineCoupling` (arguments as :func:`affine_coupling`).

    Arguments:
        input_dim: ``D`` or ``(C, H, W)``.
        context_dim: the dimension of the context vector.
        hidden_dims: hidden units or channels of the conditioner.
        split_dim: the size of ``x_1``.
        log_scale_bound: the bound ``b`` on the log-scale.
        activation: ``"relu"`` or ``"elu"``.
        cache_size: 0 or 1.

    Example:
        >>> import torch
        >>> block = conditional_affine_coupling(4, 2, [16])
        >>> block.condition(torch.randn(2))(torch.randn(5, 4)).shape
        torch.Size([5, 4])
    """
    return _build_coupling(
        ConditionalAffineCoupling,
        input_dim,
        hidden_dims,
        split_dim,
        _check_context_dim(context_dim),
        2,
        activation,
        log_scale_bound=log_scale_bound,
        cache_size=cache_size,
    )
