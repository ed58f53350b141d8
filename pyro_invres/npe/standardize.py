"""Z-scoring kept with a model: a per-coordinate location and scale in buffers.

Simulated parameters and observations come in any units; networks train best on values of
order one. :class:`Standardization` records the mean and standard deviation of the
training data (``z = (v - loc) / scale``) in buffers, so they are saved in the state dict
and travel with the model to any device, and the density stays one of the original
values: the affine map's log-determinant ``-sum(log scale)`` is part of it.

Example:
    >>> import torch
    >>> norm = Standardization(2)
    >>> _ = norm.fit(torch.tensor([[0.0, 10.0], [2.0, 30.0]]))
    >>> norm.loc, norm.scale
    (tensor([ 1., 20.]), tensor([ 1., 10.]))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions.transforms import AffineTransform

__all__ = ["Standardization"]


class Standardization(nn.Module):
    """A per-coordinate location and scale, fitted to data and saved in the state dict.

    ``scale`` is the standard deviation of the data (``correction=0``); a coordinate with no
    spread (constant up to a few float spacings) keeps scale 1 and is only centred, so it
    never divides by zero. Until :meth:`fit` runs, ``loc = 0`` and ``scale = 1`` (the
    identity) and :attr:`fitted` is ``False``.

    Arguments:
        dim: the number of coordinates.

    Example:
        >>> import torch
        >>> norm = Standardization(3)
        >>> data = 5.0 + 2.0 * torch.randn(1000, 3)
        >>> z = norm.fit(data).standardize(data)
        >>> std = z.std(0, correction=0)
        >>> bool(z.mean(0).abs().max() < 1e-5), bool((std - 1).abs().max() < 1e-5)
        (True, True)
        >>> sorted(norm.state_dict())
        ['fitted', 'loc', 'scale']
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if isinstance(dim, bool) or int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.register_buffer("loc", torch.zeros(self.dim))
        self.register_buffer("scale", torch.ones(self.dim))
        self.register_buffer("fitted", torch.tensor(False))

    def _check(self, data: Tensor, what: str) -> None:
        if not isinstance(data, Tensor) or data.dim() < 1 or data.shape[-1] != self.dim:
            shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(f"expected {what} of shape (..., {self.dim}), got {shape}")

    @torch.no_grad()
    def fit(self, data: Tensor) -> Standardization:
        """Set ``loc`` and ``scale`` to the mean and standard deviation of ``data`` ``(N, dim)``.

        Statistics are computed in float64 and stored in the buffers' dtype; non-finite
        data are refused. Returns ``self``.
        """
        self._check(data, "data")
        rows = data.detach().reshape(-1, self.dim).double()
        if len(rows) < 2:
            raise ValueError(f"need at least two rows to standardise, got {len(rows)}")
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("cannot standardise non-finite data (nan or inf)")
        mean = rows.mean(0)
        std = (rows - mean).square().mean(0).sqrt()
        # a spread within a few float spacings of the values is no spread
        eps = torch.finfo(data.dtype).eps
        flat = std <= 4 * eps * rows.abs().amax(0).clamp_min(1.0)
        std = torch.where(flat, torch.ones_like(std), std)
        self.loc.copy_(mean.to(self.loc))
        self.scale.copy_(std.to(self.scale))
        self.fitted.fill_(True)
        return self

    def standardize(self, values: Tensor) -> Tensor:
        """``(values - loc) / scale``, for ``values`` of shape ``(..., dim)``."""
        self._check(values, "values")
        return (values - self.loc) / self.scale

    def transform(self) -> AffineTransform:
        """The map from standardised to original values, ``z -> loc + scale z`` (event dim 1).

        Example:
            >>> import torch
            >>> t = Standardization(2).transform()
            >>> t(torch.ones(2)), t.log_abs_det_jacobian(torch.ones(2), torch.ones(2))
            (tensor([1., 1.]), tensor(0.))
        """
        return AffineTransform(self.loc, self.scale, event_dim=1, cache_size=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, fitted={bool(self.fitted)}"
