"""A dense conditioner with a linear skip path: ``net(x) + A x``, both starting at zero.

A coupling's log-scale is often close to linear in the conditioning coordinates: a funnel's
``x_j | v`` has log-scale ``v / 2``, a centred hierarchical model's ``theta_j`` has
``log tau``. A ReLU network with a zero last layer represents that only after its hidden
units have organised; the skip path ``A x`` learns it from the first step, and the
network models what is left.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .conditioners import make_conditioner

__all__ = ["SkipConditioner"]


class SkipConditioner(nn.Module):
    """``(raw, t) = mlp(x) + (A_s x, A_t x)``, zero at initialisation.

    Arguments:
        input_dim: ``D`` (the conditioner sees the masked vector, so input and output are
            both ``D``-dimensional).
        hidden_dims: hidden units of the dense network; ``[]`` keeps only the linear path
            (a log-linear scale: ``raw = A_s x``, ``t = A_t x``).
        activation: its activation.

    Example:
        >>> import torch
        >>> net = SkipConditioner(3, [8])
        >>> raw, shift = net(torch.randn(5, 3))
        >>> tuple(raw.shape), tuple(shift.shape), bool((raw == 0).all())
        ((5, 3), (5, 3), True)
    """

    def __init__(
        self, input_dim: int, hidden_dims: Sequence[int] | None, activation: str = "relu"
    ) -> None:
        super().__init__()
        dim = int(input_dim)
        self.mlp = (
            None
            if hidden_dims is not None and len(hidden_dims) == 0
            else make_conditioner(dim, dim, hidden_dims, num_outputs=2, activation=activation)
        )
        self.skip = nn.Linear(dim, 2 * dim, bias=False)
        nn.init.zeros_(self.skip.weight)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lin_raw, lin_shift = self.skip(x).chunk(2, dim=-1)
        if self.mlp is None:
            return lin_raw, lin_shift
        raw, shift = self.mlp(x)
        return raw + lin_raw, shift + lin_shift
