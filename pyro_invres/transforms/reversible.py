"""A stack of invertible blocks trained without storing its activations (RevNet-style).

:class:`ReversibleStack` composes blocks ``f = f_L \\circ \\cdots \\circ f_1`` into one
transform,

.. math::

    y = f_L(\\cdots f_1(x)), \\qquad
    \\log|\\det J_f(x)| = \\textstyle\\sum_j \\log|\\det J_{f_j}(x_{j-1})| ,

whose gradients come from :func:`~pyro_invres.ops.reversible.reversible_chain`: the
forward pass keeps one anchor activation every ``checkpoint_every`` blocks and the backward
pass reconstructs the other activations by the blocks' inverses, recomputing one block at a
time. Activation memory is ``O(L / k)`` activations plus one block's graph instead of ``L``
block graphs; the float32 drift of the reconstruction is bounded by that of ``k`` inversions
whatever the depth (see :mod:`pyro_invres.ops.reversible`). The inverse of the stack is the
reversed chain of the blocks' inverses and gets the same treatment, so density estimation
(``log_prob`` of data, which runs ``_inverse``) saves memory as much as sampling does.

Cost and cache: a training step costs about ``4/3`` (couplings and RevNet blocks, whose
reconstruction and recomputation share one pass of their networks) to ``5/3`` (any other
block: an inversion, then a recomputation) of plain autograd. The log-determinant is summed
in the same pass and kept for the cached pair, so ``log_abs_det_jacobian`` after a call (or
inside :class:`~pyro.distributions.TransformedDistribution`) costs nothing. The blocks' own
caches are bypassed (their ``_call``/``_inverse`` run directly): a block's cache would hold
its activations and defeat the point.

Blocks must be deterministic functions of their input and parameters, as they run again in
the backward pass: no dropout, no statistics updated in the forward pass (a data-initialised
:class:`~pyro_invres.transforms.ActNorm` is fine: it initialises once, on the first pass).

References:
    [1] Gomez, Ren, Urtasun & Grosse, *The Reversible Residual Network: Backpropagation
        Without Storing Activations*, NeurIPS 2017. arXiv:1707.04585
    [2] Jacobsen, Smeulders & Oyallon, *i-RevNet: Deep Invertible Networks*, ICLR 2018.
        arXiv:1802.07088
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import Tensor, nn

from ..nn.conditioners import ContextBound
from ..ops.reversible import (
    InverseVJP,
    ReversibleStep,
    resolve_checkpoint_every,
    reversible_chain,
)
from .base import InvertibleModule
from .coupling import AdditiveCoupling, AffineCoupling, _sum_event, bounded_log_scale
from .inverse import Inverse
from .revnet import RevNetBlock

__all__ = ["ReversibleStack", "reversible_stack", "reversible_step"]


# -- one block as a step of the chain --------------------------------------------------------------
def _pop_ladj(block: InvertibleModule, x: Tensor, y: Tensor) -> Tensor:
    """The log-det of the pair ``block._call``/``_inverse`` just computed; clears the memo."""
    memo = getattr(block, "_pending_memo", None)
    block._pending_memo = None  # hold no graph between calls
    if isinstance(memo, Tensor):
        return memo
    return block._log_abs_det_jacobian(x, y, memo)


def _block_tensors(block: nn.Module) -> tuple[Tensor, ...]:
    """Parameters, and the context of conditioned networks (it may require grad)."""
    found = list(block.parameters())
    for module in block.modules():
        context = getattr(module, "context", None) if isinstance(module, ContextBound) else None
        if isinstance(context, Tensor) and context.requires_grad:
            found.append(context)
    return tuple(found)


@dataclass(frozen=True)
class _Stage:
    """One coupling update: the half ``cond`` feeds ``net``, the other half changes.

    ``bound`` is None for an additive update ``h + t``, else the log-scale bound of an
    affine one ``h e^s + t``; ``undo`` marks the inverse direction (``(h - t) e^{-s}``).
    """

    cond: int
    net: nn.Module
    bound: float | None
    undo: bool = False
    tensor_ids: frozenset[int] = frozenset()  # of what ``net`` reads: parameters, context

    @classmethod
    def of(cls, cond: int, net: nn.Module, bound: float | None) -> _Stage:
        return cls(cond, net, bound, tensor_ids=frozenset(map(id, _block_tensors(net))))

    def inverted(self) -> _Stage:
        return _Stage(self.cond, self.net, self.bound, not self.undo, self.tensor_ids)

    def coefficients(self, h: Tensor) -> tuple[Tensor | None, Tensor]:
        if self.bound is None:
            return None, self.net(h)
        raw, shift = self.net(h)
        return bounded_log_scale(raw, self.bound), shift

    @staticmethod
    def couple(h: Tensor, s: Tensor | None, t: Tensor) -> Tensor:
        return h + t if s is None else h * s.exp() + t

    @staticmethod
    def uncouple(h: Tensor, s: Tensor | None, t: Tensor) -> Tensor:
        return h - t if s is None else (h - t) * torch.exp(-s)

    def apply(self, h: Tensor, s: Tensor | None, t: Tensor) -> Tensor:
        return self.uncouple(h, s, t) if self.undo else self.couple(h, s, t)

    def revert(self, h: Tensor, s: Tensor | None, t: Tensor) -> Tensor:
        return self.couple(h, s, t) if self.undo else self.uncouple(h, s, t)

    def pullback(
        self, before: Tensor, after: Tensor, s: Tensor | None, t: Tensor, grad: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Gradients of the update ``before -> after`` w.r.t. ``(before, s, t)``, given
        the gradient of ``after`` (the log-det's share of ``s`` is not included)."""
        if s is None:  # after = before +- t
            return grad, None, -grad if self.undo else grad
        if self.undo:  # after = (before - t) e^{-s}
            scaled = grad * torch.exp(-s)
            return scaled, -grad * after, -scaled
        # after = before e^s + t
        scaled = grad * s.exp()
        return scaled, scaled * before, grad

    def logdet(self, s: Tensor | None, event_dim: int) -> Tensor | None:
        if s is None:
            return None
        value = _sum_event(s, event_dim)
        return -value if self.undo else value


def _coupling_stages(block: InvertibleModule, inverse: bool) -> list[_Stage] | None:
    """The block as coupling updates in the direction run, or None if it is not one."""
    kind = type(block)
    if kind is AdditiveCoupling:
        stages = [_Stage.of(0, block.nn, None)]
    elif kind is AffineCoupling:
        stages = [_Stage.of(0, block.nn, block.log_scale_bound)]
    elif kind is RevNetBlock:
        bound = block.log_scale_bound if block.affine else None
        stages = [_Stage.of(1, block.f, bound), _Stage.of(0, block.g, bound)]
    else:
        return None
    return [stage.inverted() for stage in reversed(stages)] if inverse else stages


def _fused_inverse_vjp(block: InvertibleModule, stages: list[_Stage]) -> InverseVJP:
    """Reconstruct a coupling block's input and back-propagate with one pass of each network.

    A coupling update keeps its conditioning half, so the network evaluated at the output's
    half is the very network evaluated in the forward pass: its outputs undo the update (the
    reconstruction) and its graph serves the backward pass (no separate inversion).
    """

    def inverse_vjp(
        out: Tensor, grad_out: Tensor, grad_logdet: Tensor, wrt: tuple[Tensor, ...]
    ) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
        halves = list(block._split(out))
        grads = list(block._split(grad_out))
        param_grads: list[Tensor | None] = [None] * len(wrt)
        for stage in reversed(stages):
            c, u = stage.cond, 1 - stage.cond
            mine = [i for i, w in enumerate(wrt) if id(w) in stage.tensor_ids]
            with torch.enable_grad():  # the backward pass runs with grad mode off
                cond = halves[c].detach().requires_grad_()
                s, t = stage.coefficients(cond)
                logdet = stage.logdet(s, block.event_dim)
            with torch.no_grad():
                before = stage.revert(halves[u], s, t)
                # the update is elementwise in the changed half: its vector-Jacobian
                # products are closed-form, only the network needs autograd
                g_before, g_s, g_t = stage.pullback(before, halves[u], s, t, grads[u])
            outputs, grads_out = [t], [g_t]
            if s is not None:
                outputs.append(s)
                grads_out.append(g_s)
                assert logdet is not None
                outputs.append(logdet)
                grads_out.append(grad_logdet.sum_to_size(logdet.shape))
            inputs = (cond, *(wrt[i] for i in mine))
            pulled = torch.autograd.grad(outputs, inputs, grads_out, allow_unused=True)
            if pulled[0] is not None:
                grads[c] = grads[c] + pulled[0]
            grads[u] = g_before
            for i, grad in zip(mine, pulled[1:]):
                if grad is not None:
                    old = param_grads[i]
                    param_grads[i] = grad if old is None else old + grad
            halves[c], halves[u] = cond.detach(), before
        return block._merge(*halves), block._merge(*grads), tuple(param_grads)

    return inverse_vjp


def reversible_step(block: nn.Module, *, inverse: bool = False) -> ReversibleStep:
    """A block (or :class:`~pyro_invres.transforms.Inverse` of one) as a chain step.

    The step runs ``block._call`` (``_inverse`` when ``inverse``), bypassing the block's
    cache and validation, and returns the log-det the block computed on the way (negated
    for the inverse). Additive and affine couplings and RevNet blocks get a fused backward
    step (see :mod:`pyro_invres.ops.reversible`).

    Arguments:
        block: an :class:`~pyro_invres.transforms.InvertibleModule`, or an ``Inverse`` of one.
        inverse: the step maps ``y -> block^{-1}(y)``.

    Example:
        >>> import torch
        >>> from pyro_invres.transforms import additive_coupling
        >>> step = reversible_step(additive_coupling(4, [8]))
        >>> y, logdet = step.forward(torch.randn(3, 4))
        >>> y.shape, logdet.shape, step.inverse_vjp is not None
        (torch.Size([3, 4]), torch.Size([3]), True)
    """
    if isinstance(block, Inverse):
        return reversible_step(block.transform, inverse=not inverse)
    if not isinstance(block, InvertibleModule):
        raise TypeError(
            "a reversible stack takes InvertibleModule blocks (or Inverse of one), got "
            f"{type(block).__name__}"
        )

    def call_with_ladj(x: Tensor) -> tuple[Tensor, Tensor]:
        y = block._call(x)
        return y, _pop_ladj(block, x, y)

    def inverse_with_ladj(y: Tensor) -> tuple[Tensor, Tensor]:
        x = block._inverse(y)
        return x, -_pop_ladj(block, x, y)

    def call_only(x: Tensor) -> Tensor:
        y = block._call(x)
        block._pending_memo = None
        return y

    def inverse_only(y: Tensor) -> Tensor:
        x = block._inverse(y)
        block._pending_memo = None
        return x

    stages = _coupling_stages(block, inverse)
    fused = None if stages is None else _fused_inverse_vjp(block, stages)
    params = _block_tensors(block)
    if inverse:
        return ReversibleStep(inverse_with_ladj, call_only, params, fused)
    return ReversibleStep(call_with_ladj, inverse_only, params, fused)


# -- the stack -------------------------------------------------------------------------------------
def _flatten(blocks: Iterable[nn.Module]) -> list[nn.Module]:
    """Blocks of nested stacks (``ReversibleStack``, ``ComposeTransformModule``) in order."""
    if isinstance(blocks, (ReversibleStack, ComposeTransformModule)):
        blocks = list(blocks.blocks if isinstance(blocks, ReversibleStack) else blocks)
    flat: list[nn.Module] = []
    for block in blocks:
        if isinstance(block, (ReversibleStack, ComposeTransformModule)):
            flat.extend(_flatten(block))
        else:
            flat.append(block)
    return flat


def _event_shapes(block: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(input event shape, output event shape)`` of a block or an ``Inverse`` of one."""
    if isinstance(block, Inverse):
        shape_in, shape_out = _event_shapes(block.transform)
        return shape_out, shape_in
    if isinstance(block, InvertibleModule):
        return block.event_shape, block.output_shape
    raise TypeError(
        "a reversible stack takes InvertibleModule blocks (or Inverse of one), got "
        f"{type(block).__name__}"
    )


def _check_chain(shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    for i, ((_, out), (nxt, _)) in enumerate(zip(shapes, shapes[1:])):
        fits = len(out) == len(nxt) and all(a == b or -1 in (a, b) for a, b in zip(out, nxt))
        if not fits:
            raise ValueError(
                f"block {i} outputs events of shape {out} but block {i + 1} takes {nxt}"
            )


def _merge_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(y if x == -1 else x for x, y in zip(a, b))


def _pass_through(
    shape: tuple[int, ...], inside: tuple[int, ...], outside: tuple[int, ...]
) -> tuple[int, ...]:
    """A block's other side, keeping the sizes it leaves free (``-1`` on both sides)."""
    return tuple(s if a == b == -1 else b for s, a, b in zip(shape, inside, outside))


def _resolve_shapes(
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The stack's input and output event shapes, with sizes fixed by any block filled in."""
    out = shapes[0][0]
    for shape_in, shape_out in shapes:
        out = _pass_through(_merge_shape(out, shape_in), shape_in, shape_out)
    inp = out
    for shape_in, shape_out in reversed(shapes):
        inp = _pass_through(_merge_shape(inp, shape_out), shape_out, shape_in)
    return inp, out


class ReversibleStack(InvertibleModule):
    """Blocks composed into one transform whose backward pass recomputes, not stores.

    Arguments:
        blocks: :class:`~pyro_invres.transforms.InvertibleModule` blocks (or ``Inverse``
            of one), first applied first; nested stacks and ``ComposeTransformModule``
            are flattened.
        checkpoint_every: blocks per segment ``k``: one activation is kept every ``k``
            blocks and the float32 drift is that of at most ``k - 1`` inversions (default
            :data:`~pyro_invres.ops.reversible.DEFAULT_CHECKPOINT_EVERY`); ``k = 1``
            keeps every block's input (no inversion, still one block graph at a time).
        cache_size: 0 or 1.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro_invres.transforms import revnet_block
        >>> flow = reversible_stack([revnet_block(4, [16], affine=True) for _ in range(8)])
        >>> _ = pyro.module("flow", flow)
        >>> base = dist.Normal(torch.zeros(4), 1.0).to_event(1)
        >>> loss = -dist.TransformedDistribution(base, [flow]).log_prob(torch.randn(5, 4)).mean()
        >>> loss.backward()
        >>> all(p.grad is not None for p in flow.parameters())
        True
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        checkpoint_every: int | None = None,
        cache_size: int = 1,
    ) -> None:
        parts = _flatten(blocks)
        if not parts:
            raise ValueError("a ReversibleStack needs at least one block")
        shapes = [_event_shapes(block) for block in parts]
        _check_chain(shapes)
        shape_in, shape_out = _resolve_shapes(shapes)
        super().__init__(shape_in, cache_size=cache_size, output_shape=shape_out)
        self.blocks = nn.ModuleList(parts)
        self.checkpoint_every = resolve_checkpoint_every(checkpoint_every)
        self._steps_cache: dict[bool, tuple[tuple, list[ReversibleStep], list[nn.Module]]] = {}

    @property
    def sign(self) -> int:
        sign = 1
        for block in self.blocks:
            sign *= int(block.sign)
        return sign

    def __len__(self) -> int:
        return len(self.blocks)

    def steps(self, inverse: bool = False) -> list[ReversibleStep]:
        """The chain run by ``_call`` (``inverse=False``) or ``_inverse``, as steps.

        Built once per direction and reused while the blocks hold the same parameter
        tensors (replacing a network or a parameter rebuilds them).
        """
        cached = self._steps_cache.get(inverse)
        if cached is not None and cached[0] == self._structure_key(cached[2]):
            return cached[1]
        modules = list(self.modules())
        steps = [reversible_step(block, inverse=inverse) for block in self.blocks]
        steps = steps[::-1] if inverse else steps
        self._steps_cache[inverse] = (self._structure_key(modules), steps, modules)
        return steps

    @staticmethod
    def _structure_key(modules: list[nn.Module]) -> tuple[int, ...]:
        """Identities of every parameter and child of ``modules``.

        Changes when a parameter or a submodule is replaced anywhere in the tree the steps
        were built from; a flat walk, because ``parameters()`` builds a name for every
        module on the way (3% of a 64-block training step).
        """
        key: list[int] = []
        for module in modules:
            key.extend(map(id, module._parameters.values()))
            key.extend(map(id, module._modules.values()))
        return tuple(key)

    def __getstate__(self) -> dict:
        # caches hold closures and graphs: neither pickles nor belongs in a copy (the
        # base class drops the per-thread pair and memo)
        state = super().__getstate__()
        state["_steps_cache"] = {}
        return state

    def _call(self, x: Tensor) -> Tensor:
        y, logdet = reversible_chain(x, self.steps(), checkpoint_every=self.checkpoint_every)
        self._remember_ladj(logdet)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        steps = self.steps(inverse=True)
        x, logdet = reversible_chain(y, steps, checkpoint_every=self.checkpoint_every)
        self._remember_ladj(-logdet)
        return x

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor, memo: object) -> Tensor:
        if isinstance(memo, Tensor):
            return memo
        # a pair this stack did not just compute: run the chain again from x
        return reversible_chain(x, self.steps(), checkpoint_every=self.checkpoint_every)[1]

    def extra_repr(self) -> str:
        return f"checkpoint_every={self.checkpoint_every}"


def reversible_stack(
    blocks: Sequence[nn.Module], checkpoint_every: int | None = None
) -> ReversibleStack:
    """Build a :class:`ReversibleStack` from blocks (or a ``ComposeTransformModule``).

    Arguments:
        blocks: invertible blocks, first applied first.
        checkpoint_every: blocks per segment (one stored activation each).

    Example:
        >>> import torch
        >>> from pyro_invres.transforms import additive_coupling, channel_permutation
        >>> blocks = [b for _ in range(4) for b in (additive_coupling(6, [16]),
        ...                                         channel_permutation(6))]
        >>> flow = reversible_stack(blocks, checkpoint_every=4)
        >>> x = torch.randn(3, 6)
        >>> torch.allclose(flow._inverse(flow(x)), x, atol=1e-6)
        True
    """
    return ReversibleStack(blocks, checkpoint_every=checkpoint_every)
