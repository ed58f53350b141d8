"""Volume-preserving rearrangements: space-to-depth downsampling and channel permutations.

Both blocks only move entries around, so their Jacobian is a permutation matrix and

.. math::

    \\log|\\det J| = 0 .

:class:`InvertibleDownsampling` (i-RevNet's invertible downsampling, Glow's *squeeze*)
trades resolution for channels,

.. math::

    y_{(c, i, j),\\, h, w} = x_{c,\\, f h + i,\\, f w + j},
    \\qquad (C, H, W) \\mapsto (C f^2, H / f, W / f),

so that a multi-scale flow can mix neighbouring pixels with channel-wise blocks.
:class:`ChannelPermutation` reorders the channels, ``y_c = x_{\\pi(c)}``, so that the next
coupling or 1x1 block sees the channels in a new order.

References:
    [1] Jacobsen, Smeulders & Oyallon, *i-RevNet: Deep Invertible Networks*, ICLR 2018.
        arXiv:1802.07088
    [2] Dinh, Sohl-Dickstein & Bengio, *Density estimation using Real NVP*, ICLR 2017.
        arXiv:1605.08803
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import InvertibleModule, as_event_shape

__all__ = [
    "ChannelPermutation",
    "InvertibleDownsampling",
    "channel_permutation",
    "invertible_downsampling",
]


def _generator(seed: int | None) -> torch.Generator | None:
    """A private CPU generator for ``seed``, or None to draw from torch's global one."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _permutation_sign(perm: Sequence[int]) -> int:
    """The sign ``(-1)^(n - cycles)`` of the permutation ``i -> perm[i]``."""
    seen = [False] * len(perm)
    cycles = 0
    for start in range(len(perm)):
        if not seen[start]:
            cycles += 1
            i = start
            while not seen[i]:
                seen[i] = True
                i = perm[i]
    return -1 if (len(perm) - cycles) % 2 else 1


def _check_stored_permutation(value: object, num_channels: int, name: str) -> None:
    """Refuse a loaded buffer that is not a permutation of ``range(num_channels)``."""
    if isinstance(value, Tensor) and value.is_meta:
        return  # no values to look at (a state dict built on the meta device)
    valid = (
        isinstance(value, Tensor)
        and value.shape == (num_channels,)
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
        and torch.equal(value.detach().cpu().long().sort().values, torch.arange(num_channels))
    )
    if not valid:
        shown = value.tolist() if isinstance(value, Tensor) and value.numel() <= 64 else value
        raise ValueError(
            f"{name} must be a permutation of range({num_channels}) (an integer tensor of "
            f"shape ({num_channels},)), got {shown!r:.300}"
        )


def _check_event_dim(event_dim: int) -> int:
    if isinstance(event_dim, bool) or event_dim not in (1, 2, 3):
        raise ValueError(f"event_dim must be 1 (vectors) to 3 (images), got {event_dim!r}")
    return int(event_dim)


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class InvertibleDownsampling(InvertibleModule):
    """Space-to-depth: ``(C, H, W) -> (C f^2, H/f, W/f)``, a permutation of the entries.

    Each ``f x f`` patch of a channel becomes ``f^2`` channels at one pixel; output channel
    ``c f^2 + i f + j`` holds offset ``(i, j)`` of input channel ``c``.

    Arguments:
        input_shape: the image shape ``(C, H, W)``; ``H`` and ``W`` divisible by ``factor``.
        factor: the downsampling factor ``f``.
        cache_size: 0 or 1.

    Cost and cache: a reshape and a transpose both ways (one copy), nothing to learn; the
    log-det is zero. ``sign`` is the parity of the permutation, which depends on the
    shape; it is computed on first use.

    Example:
        >>> import torch
        >>> down = InvertibleDownsampling((3, 8, 8), factor=2)
        >>> x = torch.randn(5, 3, 8, 8)
        >>> y = down(x)
        >>> y.shape, down.log_abs_det_jacobian(x, y).shape
        (torch.Size([5, 12, 4, 4]), torch.Size([5]))
        >>> torch.equal(down._inverse(y), x)
        True
    """

    def __init__(self, input_shape: Sequence[int], factor: int = 2, cache_size: int = 1) -> None:
        shape = as_event_shape(input_shape)
        if len(shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)!r}")
        factor = _check_positive("factor", factor)
        channels, height, width = shape
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be divisible by factor={factor}, got input_shape "
                f"{shape} (H={height}, W={width})"
            )
        output_shape = (channels * factor * factor, height // factor, width // factor)
        super().__init__(shape, cache_size=cache_size, output_shape=output_shape)
        self.factor = factor
        self._sign: int | None = None

    @property
    def sign(self) -> int:
        """The sign of the Jacobian determinant: the parity of the permutation."""
        if self._sign is None:
            index = torch.arange(math.prod(self.event_shape)).reshape(self.event_shape)
            self._sign = _permutation_sign(self._call(index).flatten().tolist())
        return self._sign

    def _call(self, x: Tensor) -> Tensor:
        batch = x.shape[:-3]
        c, h, w = self.event_shape
        f = self.factor
        x = x.reshape(*batch, c, h // f, f, w // f, f)
        n = len(batch)
        x = x.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3)
        return x.reshape(*batch, *self.output_shape)

    def _inverse(self, y: Tensor) -> Tensor:
        batch = y.shape[:-3]
        c, h, w = self.event_shape
        f = self.factor
        y = y.reshape(*batch, c, f, f, h // f, w // f)
        n = len(batch)
        y = y.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2)
        return y.reshape(*batch, *self.event_shape)

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-3])

    def extra_repr(self) -> str:
        return f"input_shape={self.event_shape}, factor={self.factor}"


class ChannelPermutation(InvertibleModule):
    """A fixed reordering of the channels, ``y_c = x_{perm[c]}``.

    Arguments:
        num_channels: channels ``C`` (or the dimension ``D`` of vectors).
        permutation: a permutation of ``range(C)``; default: a random one, drawn from
            ``seed``.
        event_dim: 1 for vectors ``(D,)``, 3 for images ``(C, H, W)`` of any size.
        seed: seed of the default permutation; None draws from torch's global generator,
            so stacked blocks differ and ``torch.manual_seed`` makes them reproducible.
        cache_size: 0 or 1.

    The permutation and its inverse are buffers: they move with ``.to(device)`` and are
    saved in the state dict. ``sign`` is the parity of the permutation for vectors; for
    images with an odd permutation it depends on ``H W`` and is left undefined.

    Cost and cache: one gather both ways; the log-det is zero.

    Example:
        >>> import torch
        >>> perm = ChannelPermutation(4, permutation=[3, 2, 1, 0], event_dim=1)
        >>> perm(torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
        tensor([[3., 2., 1., 0.]])
        >>> perm.sign
        1
    """

    permutation: Tensor
    inverse_permutation: Tensor

    def __init__(
        self,
        num_channels: int,
        permutation: Sequence[int] | Tensor | None = None,
        event_dim: int = 3,
        seed: int | None = None,
        cache_size: int = 1,
    ) -> None:
        num_channels = _check_positive("num_channels", num_channels)
        event_dim = _check_event_dim(event_dim)
        super().__init__((num_channels,) + (-1,) * (event_dim - 1), cache_size=cache_size)
        self.num_channels = num_channels
        if permutation is None:
            perm = torch.randperm(num_channels, generator=_generator(seed))
        else:
            perm = torch.as_tensor(permutation).detach().cpu()
            valid = (
                perm.shape == (num_channels,)
                and not perm.is_floating_point()
                and torch.equal(perm.sort().values, torch.arange(num_channels))
            )
            if not valid:
                raise ValueError(
                    f"permutation must be a permutation of range({num_channels}), "
                    f"got {permutation!r}"
                )
        perm = perm.long()
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # load_state_dict copies any integer tensor of the right shape into the buffers: a
        # repeated index would then silently drop channels (a log-det of 0 for a map that
        # is not even invertible), so the stored pair is checked before it is copied
        perm = state_dict.get(prefix + "permutation")
        inverse = state_dict.get(prefix + "inverse_permutation")
        if perm is not None:
            _check_stored_permutation(perm, self.num_channels, prefix + "permutation")
        if inverse is not None:
            _check_stored_permutation(inverse, self.num_channels, prefix + "inverse_permutation")
        if perm is not None and inverse is not None:
            if not torch.equal(inverse.cpu().long(), torch.argsort(perm.cpu().long())):
                raise ValueError(
                    f"{prefix}inverse_permutation must be the inverse of {prefix}permutation "
                    f"{perm.tolist()!s:.300}, got {inverse.tolist()!s:.300}"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def sign(self) -> int:
        """The sign of the Jacobian determinant, where it does not depend on the image size."""
        parity = _permutation_sign(self.permutation.tolist())
        if parity == 1 or self.event_dim == 1:
            return parity
        raise NotImplementedError(
            "an odd channel permutation of images has determinant (-1)^(H W): its sign "
            "depends on the image size"
        )

    def _call(self, x: Tensor) -> Tensor:
        return x.index_select(-self.event_dim, self.permutation)

    def _inverse(self, y: Tensor) -> Tensor:
        return y.index_select(-self.event_dim, self.inverse_permutation)

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[: x.dim() - self.event_dim])

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, event_dim={self.event_dim}"


def invertible_downsampling(input_shape: Sequence[int], factor: int = 2) -> InvertibleDownsampling:
    """Build an :class:`InvertibleDownsampling` for images of shape ``(C, H, W)``.

    Example:
        >>> invertible_downsampling((3, 8, 8)).output_shape
        (12, 4, 4)
    """
    return InvertibleDownsampling(input_shape, factor=factor)


def channel_permutation(
    input_dim: int | Sequence[int], *, seed: int | None = None
) -> ChannelPermutation:
    """Build a random :class:`ChannelPermutation` for vectors (an int) or ``(C, H, W)``.

    Example:
        >>> channel_permutation((3, 8, 8), seed=0).event_dim
        3
    """
    shape = as_event_shape(input_dim)
    return ChannelPermutation(shape[0], event_dim=len(shape), seed=seed)
