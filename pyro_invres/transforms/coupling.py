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
log-det computed on the way (either direction, by the one coupling core :class:`Coupling`)
is kept for the cached pair. Stack blocks with permutations (or alternate ``split_dim``)
so that every coordinate gets transformed.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn

from ..nn.conditioners import ContextBound, _check_context, make_conditioner
from ..ops.reversible import InverseVJP
from .base import InvertibleModule, as_event_shape

__all__ = [
    "AdditiveCoupling",
    "BoundedAffineCoupling",
    "Coupling",
    "CouplingUpdate",
    "ConditionalAdditiveCoupling",
    "ConditionalBoundedAffineCoupling",
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


# -- the coupling core --------------------------------------------------------------------------
def _module_tensors(module: nn.Module) -> tuple[Tensor, ...]:
    """Parameters, and the context of conditioned networks (it may require grad)."""
    found = list(module.parameters())
    for m in module.modules():
        context = getattr(m, "context", None) if isinstance(m, ContextBound) else None
        if isinstance(context, Tensor) and context.requires_grad:
            found.append(context)
    return tuple(found)


@dataclass(frozen=True)
class CouplingUpdate:
    """One coupling update of a two-part event ``(h_0, h_1)``.

    The part ``h_cond`` feeds ``net`` and stays; the other part becomes ``h + t``
    (additive, ``log_scale_bound=None``, ``net`` returns ``t``) or ``h e^s + t`` with
    ``s = b tanh(raw / b)`` (affine, ``net`` returns ``(raw, t)``).

    Example:
        >>> import torch
        >>> update = CouplingUpdate(0, torch.nn.Identity())
        >>> update.changed, update.coefficients(torch.ones(2))
        (1, (None, tensor([1., 1.])))
    """

    cond: int
    net: nn.Module
    log_scale_bound: float | None = None

    @property
    def changed(self) -> int:
        """The index of the part this update changes."""
        return 1 - self.cond

    def coefficients(self, h: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(s, t)`` from the conditioning part (``s`` is None for an additive update)."""
        if self.log_scale_bound is None:
            return None, self.net(h)
        raw, shift = self.net(h)
        return bounded_log_scale(raw, self.log_scale_bound), shift


def _couple(h: Tensor, s: Tensor | None, t: Tensor) -> Tensor:
    return h + t if s is None else h * s.exp() + t


def _uncouple(h: Tensor, s: Tensor | None, t: Tensor) -> Tensor:
    return h - t if s is None else (h - t) * torch.exp(-s)


@dataclass(frozen=True)
class Coupling:
    """How a block couples: the one implementation of every coupling update here.

    :class:`AdditiveCoupling`, :class:`BoundedAffineCoupling`,
    :class:`~pyro_invres.transforms.RevNetBlock` (two updates with the roles swapped) and
    any user block whose :meth:`~pyro_invres.transforms.InvertibleModule.as_coupling`
    returns one compute both directions and the log-det here, and
    :class:`~pyro_invres.transforms.ReversibleStack` takes its fused backward from
    :meth:`inverse_vjp`.

    Arguments:
        split: ``x -> (h_0, h_1)``.
        merge: ``(h_0, h_1) -> x``, the inverse of ``split``.
        updates: applied in order by the forward map, undone in reverse by the inverse.
        event_dim: the number of event dimensions (the log-det sums over them).

    Example:
        >>> import torch
        >>> from pyro_invres.transforms import revnet_block
        >>> core = revnet_block(4, [8], affine=True).as_coupling()
        >>> x = torch.randn(3, 4)
        >>> y, ladj = core.forward(x)
        >>> x2, ladj2 = core.inverse(y)
        >>> torch.allclose(x2, x), torch.equal(ladj, ladj2)
        (True, True)
    """

    split: Callable[[Tensor], tuple[Tensor, Tensor]]
    merge: Callable[[Tensor, Tensor], Tensor]
    updates: tuple[CouplingUpdate, ...]
    event_dim: int

    def _ladj(self, scales: list[Tensor | None], like: Tensor) -> Tensor:
        """The forward log-det from the log-scales in forward order (zero if additive)."""
        total: Tensor | None = None
        for s in scales:
            if s is not None:
                value = _sum_event(s, self.event_dim)
                total = value if total is None else total + value
        if total is None:
            return like.new_zeros(like.shape[: like.dim() - self.event_dim])
        return total

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log|det dy/dx|)``."""
        h = list(self.split(x))
        scales: list[Tensor | None] = []
        for u in self.updates:
            s, t = u.coefficients(h[u.cond])
            h[u.changed] = _couple(h[u.changed], s, t)
            scales.append(s)
        return self.merge(h[0], h[1]), self._ladj(scales, x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|det dy/dx|)``: the input and the *forward* log-det at it."""
        h = list(self.split(y))
        scales: list[Tensor | None] = [None] * len(self.updates)
        for i in reversed(range(len(self.updates))):
            u = self.updates[i]
            s, t = u.coefficients(h[u.cond])
            h[u.changed] = _uncouple(h[u.changed], s, t)
            scales[i] = s
        return self.merge(h[0], h[1]), self._ladj(scales, y)

    def pair_ladj(self, x: Tensor, y: Tensor) -> Tensor:
        """The forward log-det of a pair ``(x, y)`` from the conditioning parts alone.

        Each update's conditioning part is read from ``x`` until a later update no longer
        changes it, then from ``y``: no update is recomputed.
        """
        if all(u.log_scale_bound is None for u in self.updates):
            return self._ladj([], x)
        h, final = list(self.split(x)), self.split(y)
        scales: list[Tensor | None] = []
        for i, u in enumerate(self.updates):
            s, _ = u.coefficients(h[u.cond])
            scales.append(s)
            if all(v.changed != u.changed for v in self.updates[i + 1 :]):
                h[u.changed] = final[u.changed]
        return self._ladj(scales, x)

    def inverse_vjp(self, inverse: bool = False) -> InverseVJP:
        """A fused backward step for :class:`~pyro_invres.ops.reversible.ReversibleStep`.

        A coupling update keeps its conditioning part, so the network evaluated at the
        output's part is the very network of the forward pass: its outputs undo the update
        (the reconstruction) and its graph serves the backward pass (no separate
        inversion). ``inverse=True`` is the step of the inverse map ``y -> x``.
        """
        owned = [frozenset(map(id, _module_tensors(u.net))) for u in self.updates]
        order = list(range(len(self.updates)))
        # the updates as the step applies them: reversed and undone for the inverse map
        run = [(i, inverse) for i in (order[::-1] if inverse else order)]
        event_dim = self.event_dim

        def step_vjp(
            out: Tensor, grad_out: Tensor, grad_logdet: Tensor, wrt: tuple[Tensor, ...]
        ) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
            halves = list(self.split(out))
            grads = list(self.split(grad_out))
            param_grads: list[Tensor | None] = [None] * len(wrt)
            for i, undo in reversed(run):
                u = self.updates[i]
                c, ch = u.cond, u.changed
                mine = [k for k, w in enumerate(wrt) if id(w) in owned[i]]
                with torch.enable_grad():  # the backward pass runs with grad mode off
                    cond = halves[c].detach().requires_grad_()
                    s, t = u.coefficients(cond)
                    logdet = None if s is None else _sum_event(s, event_dim)
                    if logdet is not None and undo:
                        logdet = -logdet
                with torch.no_grad():
                    after = halves[ch]
                    before = _couple(after, s, t) if undo else _uncouple(after, s, t)
                    # the update is elementwise in the changed part: its vector-Jacobian
                    # products are closed form, only the network needs autograd
                    g = grads[ch]
                    if s is None:  # after = before +- t
                        g_before, g_s, g_t = g, None, (-g if undo else g)
                    elif undo:  # after = (before - t) e^{-s}
                        scaled = g * torch.exp(-s)
                        g_before, g_s, g_t = scaled, -g * after, -scaled
                    else:  # after = before e^s + t
                        scaled = g * s.exp()
                        g_before, g_s, g_t = scaled, scaled * before, g
                outputs, grads_out = [t], [g_t]
                if s is not None:
                    assert logdet is not None and g_s is not None
                    outputs += [s, logdet]
                    grads_out += [g_s, grad_logdet.sum_to_size(logdet.shape)]
                inputs = (cond, *(wrt[k] for k in mine))
                pulled = torch.autograd.grad(outputs, inputs, grads_out, allow_unused=True)
                if pulled[0] is not None:
                    grads[c] = grads[c] + pulled[0]
                grads[ch] = g_before
                for k, grad in zip(mine, pulled[1:]):
                    if grad is not None:
                        old = param_grads[k]
                        param_grads[k] = grad if old is None else old + grad
                halves[c], halves[ch] = cond.detach(), before
            return (
                self.merge(halves[0], halves[1]),
                self.merge(grads[0], grads[1]),
                tuple(param_grads),
            )

        return step_vjp


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

    def as_coupling(self) -> Coupling:
        # every concrete split block says how it couples; the base cannot
        raise NotImplementedError(
            f"{type(self).__name__} splits its input but does not say how it couples: "
            "implement as_coupling() returning a Coupling"
        )

    # every split block is a coupling: the core computes both directions and the log-det
    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.as_coupling().forward(x)

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.as_coupling().inverse(y)

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.as_coupling().pair_ladj(x, y)

    def extra_repr(self) -> str:
        return f"input_dim={self.event_shape}, split_dim={self.split_dim}"


class _ConditionalBlock(ConditionalTransformModule):
    """The one conditional mechanism of the coupling family (Pyro's ``condition`` pattern).

    ``nets`` maps the unconditional block's network arguments (``nn``, or ``f`` and ``g``)
    to conditional networks ``net(x, context=c)``; ``.condition(context)`` builds a
    ``block`` whose networks are these with the context bound, so parameters are shared.
    Nothing runs at construction (no dummy context): the options are checked by building
    the block around the unbound networks, so any dtype and device work.
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
        # bad options fail here, not at first use; building the block runs no network
        self.block(input_dim=self.event_shape, **nets, **options)

    def _context_dims(self) -> list[int]:
        """The context sizes the networks declare (Pyro's unconditional DenseNN says 0)."""
        dims = [getattr(getattr(self, name), "context_dim", None) for name in self.net_names]
        return [d for d in dims if isinstance(d, int) and d > 0]

    def condition(self, context: Tensor) -> InvertibleModule:
        for dim in self._context_dims():
            # here, not as a matrix-multiply error (an IndexError for a scalar) at first use
            _check_context(context, dim)
        # a block keeps its input's shape: a context batch that does not expand to the
        # input's batch is refused, whatever the network would broadcast
        event_dim = len(self.event_shape)
        bound = {
            name: ContextBound(getattr(self, name), context, event_dim=event_dim)
            for name in self.net_names
        }
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

    def as_coupling(self) -> Coupling:
        """One additive update of ``x_2`` by ``nn(x_1)``."""
        return Coupling(self._split, self._merge, (CouplingUpdate(0, self.nn),), self.event_dim)


class BoundedAffineCoupling(_SplitBlock):
    """Affine coupling ``y_2 = x_2 e^{s(x_1)} + t(x_1)`` with a bounded log-scale.

    Named apart from Pyro's ``pyro.distributions.transforms.AffineCoupling`` (a different
    signature and an unbounded, clipped log-scale); the old name here still unpickles, with
    a ``DeprecationWarning``.

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

    def as_coupling(self) -> Coupling:
        """One affine update of ``x_2`` by ``nn(x_1)`` with the bounded log-scale."""
        update = CouplingUpdate(0, self.nn, self.log_scale_bound)
        return Coupling(self._split, self._merge, (update,), self.event_dim)

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


class ConditionalBoundedAffineCoupling(_ConditionalBlock):
    """The conditional twin of :class:`BoundedAffineCoupling`: ``s, t`` also see a context.

    ``.condition(context)`` returns a :class:`BoundedAffineCoupling` sharing the parameters.

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

    block = BoundedAffineCoupling

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


# -- renamed classes (kept for modules pickled before the rename) --------------------------------
_RENAMED = {
    "AffineCoupling": "BoundedAffineCoupling",
    "ConditionalAffineCoupling": "ConditionalBoundedAffineCoupling",
}


def __getattr__(name: str) -> object:
    new = _RENAMED.get(name)
    if new is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings

    warnings.warn(
        f"pyro_invres.transforms.coupling.{name} is now {new} (Pyro's {name} is a different "
        "class); the old name will be removed",
        DeprecationWarning,
        stacklevel=2,
    )
    return globals()[new]


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
) -> BoundedAffineCoupling:
    """Build a :class:`BoundedAffineCoupling` with a zero-initialised conditioner.

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
        BoundedAffineCoupling,
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
) -> ConditionalBoundedAffineCoupling:
    """Build a :class:`ConditionalBoundedAffineCoupling` (arguments as :func:`affine_coupling`).

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
        ConditionalBoundedAffineCoupling,
        input_dim,
        hidden_dims,
        split_dim,
        _check_context_dim(context_dim),
        2,
        activation,
        log_scale_bound=log_scale_bound,
        cache_size=cache_size,
    )
