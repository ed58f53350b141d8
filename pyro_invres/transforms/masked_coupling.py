"""Affine coupling over an arbitrary binary mask, and masks that couple every pair.

.. math::

    y = m \\odot x + (1 - m) \\odot \\bigl(x \\odot e^{s(m \\odot x)} + t(m \\odot x)\\bigr),
    \\qquad s = b \\tanh(\\mathrm{raw} / b), \\qquad
    \\log|\\det J| = \\textstyle\\sum_i (1 - m_i)\\, s_i ,

RealNVP's masked form (Dinh et al. 2017): the coordinates with ``m_i = 1`` pass unchanged
and condition a scale and shift of the others. Unlike a split in the middle it needs no
permutation between layers, and the masks can be chosen so that every coordinate scales
every other somewhere in the stack: :func:`pairwise_masks` takes one mask per bit of the
coordinate index and its complement (``2 ceil(log2 D)`` masks), and any two indices
``i != j`` differ in some bit, so ``j`` is rescaled by a function of ``x_i`` in one of
them. That is the dependence of a funnel, ``x_j | v ~ N(0, e^{v})``, or of a centred
hierarchical model, ``theta_j = mu + tau eta_j``, which a residual block alone cannot
express: its Jacobian's singular values stay in ``[1 - c, 1 + c]``.

References:
    [1] Dinh, Sohl-Dickstein & Bengio, *Density estimation using Real NVP*, ICLR 2017.
        arXiv:1605.08803
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..nn.skip_conditioner import SkipConditioner
from .base import InvertibleModule
from .coupling import bounded_log_scale

__all__ = ["MaskedAffineCoupling", "masked_affine_coupling", "pairwise_masks"]


def pairwise_masks(input_dim: int) -> list[Tensor]:
    """Binary masks such that every ordered pair ``(i, j)``, ``i != j``, has a mask with
    ``m_i = 1`` (conditioning) and ``m_j = 0`` (rescaled).

    Mask ``2b`` holds the indices whose bit ``b`` is 1, mask ``2b + 1`` its complement.

    Example:
        >>> [m.int().tolist() for m in pairwise_masks(3)]
        [[0, 1, 0], [1, 0, 1], [0, 0, 1], [1, 1, 0]]
        >>> pairwise_masks(1)
        []
    """
    dim = int(input_dim)
    if dim < 1:
        raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
    index = torch.arange(dim)
    masks: list[Tensor] = []
    for bit in range(math.ceil(math.log2(dim)) if dim > 1 else 0):
        ones = ((index >> bit) & 1).bool()
        masks += [ones.float(), (~ones).float()]
    return masks


class MaskedAffineCoupling(InvertibleModule):
    """Affine coupling of the coordinates where ``mask == 0`` on those where it is 1.

    Arguments:
        nn: the conditioner, mapping ``m * x`` (shape ``(..., D)``) to a pair
            ``(raw, t)`` of tensors shaped ``(..., D)``; entries where ``m = 1`` are
            ignored.
        mask: a 0/1 tensor of shape ``(D,)`` with at least one of each.
        log_scale_bound: ``b``; each coordinate is scaled by a factor in ``(e^-b, e^b)``.
        cache_size: 0 or 1.

    Cost and cache: one pass of the conditioner each way (the conditioning coordinates are
    the same on both sides); the log-det is a sum of the kept log-scale.

    Example:
        >>> import torch
        >>> block = masked_affine_coupling(4, [16], pairwise_masks(4)[0])
        >>> x = torch.randn(3, 4)
        >>> bool((block(x) == x).all())   # the identity at initialisation
        True
    """

    sign = +1

    def __init__(
        self, nn: nn.Module, mask: Tensor, log_scale_bound: float = 5.0, cache_size: int = 1
    ) -> None:
        mask = torch.as_tensor(mask, dtype=torch.get_default_dtype())
        if mask.dim() != 1 or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask must be a 0/1 vector, got {mask.tolist()}")
        if not (0 < float(mask.sum()) < mask.numel()):
            raise ValueError(f"mask must hold both zeros and ones, got {mask.int().tolist()}")
        if not (math.isfinite(log_scale_bound) and log_scale_bound > 0):
            raise ValueError(f"log_scale_bound must be positive and finite, got {log_scale_bound}")
        super().__init__((mask.numel(),), cache_size=cache_size)
        self.nn = nn
        self.log_scale_bound = float(log_scale_bound)
        self.register_buffer("mask", mask)

    def _scale_shift(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = self.nn(kept)
        free = 1 - self.mask.to(kept.dtype)
        return bounded_log_scale(raw, self.log_scale_bound) * free, shift * free

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(x * self.mask)
        return x * s.exp() + t, s.sum(-1)

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(y * self.mask)
        return (y - t) * torch.exp(-s), s.sum(-1)

    def extra_repr(self) -> str:
        return f"mask={self.mask.int().tolist()}, log_scale_bound={self.log_scale_bound}"


def masked_affine_coupling(
    input_dim: int,
    hidden_dims: Sequence[int] | None,
    mask: Tensor,
    *,
    log_scale_bound: float = 5.0,
    activation: str = "relu",
) -> MaskedAffineCoupling:
    """Build a :class:`MaskedAffineCoupling` with a zero-initialised
    :class:`~pyro_invres.nn.skip_conditioner.SkipConditioner` (dense network plus a linear
    skip path).

    Arguments:
        input_dim: ``D``.
        hidden_dims: hidden units of the conditioner (default
            :func:`~pyro_invres.nn.conditioners.default_hidden_dims`).
        mask: the 0/1 conditioning mask, shape ``(D,)`` (see :func:`pairwise_masks`).
        log_scale_bound: the bound ``b`` on the log-scale.
        activation: the conditioner's activation.

    Example:
        >>> import torch
        >>> block = masked_affine_coupling(3, [8], torch.tensor([1.0, 0.0, 0.0]))
        >>> block.log_abs_det_jacobian(torch.zeros(2, 3), torch.zeros(2, 3)).tolist()
        [0.0, 0.0]
    """
    net = SkipConditioner(int(input_dim), hidden_dims, activation=activation)
    return MaskedAffineCoupling(net, mask, log_scale_bound=log_scale_bound)
