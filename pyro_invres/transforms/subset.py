"""Apply a transform to the first channels only: multi-scale "factoring out" in one tensor.

Glow, RealNVP and Residual Flows factor out half of the channels at each scale and give
them to the prior. Pyro's ``TransformedDistribution`` moves a single tensor, so here the
factored-out channels stay in the tensor and every later block acts on a leading subset
of channels only; the rest pass through unchanged and meet the standard normal base.
This is the same density as factoring out with a standard normal prior (RealNVP); Glow's
learned conditional prior on the factored channels is not reproduced.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Transform

from .base import InvertibleModule, LazyLadj

__all__ = ["ChannelSubset"]


class ChannelSubset(InvertibleModule):
    """``(x_a, x_b) -> (t(x_a), x_b)`` with ``x_a`` the first ``k`` channels.

    .. math::

        \\log|\\det J| = \\log|\\det J_t(x_a)|

    Arguments:
        transform: a transform over events ``(k, H, W)`` (or ``(k,)`` for vectors).
        num_channels: the total number of channels ``C >= k``.
        cache_size: 0 or 1.

    Example:
        >>> import torch
        >>> from pyro_invres.transforms.coupling import additive_coupling
        >>> t = ChannelSubset(additive_coupling((2, 4, 4)), num_channels=6)
        >>> t(torch.randn(3, 6, 4, 4)).shape
        torch.Size([3, 6, 4, 4])
    """

    def __init__(self, transform: Transform, num_channels: int, cache_size: int = 1) -> None:
        inner = getattr(transform, "event_shape", None)
        if inner is None:
            raise ValueError("ChannelSubset needs a transform with an event_shape attribute")
        inner = tuple(inner)
        if num_channels < inner[0]:
            raise ValueError(
                f"num_channels={num_channels} is smaller than the transform's {inner[0]}"
            )
        super().__init__((int(num_channels), *inner[1:]), cache_size=cache_size)
        self.transform = transform
        self.active = inner[0]

    @property
    def sign(self) -> int:
        return self.transform.sign

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        axis = x.dim() - self.event_dim
        return x.narrow(axis, 0, self.active), x.narrow(
            axis, self.active, x.shape[axis] - self.active
        )

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, LazyLadj]:
        xa, xb = self._split(x)
        ya = self.transform(xa)
        # through the inner transform's own (public) cache: its log-det only when asked
        return self._join(ya, xb), lambda: self.transform.log_abs_det_jacobian(xa, ya)

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, LazyLadj]:
        ya, yb = self._split(y)
        xa = self.transform.inv(ya)
        return self._join(xa, yb), lambda: self.transform.log_abs_det_jacobian(xa, ya)

    def _join(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], dim=a.dim() - self.event_dim)

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.transform.log_abs_det_jacobian(self._split(x)[0], self._split(y)[0])

    def extra_repr(self) -> str:
        return f"active={self.active}, num_channels={self.event_shape[0]}"
