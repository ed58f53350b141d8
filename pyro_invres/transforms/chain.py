"""A chain of blocks run as one block: validation and caching once, at its boundary.

.. math::

    f = f_K \\circ \\cdots \\circ f_1, \\qquad
    \\log|\\det J_f(x)| = \\textstyle\\sum_k \\log|\\det J_{f_k}(x_{k-1})|,
    \\quad x_k = f_k(x_{k-1}),

Pyro's ``ComposeTransformModule`` calls each part through its own ``__call__``: every
block validates its input and consults its cache, and the composed log-det calls every
block again to recover the intermediate values. For a guide of a dozen small blocks that
bookkeeping costs more than the arithmetic. :class:`Chain` runs the parts through the
block contract with ``cached=False`` (:meth:`~InvertibleModule.call_and_ladj`) and
keeps one pair and its log-det: the end points, which is all a guide scoring its own
samples (or NeuTra-HMC) asks for.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import InvertibleModule

__all__ = ["Chain", "chain"]


class Chain(InvertibleModule):
    """Blocks applied in order (``parts[0]`` first), as a single cached block.

    Arguments:
        parts: :class:`~pyro_invres.transforms.base.InvertibleModule` blocks on the same
            vector or image event shape.
        cache_size: 0 or 1.

    Example:
        >>> import torch
        >>> from pyro_invres.transforms.triangular import TriangularAffine
        >>> from pyro_invres import iresnet
        >>> flow = chain([iresnet(3, [8]), TriangularAffine(3, init_scale=2.0)])
        >>> x = torch.randn(4, 3)
        >>> y = flow(x)
        >>> flow.inv(y) is x   # the end pair is cached: no fixed point solved
        True
        >>> flow.log_abs_det_jacobian(x, y).shape
        torch.Size([4])
    """

    def __init__(self, parts: Sequence[InvertibleModule], cache_size: int = 1) -> None:
        parts = list(parts)
        if not parts:
            raise ValueError("a Chain needs at least one block")
        for part in parts:
            if not isinstance(part, InvertibleModule):
                raise TypeError(
                    f"Chain parts must be InvertibleModule blocks, got {type(part).__name__}"
                )
        shape = parts[0].event_shape
        for part in parts[1:]:
            if part.event_shape != shape or part.output_shape != part.event_shape:
                raise ValueError(
                    f"Chain parts must share one event shape {shape}, got "
                    f"{type(part).__name__} with {part.event_shape} -> {part.output_shape}"
                )
        super().__init__(shape, cache_size=cache_size)
        self.parts = nn.ModuleList(parts)

    @property
    def sign(self) -> int:
        sign = 1
        for part in self.parts:
            sign *= part.sign
        return sign

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = None
        for part in self.parts:
            x, ladj = part.call_and_ladj(x, cached=False)
            total = ladj if total is None else total + ladj
        return x, total

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        total = None
        for part in reversed(self.parts):
            y, ladj = part.inverse_and_ladj(y, cached=False)
            total = ladj if total is None else total + ladj
        return y, total


def chain(parts: Sequence[InvertibleModule]) -> Chain:
    """Build a :class:`Chain` of ``parts`` (applied in order).

    Example:
        >>> from pyro_invres.transforms.triangular import TriangularAffine
        >>> len(chain([TriangularAffine(2), TriangularAffine(2)]).parts)
        2
    """
    return Chain(parts)
