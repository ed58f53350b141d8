"""Ready-made stacks of blocks, each a :class:`~pyro.distributions.ComposeTransformModule`.

Image presets are described, as in their papers, from data to latent (squeeze, then steps,
then factor out); the returned stack is its exact inverse, so that Pyro's forward maps a
base sample to an image. Use ``flow.inverse_shape(shape)`` (or :func:`base_shape`) for the
base distribution's event shape: ``Normal(0, 1).expand(base_shape).to_event(3)``.

Multi-scale factoring-out is done within one tensor (see
:class:`~pyro_invres.transforms.subset.ChannelSubset`): deeper scales act on a leading
subset of channels and the others go to the standard normal base unchanged, which is
RealNVP's multi-scale density; every dimension stays in the one tensor that Pyro's
``TransformedDistribution`` moves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule

from .transforms.actnorm import ActNorm
from .transforms.conv1x1 import InvertibleConv1x1
from .transforms.coupling import affine_coupling
from .transforms.downsample import ChannelPermutation, InvertibleDownsampling
from .transforms.inverse import Inverse
from .transforms.iresnet import iresnet
from .transforms.revnet import revnet_block
from .transforms.subset import ChannelSubset

__all__ = ["base_shape", "glow", "irevnet", "residual_flow"]

Step = Callable[[tuple[int, int, int]], list[TransformModule]]


def base_shape(flow: ComposeTransformModule, shape: Sequence[int]) -> torch.Size:
    """The base distribution's event shape for a flow producing events of ``shape``.

    Example:
        >>> flow = residual_flow((1, 8, 8), num_blocks=1, hidden_dims=[8], num_scales=1)
        >>> base_shape(flow, (1, 8, 8))   # one squeeze: 4x the channels, half the size
        torch.Size([4, 4, 4])
        >>> base_shape(residual_flow(3, num_blocks=1), [3])
        torch.Size([3])
    """
    return flow.inverse_shape(torch.Size(shape))


def _image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"expected an image shape (C, H, W), got {shape}")
    return shape  # type: ignore[return-value]


def _multiscale(
    shape: Sequence[int], num_scales: int, steps_per_scale: int, step: Step, factor_out: bool
) -> ComposeTransformModule:
    """Data-to-latent: per scale, squeeze, ``steps_per_scale`` steps, factor out half."""
    c, h, w = _image_shape(shape)
    if num_scales < 1 or steps_per_scale < 1:
        raise ValueError(
            f"num_scales and steps_per_scale must be >= 1, got {num_scales}, {steps_per_scale}"
        )
    if h % 2**num_scales or w % 2**num_scales:
        raise ValueError(f"H and W of {shape} must be divisible by 2**num_scales={2**num_scales}")
    to_latent: list[TransformModule] = []
    active = c
    for scale in range(num_scales):
        squeeze = InvertibleDownsampling((c, h, w), factor=2)
        to_latent.append(squeeze)
        c, h, w, active = 4 * c, h // 2, w // 2, 4 * active
        for _ in range(steps_per_scale):
            for block in step((active, h, w)):
                to_latent.append(block if active == c else ChannelSubset(block, c))
        if factor_out and scale < num_scales - 1:
            active //= 2
    return ComposeTransformModule([Inverse(t) for t in reversed(to_latent)])


def glow(
    shape: Sequence[int],
    num_scales: int = 2,
    steps_per_scale: int = 4,
    hidden_channels: int = 64,
    *,
    log_scale_bound: float = 2.0,
    factor_out: bool = True,
) -> ComposeTransformModule:
    """Glow: per scale a squeeze and steps of ActNorm, 1x1 convolution, affine coupling.

    .. math::

        \\text{step} = \\text{AffineCoupling} \\circ \\text{Conv}_{1\\times1} \\circ
        \\text{ActNorm}

    Arguments:
        shape: the image shape ``(C, H, W)``; ``H`` and ``W`` divisible by ``2**num_scales``.
        num_scales: squeezes (each halves ``H`` and ``W``).
        steps_per_scale: flow steps after each squeeze.
        hidden_channels: width of the coupling conditioners.
        log_scale_bound: bound on the couplings' log-scales.
        factor_out: factor out half of the channels after each scale but the last.

    References:
        [1] Kingma & Dhariwal, *Glow*, NeurIPS 2018. arXiv:1807.03039

    Example:
        >>> import torch, pyro.distributions as dist
        >>> flow = glow((1, 8, 8), num_scales=2, steps_per_scale=1, hidden_channels=8)
        >>> base = dist.Normal(torch.zeros(base_shape(flow, (1, 8, 8))), 1.0).to_event(3)
        >>> d = dist.TransformedDistribution(base, flow)
        >>> d.log_prob(torch.rand(5, 1, 8, 8)).shape
        torch.Size([5])
    """

    def step(s: tuple[int, int, int]) -> list[TransformModule]:
        return [
            ActNorm(s[0], event_dim=3),
            InvertibleConv1x1(s[0]),
            affine_coupling(s, [hidden_channels, hidden_channels], log_scale_bound=log_scale_bound),
        ]

    return _multiscale(shape, num_scales, steps_per_scale, step, factor_out)


def irevnet(
    shape: Sequence[int],
    num_scales: int = 2,
    blocks_per_scale: int = 4,
    hidden_channels: int = 64,
    *,
    affine: bool = True,
    log_scale_bound: float = 2.0,
) -> ComposeTransformModule:
    """i-RevNet: invertible down-sampling and two-stream RevNet blocks, no information lost.

    .. math::

        y_1 = x_1 + F(x_2), \\qquad y_2 = x_2 + G(y_1)

    Each block is followed by a fixed channel permutation so both halves get transformed.
    ``affine=True`` adds bounded scales (a density model needs a non-zero log-det;
    additive i-RevNet is volume preserving).

    Arguments:
        shape: the image shape ``(C, H, W)``.
        num_scales: invertible down-samplings.
        blocks_per_scale: RevNet blocks after each down-sampling.
        hidden_channels: width of ``F`` and ``G``.
        affine: scale the streams by bounded log-scales.
        log_scale_bound: the bound.

    References:
        [1] Jacobsen, Smeulders & Oyallon, *i-RevNet*, ICLR 2018. arXiv:1802.07088
        [2] Gomez et al., *The Reversible Residual Network*, NeurIPS 2017. arXiv:1707.04585

    Example:
        >>> flow = irevnet((1, 8, 8), num_scales=1, blocks_per_scale=1, hidden_channels=8)
        >>> tuple(base_shape(flow, (1, 8, 8)))
        (4, 4, 4)
    """

    def step(s: tuple[int, int, int]) -> list[TransformModule]:
        block = revnet_block(
            s, [hidden_channels, hidden_channels], affine=affine, log_scale_bound=log_scale_bound
        )
        return [ActNorm(s[0], event_dim=3), block, ChannelPermutation(s[0], event_dim=3)]

    return _multiscale(shape, num_scales, blocks_per_scale, step, factor_out=False)


def residual_flow(
    input_dim: int | Sequence[int],
    num_blocks: int = 4,
    hidden_dims: Sequence[int] | None = None,
    *,
    explicit: str = "forward",
    actnorm: bool = True,
    num_scales: int = 2,
    factor_out: bool = True,
    **kwargs: object,
) -> ComposeTransformModule:
    """A residual flow: i-ResNet blocks interleaved with data-initialised ActNorm.

    .. math::

        f = A_K \\circ F_K \\circ \\cdots \\circ A_1 \\circ F_1, \\qquad
        F_k(z) = z + g_k(z),\\ \\mathrm{Lip}(g_k) < 1

    For vectors (``input_dim`` an int) the stack is exactly that, and ``input_dim`` comes
    first so ``partial(residual_flow, num_blocks=2)`` is a valid ``init_transform_fn`` of
    Pyro's ``AutoNormalizingFlow``. For images ``(C, H, W)`` it is multi-scale: per scale
    a squeeze, then ``num_blocks`` convolutional i-ResNet blocks each with an ActNorm,
    then half the channels factored out (Chen et al. 2019).

    Arguments:
        input_dim: the dimension ``D`` of a vector event, or an image shape ``(C, H, W)``.
        num_blocks: i-ResNet blocks (per scale, for images).
        hidden_dims: hidden sizes (channels, for images) of each block's network.
        explicit: ``"forward"`` (variational posteriors: cheap sampling) or ``"inverse"``
            (density estimation: cheap scoring); applies to every block.
        actnorm: put an :class:`~pyro_invres.transforms.ActNorm` with each block.
        num_scales: images only: the number of squeezes.
        factor_out: images only: factor out half the channels after each scale but the last.
        **kwargs: options of :func:`~pyro_invres.iresnet` (``lipschitz``, ``logdet``, ...).

    Example:
        >>> from functools import partial
        >>> from pyro.infer.autoguide import AutoNormalizingFlow
        >>> model = lambda: None
        >>> guide = AutoNormalizingFlow(model, partial(residual_flow, num_blocks=2))
        >>> len(residual_flow(3, num_blocks=2))
        4
        >>> flow = residual_flow((1, 8, 8), num_blocks=1, hidden_dims=[8], num_scales=1)
        >>> tuple(base_shape(flow, (1, 8, 8)))
        (4, 4, 4)
    """
    if int(num_blocks) < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if not isinstance(input_dim, int):
        flipped = {"forward": "inverse", "inverse": "forward"}
        if explicit not in flipped:
            raise ValueError(f"unknown explicit {explicit!r}; expected one of {tuple(flipped)}")

        def step(s: tuple[int, int, int]) -> list[TransformModule]:
            # built data-to-latent and wrapped in Inverse: flip so that Pyro's forward
            # direction is the explicit one the user asked for
            block = iresnet(s, hidden_dims, explicit=flipped[explicit], **kwargs)
            return [ActNorm(s[0], event_dim=3), block] if actnorm else [block]

        return _multiscale(input_dim, num_scales, int(num_blocks), step, factor_out)
    parts = []
    for _ in range(int(num_blocks)):
        parts.append(iresnet(input_dim, hidden_dims, explicit=explicit, **kwargs))
        if actnorm:
            parts.append(ActNorm(input_dim))
    return ComposeTransformModule(parts)
