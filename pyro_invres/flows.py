"""Ready-made stacks of blocks, each a :class:`~pyro.distributions.ComposeTransformModule`."""

from __future__ import annotations

from collections.abc import Sequence

from pyro.distributions.torch_transform import ComposeTransformModule

from .transforms.actnorm import ActNorm
from .transforms.iresnet import iresnet

__all__ = ["residual_flow"]


def residual_flow(
    input_dim: int,
    num_blocks: int = 4,
    hidden_dims: Sequence[int] | None = None,
    *,
    explicit: str = "forward",
    actnorm: bool = True,
    **kwargs: object,
) -> ComposeTransformModule:
    """A residual flow: i-ResNet blocks interleaved with data-initialised ActNorm.

    .. math::

        f = A_K \\circ F_K \\circ \\cdots \\circ A_1 \\circ F_1, \\qquad
        F_k(z) = z + g_k(z),\\ \\mathrm{Lip}(g_k) < 1

    ``input_dim`` comes first, so ``partial(residual_flow, num_blocks=2)`` is a valid
    ``init_transform_fn`` for Pyro's ``AutoNormalizingFlow``.

    Arguments:
        input_dim: the dimension ``D`` of the event.
        num_blocks: the number of i-ResNet blocks.
        hidden_dims: hidden sizes of each block's network.
        explicit: ``"forward"`` (variational posteriors: cheap sampling) or ``"inverse"``
            (density estimation: cheap scoring); applies to every block.
        actnorm: put an :class:`~pyro_invres.transforms.ActNorm` after each block.
        **kwargs: options of :func:`~pyro_invres.iresnet` (``lipschitz``, ``logdet``, ...).

    Example:
        >>> from functools import partial
        >>> from pyro.infer.autoguide import AutoNormalizingFlow
        >>> model = lambda: None
        >>> guide = AutoNormalizingFlow(model, partial(residual_flow, num_blocks=2))
        >>> len(residual_flow(3, num_blocks=2))
        4
    """
    if int(num_blocks) < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    parts = []
    for _ in range(int(num_blocks)):
        parts.append(iresnet(input_dim, hidden_dims, explicit=explicit, **kwargs))
        if actnorm:
            parts.append(ActNorm(input_dim))
    return ComposeTransformModule(parts)
