"""A learned full-rank affine map with a lower-triangular matrix: a learned Gaussian base.

.. math::

    y = \\mu + L x, \\qquad L = \\operatorname{tril}_{-1}(A) + \\operatorname{diag}(e^{s}),
    \\qquad \\log|\\det J| = \\textstyle\\sum_i s_i .

Applied to a standard normal ``x`` it gives ``N(mu, L L^T)``: the full-rank Gaussian of
Pyro's ``AutoMultivariateNormal``. Put first in a flow (next to the base) it lets the
rest of the flow model only what a Gaussian cannot: correlations and scales are learned
here at the cost of one triangular product, and every later block starts from a
standardised posterior. The inverse is one triangular solve.

References:
    [1] Kucukelbir et al., *Automatic Differentiation Variational Inference*, JMLR 2017
        (the full-rank Gaussian family). arXiv:1603.00788
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import InvertibleModule

__all__ = ["TriangularAffine", "triangular_affine"]


class TriangularAffine(InvertibleModule):
    """``y = loc + L x`` with ``L`` lower triangular and a positive (exponential) diagonal.

    Arguments:
        input_dim: the dimension ``D`` of the vector event.
        init_scale: the starting diagonal of ``L`` (``L = init_scale * I``); the starting
            ``loc`` is zero (set it with :meth:`set_loc`).
        cache_size: 0 or 1.

    Cost: one ``D x D`` triangular product forward, one triangular solve inverse; the
    log-det is a sum and does not depend on ``x``.

    Example:
        >>> import torch
        >>> t = triangular_affine(3, init_scale=0.5)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(t.inverse(t(x), cached=False), x, atol=1e-6)
        True
        >>> round(t.log_abs_det_jacobian(x, t(x))[0].item(), 4) == round(3 * math.log(0.5), 4)
        True
    """

    sign = +1

    def __init__(self, input_dim: int, init_scale: float = 1.0, cache_size: int = 1) -> None:
        dim = int(input_dim)
        if dim < 1:
            raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale}")
        super().__init__((dim,), cache_size=cache_size)
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_diag = nn.Parameter(torch.full((dim,), math.log(init_scale)))
        self.lower = nn.Parameter(torch.zeros(dim, dim))

    def set_loc(self, loc: Tensor) -> None:
        """Start ``loc`` at ``loc`` (e.g. an autoguide's initial latent)."""
        if loc.shape != self.loc.shape:
            raise ValueError(f"loc must have shape {tuple(self.loc.shape)}, got {tuple(loc.shape)}")
        with torch.no_grad():
            self.loc.copy_(loc)

    def scale_tril(self) -> Tensor:
        """``L``: the strict lower triangle of ``lower`` plus ``diag(exp(log_diag))``."""
        return self.lower.tril(-1) + torch.diag_embed(self.log_diag.exp())

    def _ladj(self, x: Tensor) -> Tensor:
        return self.log_diag.sum().expand(x.shape[:-1])

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.loc + x @ self.scale_tril().T, self._ladj(x)

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        diff = (y - self.loc).unsqueeze(-1)
        tril = self.scale_tril().expand(*diff.shape[:-2], *self.lower.shape)
        x = torch.linalg.solve_triangular(tril, diff, upper=False).squeeze(-1)
        return x, self._ladj(x)

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self._ladj(x)


def triangular_affine(input_dim: int, init_scale: float = 1.0) -> TriangularAffine:
    """Build a :class:`TriangularAffine` (``L = init_scale * I``, ``loc = 0`` to start).

    Example:
        >>> triangular_affine(2).scale_tril().tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    return TriangularAffine(input_dim, init_scale=init_scale)
