"""Activation normalisation: a per-channel affine map initialised from data (Glow).

.. math::

    y = x \\odot e^{s} + b, \\qquad \\log|\\det J| = N_{\\text{pos}} \\sum_c s_c ,

with one ``(s_c, b_c)`` per channel (per coordinate for vectors) and ``N_pos`` the number
of spatial positions (1 for vectors). The first training-mode call on a batch of at least
two samples sets ``s, b`` so that the data side is standardised: the output of ``_call``
when the forward direction sees data first (a guide), the output of ``_inverse`` when the
inverse does (density estimation). A batch of one (Pyro's plate-nesting probe) leaves the
layer as the identity rather than dividing by a zero standard deviation. Under
``torch.distributed`` the statistics are all-reduced so every rank initialises alike.

References:
    [1] Kingma & Dhariwal, *Glow: Generative Flow with Invertible 1x1 Convolutions*,
        NeurIPS 2018. arXiv:1807.03039
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as pdist
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from .base import InvertibleModule

__all__ = ["ActNorm", "actnorm"]


class ActNorm(InvertibleModule):
    """Per-channel scale and shift with data-dependent initialisation.

    Arguments:
        num_features: channels ``C`` (or the dimension ``D`` of vectors).
        event_dim: 1 for vectors ``(D,)``, 3 for images ``(C, H, W)`` of any size.
        eps: floor on the standard deviation used at initialisation.
        cache_size: 0 or 1.

    Cost and cache: closed-form both ways, one multiply-add; nothing to iterate.

    Example:
        >>> import torch
        >>> norm = ActNorm(3)
        >>> y = norm(5.0 + 2.0 * torch.randn(100, 3))   # initialises on this batch
        >>> std = y.std(0, correction=0)
        >>> bool(y.mean(0).abs().max() < 1e-5), bool((std - 1).abs().max() < 1e-4)
        (True, True)
    """

    sign = 1

    def __init__(
        self, num_features: int, event_dim: int = 1, eps: float = 1e-6, cache_size: int = 1
    ) -> None:
        if event_dim not in (1, 2, 3):
            raise ValueError(f"event_dim must be 1 (vectors), 2 or 3 (images), got {event_dim}")
        if int(num_features) < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        super().__init__((int(num_features),) + (-1,) * (event_dim - 1), cache_size=cache_size)
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.log_scale = nn.Parameter(torch.zeros(self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_features))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _shaped(self, p: Tensor) -> Tensor:
        return p.view(self.num_features, *([1] * (self.event_dim - 1)))

    @torch.no_grad()
    def _initialize(self, data: Tensor, data_is_output: bool) -> None:
        if not self.training or bool(self.initialized):
            return
        n_batch = data.dim() - self.event_dim
        # channels first, everything else pooled; statistics in float64 (x * x overflows
        # float32 above 1.8e19) and in two passes (E[x^2] - E[x]^2 cancels for data far
        # from zero: float32 data at 1e4 +- 1 gave a standard deviation of 0)
        acc = torch.float64 if data.device.type != "mps" else torch.float32
        flat = data.movedim(n_batch, 0).reshape(self.num_features, -1).to(acc)
        total = flat.sum(1)
        samples = torch.tensor(
            [float(math.prod(data.shape[:n_batch])), float(flat.shape[1])],
            dtype=acc,
            device=data.device,
        )
        distributed = torch_dist.is_available() and torch_dist.is_initialized()
        if distributed:
            # every rank joins the collectives and the decision is taken on the pooled
            # counts, so a rank with a batch of one cannot desynchronise the others
            torch_dist.all_reduce(total)
            torch_dist.all_reduce(samples)
        if samples[0] < 2:
            return
        if torch.jit.is_tracing():
            raise RuntimeError(
                "ActNorm: initialise it (one training-mode call on a batch of at least two) "
                "before tracing; a trace would freeze the initialisation branch"
            )
        count = samples[1]
        mean = total / count
        spread = (flat - mean[:, None]).square().sum(1)
        if distributed:
            torch_dist.all_reduce(spread)
        std = (spread / count).sqrt().clamp_min(self.eps)
        finite = torch.isfinite(mean).all() & torch.isfinite(std).all()
        if pdist.is_validation_enabled() and not bool(finite):
            raise ValueError(
                "ActNorm: cannot initialise from data this large "
                f"(max |x| = {data.abs().max().item():.3g}); rescale the data"
            )
        mean, std = mean.to(self.bias.dtype), std.to(self.bias.dtype)
        if data_is_output:
            # data arrives at _inverse: x = (y - b) e^{-s} standardised
            self.log_scale.copy_(std.log())
            self.bias.copy_(mean)
        else:
            # data arrives at _call: y = x e^{s} + b standardised
            self.log_scale.copy_(-std.log())
            self.bias.copy_(-mean / std)
        self.initialized.fill_(True)

    def _call(self, x: Tensor) -> Tensor:
        self._initialize(x, data_is_output=False)
        return x * self._shaped(self.log_scale).exp() + self._shaped(self.bias)

    def _inverse(self, y: Tensor) -> Tensor:
        self._initialize(y, data_is_output=True)
        return (y - self._shaped(self.bias)) * self._shaped(-self.log_scale).exp()

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor, memo: object) -> Tensor:
        n_batch = x.dim() - self.event_dim
        positions = math.prod(x.shape[n_batch + 1 :])
        value = self.log_scale.sum() * positions
        return value.expand(x.shape[:n_batch])

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, event_dim={self.event_dim}"


def actnorm(input_dim: int | Sequence[int]) -> ActNorm:
    """Build an :class:`ActNorm` for vectors (``input_dim`` an int) or images ``(C, H, W)``.

    Example:
        >>> actnorm((3, 8, 8)).event_dim
        3
    """
    if isinstance(input_dim, int):
        return ActNorm(input_dim, event_dim=1)
    shape = tuple(input_dim)
    return ActNorm(shape[0], event_dim=len(shape))
