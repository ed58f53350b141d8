"""A masked MLP (MADE) with any depth, several outputs per coordinate and a context.

.. math::

    h_1 = \\mathrm{relu}\\bigl((M_1 \\odot W_1) x + V c + b_1\\bigr), \\quad
    h_{l+1} = \\mathrm{relu}\\bigl((M_{l+1} \\odot W_{l+1}) h_l + b_{l+1}\\bigr), \\quad
    \\theta = (M_o \\odot W_o) h_L + b_o ,

with ``theta`` shaped ``(..., D, P)``: ``P`` parameters of each coordinate ``x_i``, which
depend on ``x`` only through the coordinates of lower rank (Germain et al. 2015) and on
the context ``c`` without restriction. Hidden unit ``k`` has a degree ``m_k`` in
``0..D-1``; it sees inputs of rank ``< m_k`` and feeds hidden units of degree
``>= m_k`` and outputs of rank ``>= m_k``. Units of degree 0 see the context alone, so
the first coordinate's parameters are a nonlinear function of the context (a context that
entered only through a linear skip could not bend a posterior's location or shape with
the observation).

References:
    [1] Germain, Gregor, Murray & Larochelle, *MADE: Masked Autoencoder for Distribution
        Estimation*, ICML 2015. arXiv:1502.03509
    [2] Papamakarios, Pavlakou & Murray, *Masked Autoregressive Flow for Density
        Estimation*, NeurIPS 2017 (the conditional MADE). arXiv:1705.07057
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MaskedMLP"]


class MaskedMLP(nn.Module):
    """``(x, context) -> theta`` shaped ``(..., D, P)``, autoregressive in ``x``.

    Arguments:
        input_dim: ``D``.
        params_per_dim: ``P``, outputs per coordinate.
        hidden_dims: hidden sizes (at least one layer).
        context_dim: ``C`` (0: no context).
        order: ``order[j]`` is coordinate ``j``'s rank (default ``0..D-1``).
        out_bias: the output bias of every coordinate at initialisation, ``(P,)``; the
            output weights start at zero, so ``theta`` starts at this value everywhere (a
            flow layer built on it starts as the map this bias encodes, e.g. the identity).

    Example:
        >>> net = MaskedMLP(3, 2, [16], context_dim=4)
        >>> x = torch.randn(5, 3, requires_grad=True)
        >>> theta = net(x, context=torch.randn(5, 4))
        >>> tuple(theta.shape)
        (5, 3, 2)
        >>> _ = net.layers[-1].weight.data.normal_()   # as after training
        >>> theta = net(x, context=torch.randn(5, 4))
        >>> g = torch.autograd.grad(theta[:, 0].sum(), x)[0]
        >>> bool((g == 0).all())   # coordinate 0 never sees x
        True
    """

    def __init__(
        self,
        input_dim: int,
        params_per_dim: int,
        hidden_dims: Sequence[int],
        context_dim: int = 0,
        order: Tensor | Sequence[int] | None = None,
        out_bias: Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        dim, num_params, ctx = int(input_dim), int(params_per_dim), int(context_dim)
        hidden_dims = [int(h) for h in hidden_dims]
        if dim < 1 or num_params < 1 or ctx < 0:
            raise ValueError(
                "input_dim and params_per_dim must be >= 1 and context_dim >= 0, got "
                f"{input_dim!r}, {params_per_dim!r}, {context_dim!r}"
            )
        if not hidden_dims or any(h < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims must hold at least one size >= 1, got {hidden_dims}")
        rank = torch.arange(dim) if order is None else torch.as_tensor(order).long()
        if sorted(rank.tolist()) != list(range(dim)):
            raise ValueError(f"order must be a permutation of 0..{dim - 1}, got {rank.tolist()}")
        self.input_dim, self.params_per_dim, self.context_dim = dim, num_params, ctx
        self.register_buffer("order", rank.clone())
        sizes = [dim, *hidden_dims]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.layers.append(nn.Linear(hidden_dims[-1], dim * num_params))
        self.context = nn.Linear(ctx, hidden_dims[0], bias=False) if ctx else None
        degrees = [rank] + [torch.arange(h) % dim for h in hidden_dims]
        masks = [
            (d_out[:, None] > d_in[None, :]) if i == 0 else (d_out[:, None] >= d_in[None, :])
            for i, (d_in, d_out) in enumerate(zip(degrees, degrees[1:]))
        ]
        # outputs of coordinate i (rank r_i) read hidden units of degree <= r_i
        out = (rank[:, None] >= degrees[-1][None, :]).repeat_interleave(num_params, dim=0)
        for i, mask in enumerate([*masks, out]):
            self.register_buffer(f"mask{i}", mask.float())
        last = self.layers[-1]
        with torch.no_grad():
            last.weight.zero_()
            if out_bias is None:
                last.bias.zero_()
            else:
                bias = torch.as_tensor(out_bias, dtype=last.bias.dtype)
                if bias.shape != (num_params,):
                    raise ValueError(
                        f"out_bias must have shape ({num_params},), got {tuple(bias.shape)}"
                    )
                last.bias.copy_(bias.repeat(dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if (context is None) != (self.context is None):
            raise ValueError(
                f"MaskedMLP: expected {'a' if self.context is not None else 'no'} context "
                f"(context_dim={self.context_dim}), got "
                f"{'none' if context is None else tuple(context.shape)}"
            )
        last = len(self.layers) - 1
        h = x
        for i, layer in enumerate(self.layers):
            h = F.linear(h, layer.weight * getattr(self, f"mask{i}"), layer.bias)
            if i == 0 and self.context is not None:
                h = h + self.context(context)  # broadcasts a context batch over draws
            if i < last:
                h = torch.relu(h)
        return h.unflatten(-1, (self.input_dim, self.params_per_dim))

    def extra_repr(self) -> str:
        hidden = [layer.out_features for layer in self.layers[:-1]]
        return (
            f"input_dim={self.input_dim}, params_per_dim={self.params_per_dim}, "
            f"hidden_dims={hidden}, context_dim={self.context_dim}"
        )
