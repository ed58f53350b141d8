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
caches are bypassed (``call_and_ladj(x, cached=False)``): a block's cache would hold its
activations and defeat the point.

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

from pyro.distributions.torch_transform import ComposeTransformModule
from torch import Tensor, nn

from ..ops.reversible import (
    ReversibleStep,
    resolve_checkpoint_every,
    reversible_chain,
)
from .base import InvertibleModule
from .coupling import _module_tensors
from .inverse import Inverse

__all__ = ["ReversibleStack", "reversible_stack", "reversible_step"]


# -- one block as a step of the chain --------------------------------------------------------------
def reversible_step(block: nn.Module, *, inverse: bool = False) -> ReversibleStep:
    """A block (or :class:`~pyro_invres.transforms.Inverse` of one) as a chain step.

    The step runs ``block.call_and_ladj(x, cached=False)`` (``inverse_and_ladj`` when
    ``inverse``, its log-det negated), bypassing the block's cache and validation. A block
    whose :meth:`~pyro_invres.transforms.InvertibleModule.as_coupling` describes a
    coupling (additive and affine couplings, RevNet blocks, any user block) gets a fused
    backward step (see :mod:`pyro_invres.ops.reversible`).

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

    # the blocks' caches and validation are bypassed (``cached=False``): a cache would
    # hold every block's activations, and the stack validates at its own boundary
    def inverse_with_ladj(y: Tensor) -> tuple[Tensor, Tensor]:
        x, ladj = block.inverse_and_ladj(y, cached=False)
        return x, -ladj

    def call_with_ladj(x: Tensor) -> tuple[Tensor, Tensor]:
        return block.call_and_ladj(x, cached=False)

    def call_only(x: Tensor) -> Tensor:
        return block.call(x, cached=False)

    def inverse_only(y: Tensor) -> Tensor:
        return block.inverse(y, cached=False)

    coupling = block.as_coupling()
    fused = None if coupling is None else coupling.inverse_vjp(inverse=inverse)
    params = _module_tensors(block)
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

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return reversible_chain(x, self.steps(), checkpoint_every=self.checkpoint_every)

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        steps = self.steps(inverse=True)
        x, logdet = reversible_chain(y, steps, checkpoint_every=self.checkpoint_every)
        return x, -logdet

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
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
        >>> torch.allclose(flow.inverse(flow(x), cached=False), x, atol=1e-6)
        True
    """
    return ReversibleStack(blocks, checkpoint_every=checkpoint_every)
