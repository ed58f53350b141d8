"""A small masked autoencoder (MADE): an autoregressive shift and log-scale in one pass.

.. math::

    (a_i, t_i) = \\bigl(W_o\\, \\mathrm{relu}(W_h x + b_h) + b_o + A x\\bigr)_i ,
    \\qquad a_i, t_i \\text{ depend on } x_{\\pi(1)}, \\ldots \\text{ only through }
    \\{x_j : \\pi^{-1}(j) < \\pi^{-1}(i)\\},

with every weight matrix multiplied by a fixed 0/1 mask built from degrees (Germain et al.
2015): input ``j`` has degree ``rank(j)``, hidden unit ``k`` a degree ``m_k`` in
``[0, D - 2]``, and a weight is kept when it cannot carry ``x_j`` to an output of equal or
lower rank. The linear skip path ``A x`` (strictly lower triangular in rank order) gives
a log-scale linear in the earlier coordinates from the first step (a funnel's
``x_j | v ~ N(0, e^{v})``); the hidden layer models what is left. Both output layers
start at zero, so an affine autoregressive layer built on it starts as the identity.

References:
    [1] Germain, Gregor, Murray & Larochelle, *MADE: Masked Autoencoder for Distribution
        Estimation*, ICML 2015. arXiv:1502.03509
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MADE", "made_masks"]


def made_masks(order: Tensor, hidden_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """The input-to-hidden, hidden-to-output and skip masks for a rank ``order``.

    Arguments:
        order: ``order[j]`` is the rank of coordinate ``j`` (a permutation of ``0..D-1``).
        hidden_dim: hidden units; their degrees cycle through ``0..D-2``.

    Returns:
        masks shaped ``(H, D)``, ``(D, H)`` and ``(D, D)`` (rows: outputs).

    Example:
        >>> _, _, skip = made_masks(torch.tensor([0, 1, 2]), 4)
        >>> skip.int().tolist()
        [[0, 0, 0], [1, 0, 0], [1, 1, 0]]
    """
    rank = torch.as_tensor(order).long()
    dim = rank.numel()
    if sorted(rank.tolist()) != list(range(dim)):
        raise ValueError(f"order must be a permutation of 0..{dim - 1}, got {rank.tolist()}")
    degrees = torch.arange(int(hidden_dim)) % max(dim - 1, 1)
    hidden = (degrees[:, None] >= rank[None, :]).float()
    out = (rank[:, None] > degrees[None, :]).float()
    skip = (rank[:, None] > rank[None, :]).float()
    return hidden, out, skip


class MADE(nn.Module):
    """``x -> (raw, shift)``, each ``(..., D)``, output ``i`` depending only on earlier ranks.

    Arguments:
        input_dim: ``D``.
        hidden_dims: at most one hidden size (``[]``: the linear skip path alone).
        order: ``order[j]`` is coordinate ``j``'s rank (default ``0..D-1``).

    Example:
        >>> net = MADE(3, [8])
        >>> x = torch.randn(2, 3, requires_grad=True)
        >>> raw, shift = net(x)
        >>> bool((raw == 0).all()), tuple(shift.shape)   # zero at initialisation
        (True, (2, 3))
    """

    def __init__(
        self, input_dim: int, hidden_dims: Sequence[int] = (), order: Tensor | None = None
    ) -> None:
        super().__init__()
        dim = int(input_dim)
        if dim < 1:
            raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
        hidden_dims = list(hidden_dims)
        if len(hidden_dims) > 1 or any(int(h) < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be [] or [H] with H >= 1, got {hidden_dims}")
        order = torch.arange(dim) if order is None else torch.as_tensor(order)
        if order.shape != (dim,):
            raise ValueError(f"order must have shape ({dim},), got {tuple(order.shape)}")
        width = int(hidden_dims[0]) if hidden_dims else 1
        hidden, out, skip = made_masks(order, width)
        self.input_dim = dim
        self.register_buffer("order", order.long().clone())
        self.width = width if hidden_dims else 0
        # each layer is one parameter tensor [weights | bias] (few tensors: the optimizer's
        # per-tensor work outweighs the arithmetic at a posterior's size)
        out_mask = torch.cat([skip, out], dim=1) if hidden_dims else skip
        self.register_buffer("out_mask", torch.cat([out_mask, out_mask]))
        self.out = nn.Parameter(torch.zeros(2 * dim, dim + self.width + 1))
        if hidden_dims:
            self.register_buffer("hidden_mask", hidden)
            bound = 1 / dim**0.5  # nn.Linear's default initialisation
            self.hidden = nn.Parameter(torch.empty(width, dim + 1).uniform_(-bound, bound))
        else:
            self.hidden = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dim = self.input_dim
        if self.hidden is not None:
            pre = F.linear(x, self.hidden[:, :dim] * self.hidden_mask, self.hidden[:, dim])
            x = torch.cat([x, torch.relu(pre)], dim=-1)
        # the skip path and the output layer in one product
        y = F.linear(x, self.out[:, :-1] * self.out_mask, self.out[:, -1])
        raw, shift = y.chunk(2, dim=-1)
        return raw, shift
