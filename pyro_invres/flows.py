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

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule

from .transforms.actnorm import ActNorm
from .transforms.autoregressive import affine_autoregressive
from .transforms.base import InvertibleModule
from .transforms.chain import Chain
from .transforms.conditional_affine import ConditionalElementwiseAffine
from .transforms.conditional_dense_residual import conditional_dense_residual
from .transforms.conv1x1 import InvertibleConv1x1
from .transforms.coupling import affine_coupling, conditional_affine_coupling
from .transforms.dense_residual import DenseResidual
from .transforms.downsample import ChannelPermutation, InvertibleDownsampling
from .transforms.inverse import Inverse
from .transforms.iresnet import conditional_iresnet, iresnet
from .transforms.pixel_residual import PixelResidual
from .transforms.revnet import revnet_block
from .transforms.spline_autoregressive import conditional_spline_autoregressive
from .transforms.subset import ChannelSubset
from .transforms.triangular import TriangularAffine

__all__ = [
    "FLOWS",
    "PRESETS",
    "base_shape",
    "build_flow",
    "conditional_residual_flow",
    "conditional_spline_residual_flow",
    "glow",
    "glow_residual",
    "irevnet",
    "residual_flow",
]

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
    if not isinstance(shape, Sequence | torch.Size) or isinstance(shape, str):
        raise ValueError(f"expected an image shape (C, H, W) as input_dim, got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"expected an image shape (C, H, W), got {shape}")
    return shape  # type: ignore[return-value]


def _multiscale(
    shape: Sequence[int],
    num_scales: int,
    steps_per_scale: int,
    step: Step,
    factor_out: bool,
    split_prior: Callable[[tuple[int, int, int]], TransformModule] | None = None,
) -> ComposeTransformModule:
    """Data-to-latent: per scale, squeeze, ``steps_per_scale`` steps, factor out half.

    ``split_prior(shape)``, if given, builds a layer run just before each factor-out on the
    active channels: an affine coupling of the leaving (trailing) half on the kept half
    makes the base's standard normal a learned ``N(mu(h), sigma(h)^2)`` prior for the
    factored-out channels given the kept ones ``h`` (Glow's and Residual Flows' split
    prior).
    """
    if split_prior is not None and not (factor_out and num_scales > 1):
        raise ValueError(
            "split_prior needs a factor-out: expected factor_out=True and num_scales >= 2, "
            f"got factor_out={factor_out}, num_scales={num_scales}"
        )
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
            if split_prior is not None:
                prior = split_prior((active, h, w))
                to_latent.append(prior if active == c else ChannelSubset(prior, c))
            active //= 2
    return ComposeTransformModule([Inverse(t) for t in reversed(to_latent)])


def glow(
    input_dim: Sequence[int],
    num_scales: int = 2,
    steps_per_scale: int = 4,
    hidden_channels: int = 64,
    *,
    log_scale_bound: float = 2.0,
    factor_out: bool = True,
) -> ComposeTransformModule:
    """Glow: per scale a squeeze and steps of ActNorm, 1x1 convolution, affine coupling.

    .. math::

        \\text{step} = \\text{BoundedAffineCoupling} \\circ \\text{Conv}_{1\\times1} \\circ
        \\text{ActNorm}

    Arguments:
        input_dim: the event shape, an image ``(C, H, W)``; ``H`` and ``W`` divisible by
            ``2**num_scales``.
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

    return _multiscale(input_dim, num_scales, steps_per_scale, step, factor_out)


def glow_residual(
    input_dim: Sequence[int],
    num_scales: int = 2,
    steps_per_scale: int = 4,
    hidden_channels: int = 64,
    *,
    residual_channels: int = 16,
    lipschitz: float = 0.9,
    log_scale_bound: float = 2.0,
    factor_out: bool = True,
    residual_every: int | None = None,
) -> ComposeTransformModule:
    """Glow with a pixelwise residual block after every second step (exact, cheap log-dets).

    .. math::

        \\text{step} = R \\circ \\text{BoundedAffineCoupling} \\circ \\text{Conv}_{1\\times1}
        \\circ \\text{ActNorm}, \\qquad R(x)_{:, i, j} = x_{:, i, j} + g(x_{:, i, j})

    The image analogue of the hybrid posterior flow: the steps of :func:`glow`, every
    ``residual_every``-th one followed by a
    :class:`~pyro_invres.transforms.pixel_residual.PixelResidual` block (a nonlinear 1x1
    convolution, ``Lip(g) <= lipschitz`` by exact spectral caps), whose log-det is exact
    (one ``C x C`` determinant per pixel). Built data-to-latent like :func:`glow`: scoring
    (and training) runs every residual block explicitly, one pass each; sampling solves
    them per pixel (Broyden's method).

    Arguments:
        input_dim: the event shape, an image ``(C, H, W)``; ``H`` and ``W`` divisible by
            ``2**num_scales``.
        num_scales: squeezes (each halves ``H`` and ``W``).
        steps_per_scale: flow steps after each squeeze.
        hidden_channels: width of the coupling conditioners.
        residual_channels: hidden units of each pixelwise residual block (16: at equal
            CPU time it matched or beat 64 against Glow on 8x8 digits and MNIST-5000, with
            a step 1.4x Glow's instead of 1.75x; docs/images.md).
        lipschitz: the residual blocks' bound on ``Lip(g)``, in ``(0, 1)``.
        log_scale_bound: bound on the couplings' log-scales.
        factor_out: factor out half of the channels after each scale but the last.
        residual_every: a residual block after every ``residual_every``-th step of each
            scale (1: after every step; ``steps_per_scale``: after the last step of each
            scale only). ``None`` (default): 2, or 1 when ``steps_per_scale`` is 1. Every
            second step: at equal CPU time it beat or matched every step against Glow on
            8x8 digits and MNIST-5000, with a step 1.2x Glow's instead of 1.35-1.4x
            (docs/images.md). A checkpoint saved with the earlier default, a block after
            every step, loads into ``glow_residual(..., residual_every=1)``.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> flow = glow_residual((1, 8, 8), num_scales=2, steps_per_scale=1, hidden_channels=8)
        >>> base = dist.Normal(torch.zeros(base_shape(flow, (1, 8, 8))), 1.0).to_event(3)
        >>> d = dist.TransformedDistribution(base, flow)
        >>> d.log_prob(torch.rand(5, 1, 8, 8)).shape
        torch.Size([5])
    """

    if residual_every is None:
        residual_every = min(2, steps_per_scale)
    if not (isinstance(residual_every, int) and 1 <= residual_every <= steps_per_scale):
        raise ValueError(
            f"residual_every must be an integer in [1, steps_per_scale={steps_per_scale}], "
            f"got {residual_every!r}"
        )
    built = [0]  # steps built so far: _multiscale builds each scale's steps in order

    def step(s: tuple[int, int, int]) -> list[TransformModule]:
        built[0] += 1
        blocks: list[TransformModule] = [
            ActNorm(s[0], event_dim=3),
            InvertibleConv1x1(s[0]),
            affine_coupling(s, [hidden_channels, hidden_channels], log_scale_bound=log_scale_bound),
        ]
        position = (built[0] - 1) % steps_per_scale + 1  # 1..steps_per_scale within the scale
        if position % residual_every == 0:
            blocks.append(PixelResidual(s, residual_channels, lipschitz))
        return blocks

    return _multiscale(input_dim, num_scales, steps_per_scale, step, factor_out)


def irevnet(
    input_dim: Sequence[int],
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
        input_dim: the event shape, an image ``(C, H, W)``.
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

    return _multiscale(input_dim, num_scales, blocks_per_scale, step, factor_out=False)


def residual_flow(
    input_dim: int | Sequence[int],
    num_blocks: int = 4,
    hidden_dims: Sequence[int] | None = None,
    *,
    explicit: str = "forward",
    actnorm: bool = True,
    num_scales: int | None = None,
    factor_out: bool | None = None,
    split_prior: bool = False,
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
        input_dim: the event shape: ``D`` or ``(D,)`` for vectors, ``(C, H, W)`` for images.
        num_blocks: i-ResNet blocks (per scale, for images).
        hidden_dims: hidden sizes (channels, for images) of each block's network.
        explicit: ``"forward"`` (variational posteriors: cheap sampling) or ``"inverse"``
            (density estimation: cheap scoring); applies to every block.
        actnorm: put an :class:`~pyro_invres.transforms.ActNorm` with each block.
        num_scales: images only: the number of squeezes (default 2).
        factor_out: images only: factor out half the channels after each scale but the
            last (default True).
        split_prior: images only: a learned conditional prior for each factored-out half
            (a zero-initialised affine coupling on the kept half, conditioners of
            ``hidden_dims``; Glow's split prior). Measured in ``docs/images.md``: test
            bits/dim 2.378 against 2.618 without it on 8x8 digits, 4.682 against 5.664 on
            MNIST-5000, at equal CPU time.
        **kwargs: options of :func:`~pyro_invres.iresnet` (``lipschitz``, ``logdet``,
            ``solver``, ``activation``, ...), the same for every block.

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
    if isinstance(input_dim, Sequence | torch.Size) and len(input_dim) == 1:
        input_dim = int(input_dim[0])  # a vector event given as its shape (D,), as in Pyro
    if not isinstance(input_dim, int):
        flipped = {"forward": "inverse", "inverse": "forward"}
        if explicit not in flipped:
            raise ValueError(f"unknown explicit {explicit!r}; expected one of {tuple(flipped)}")

        def step(s: tuple[int, int, int]) -> list[TransformModule]:
            # built data-to-latent and wrapped in Inverse: flip so that Pyro's forward
            # direction is the explicit one the user asked for
            block = iresnet(s, hidden_dims, explicit=flipped[explicit], **kwargs)
            return [ActNorm(s[0], event_dim=3), block] if actnorm else [block]

        num_scales = 2 if num_scales is None else num_scales
        factor_out = True if factor_out is None else factor_out

        def prior(s: tuple[int, int, int]) -> TransformModule:
            return affine_coupling(s, hidden_dims)  # zero-initialised: the identity at first

        prior_fn = prior if split_prior else None
        return _multiscale(input_dim, num_scales, int(num_blocks), step, factor_out, prior_fn)
    if split_prior:
        raise ValueError(
            f"split_prior applies to image flows, input_dim=(C, H, W); got {input_dim}"
        )
    for name, value in (("num_scales", num_scales), ("factor_out", factor_out)):
        if value is not None:  # an image-only option must not be silently ignored
            raise ValueError(f"{name} applies to image flows, input_dim=(C, H, W); got {input_dim}")
    parts = []
    for _ in range(int(num_blocks)):
        parts.append(iresnet(input_dim, hidden_dims, explicit=explicit, **kwargs))
        if actnorm:
            parts.append(ActNorm(input_dim))
    return ComposeTransformModule(parts)


def conditional_residual_flow(
    input_dim: int | Sequence[int],
    context_dim: int,
    num_blocks: int = 5,
    hidden_dims: Sequence[int] | None = None,
    *,
    explicit: str = "inverse",
    actnorm: bool = True,
    couplings: bool = True,
    coupling_hidden_dims: Sequence[int] | None = None,
    context_affine: bool = True,
    **kwargs: Any,
) -> ConditionalComposeTransformModule:
    """A conditional residual flow for ``q(theta | x)``: i-ResNet blocks between scale layers.

    .. math::

        f(\\cdot\\,;x) = A(\\cdot\\,;x) \\circ N_K \\circ F_K(\\cdot\\,;x) \\circ P
        \\circ C_K(\\cdot\\,;x) \\circ \\cdots \\circ N_1 \\circ F_1(\\cdot\\,;x)
        \\circ P \\circ C_1(\\cdot\\,;x),

    from base noise to the variable (Pyro's forward): each of the ``K`` steps is a
    conditional affine coupling ``C_k`` (bounded log-scale; its scale and shift see the
    context), a flip ``P`` of the coordinates (so consecutive couplings rescale
    different halves), a conditional i-ResNet block ``F_k(z; x) = z + g_k(z; x)`` with
    ``Lip_z(g_k) < 1`` (a :class:`~pyro_invres.nn.ConditionalLipschitzMLP`: the context
    enters the first hidden layer, so the bound holds in ``z`` for every context) and an
    ActNorm ``N_k``; last comes ``A(z; x) = mu(x) + exp(s(x)) * z``
    (:class:`~pyro_invres.transforms.conditional_affine.ConditionalElementwiseAffine`).

    Why this shape: an i-ResNet block's singular values lie in ``[1 - c, 1 + c]``, so a
    stack of blocks alone changes scale slowly and stalled in neural posterior estimation
    (issue 16: 5 blocks of ``[64, 64]`` scored C2ST 0.685 / 0.916 / 0.759 on two_moons /
    slcp / gaussian_mixture against zuko NSF's 0.585 / 0.831 / 0.649). The couplings and
    the final context-dependent affine map carry the posterior's location and
    per-observation scale; the residual blocks bend the shape.

    Measured (``examples/benchmarks/study_conditional_preset.py``, results in
    ``examples/benchmarks/results/conditional_preset_study_cpu.json``; 10,000
    simulations, both flows trained by :func:`~pyro_invres.npe.fit_conditional` capped at
    60 epochs, C2ST over observations 1-2, one seed, CPU): this layout scored 0.647 /
    0.941 / 0.684 on two_moons / slcp / gaussian_mixture against zuko NSF's 0.613 /
    0.881 / 0.604, so it still loses to NSF on all three (3 blocks: 0.661 / 0.948). Its
    times there were measured under a load that changed between runs and are not
    comparable.

    With the default ``explicit="inverse"``, scoring (training) is one pass per block
    with the exact log-det at small ``D``, and sampling solves each block's fixed point.
    Put it in :class:`~pyro_invres.npe.ConditionalFlow` for batched contexts, an
    embedding network, z-scoring and a bounded support, or in Pyro's
    ``ConditionalTransformedDistribution``.

    Arguments:
        input_dim: the dimension ``D`` of the variable (``D`` or ``(D,)``).
        context_dim: the dimension of the context the blocks see.
        num_blocks: ``K``, i-ResNet blocks (each with its coupling when ``couplings``).
        hidden_dims: hidden sizes of each block's network (default ``[max(64, 10 D)] * 2``).
        explicit: ``"inverse"`` (cheap scoring: density estimation, NPE) or ``"forward"``
            (cheap sampling: amortised variational guides).
        actnorm: put an :class:`~pyro_invres.transforms.ActNorm` after each block.
        couplings: put a conditional affine coupling (and the flip) before each block
            (needs ``D >= 2``; ``False``: i-ResNet blocks only).
        coupling_hidden_dims: the couplings' hidden sizes (default ``[max(50, 5 D)] * 2``).
        context_affine: end with the conditional elementwise affine map ``A``.
        **kwargs: options of :func:`~pyro_invres.conditional_iresnet` (``lipschitz``,
            ``logdet``, ``solver``, ``activation``, ``activation_kwargs``), the same for
            every block.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> flow = conditional_residual_flow(2, context_dim=3, num_blocks=2, hidden_dims=[16])
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> q = dist.ConditionalTransformedDistribution(base, [flow]).condition(torch.ones(3))
        >>> q.sample((5,)).shape, len(flow)
        (torch.Size([5, 2]), 9)
    """
    if isinstance(num_blocks, bool) or int(num_blocks) != num_blocks or num_blocks < 1:
        raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
    dim = _vector_dim(input_dim)
    if couplings and dim < 2:
        raise ValueError("couplings need input_dim >= 2; pass couplings=False for D = 1")
    cpl_hidden = (
        [max(50, 5 * dim)] * 2 if coupling_hidden_dims is None else list(coupling_hidden_dims)
    )
    flip = list(range(dim - 1, -1, -1))
    parts: list[Any] = []
    for _ in range(int(num_blocks)):
        if couplings:
            coupling = conditional_affine_coupling(dim, context_dim, cpl_hidden)
            parts += [coupling, ChannelPermutation(dim, permutation=flip, event_dim=1)]
        block = conditional_iresnet(dim, context_dim, hidden_dims, explicit=explicit, **kwargs)
        parts.append(block)
        if actnorm:
            parts.append(ActNorm(dim))
    if context_affine:
        parts.append(ConditionalElementwiseAffine(dim, context_dim))
    return ConditionalComposeTransformModule(parts)


def conditional_spline_residual_flow(
    input_dim: int | Sequence[int],
    context_dim: int,
    num_layers: int = 5,
    hidden_dims: Sequence[int] = (50, 50),
    *,
    count_bins: int = 8,
    bound: float = 5.0,
    residual: bool = True,
    residual_hidden_dim: int | None = None,
    lipschitz: float = 0.9,
) -> ConditionalComposeTransformModule:
    """Neural posterior estimation's flow: spline autoregressive layers and i-ResNet blocks.

    .. math::

        f(\\cdot\\,;c) = F_K(\\cdot\\,;c) \\circ S_K(\\cdot\\,;c) \\circ \\cdots \\circ
        F_1(\\cdot\\,;c) \\circ S_1(\\cdot\\,;c),
        \\qquad F_k^{-1}(\\theta; c) = \\theta + g_k(\\theta; c), \\quad
        \\mathrm{Lip}_\\theta(g_k) \\le c_L < 1,

    from base noise to the parameter ``theta`` (Pyro's forward). Each ``S_k`` is a
    monotone rational-quadratic spline autoregressive layer whose bins come from a masked
    network of the earlier coordinates and the context
    (:class:`~pyro_invres.transforms.spline_autoregressive.ConditionalSplineAutoregressive`,
    the coordinate order reversed from one layer to the next); each ``F_k`` is a
    one-hidden-layer conditional i-ResNet block
    (:class:`~pyro_invres.transforms.conditional_dense_residual.ConditionalDenseResidual`),
    explicit in the scoring direction ``theta -> z`` with its exact log-det (one
    ``D x D`` determinant), solved when sampling by Broyden's method from the inverse of
    the batch's average Jacobian (5-7 evaluations of the block per solve).

    Why this shape: the i-ResNet block alone mixes every coordinate with every other in
    one step but changes local scale only within ``[1 - c_L, 1 + c_L]``, and stacks of it
    trailed zuko's neural spline flow in neural posterior estimation (issue 16); the
    spline layers carry the large, coordinate-wise changes of shape and scale, and the
    blocks couple all coordinates at once between them (a spline autoregressive layer
    sees each coordinate's predecessors only). ``residual=False`` gives the ablation, a
    neural spline flow of this library's own layers. Scoring a batch is ``2 K`` network
    passes; drawing is ``D`` passes per spline layer and a few solver steps per block,
    cheap at the small ``D`` of simulation-based inference.

    Measured (``examples/benchmarks/bench_sbi.py``, ``docs/sbi_results.md``; sbibm, the
    same simulations and early stopping for both, C2ST over 5-10 observations, one
    seed at 10,000 simulations): mean C2ST 0.607 / 0.836 / 0.592 / 0.550 / 0.639 on
    two_moons / slcp / gaussian_mixture / gaussian_linear_uniform / bernoulli_glm against
    zuko NSF's 0.617 / 0.854 / 0.605 / 0.565 / 0.676, at 1.05-1.99x NSF's training CPU
    time; without the blocks (``residual=False``) 0.615 / 0.848 / 0.599 / 0.557 / 0.652.

    Arguments:
        input_dim: the dimension ``D`` of the parameter (``D`` or ``(D,)``).
        context_dim: the dimension ``C`` of the context (the observation or its embedding).
        num_layers: ``K``, spline layers (each followed by a block when ``residual``).
        hidden_dims: each spline layer's masked network.
        count_bins: the spline's bins.
        bound: the spline acts on ``[-bound, bound]`` (the identity outside), in the
            z-scored units that :class:`~pyro_invres.npe.ConditionalFlow` trains in.
        residual: put an i-ResNet block after each spline layer.
        residual_hidden_dim: each block's hidden units (default ``max(32, 8 D)``).
        lipschitz: ``c_L``, each block's bound on ``Lip_theta(g_k)``.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> flow = conditional_spline_residual_flow(2, context_dim=3, num_layers=2)
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> q = dist.ConditionalTransformedDistribution(base, [flow]).condition(torch.ones(3))
        >>> q.sample((5,)).shape, len(flow)
        (torch.Size([5, 2]), 4)
    """
    if isinstance(num_layers, bool) or int(num_layers) != num_layers or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    dim = _vector_dim(input_dim)
    hidden = max(32, 8 * dim) if residual_hidden_dim is None else int(residual_hidden_dim)
    parts: list[Any] = []
    for k in range(int(num_layers)):
        order = list(range(dim)) if k % 2 == 0 else list(range(dim - 1, -1, -1))
        parts.append(
            conditional_spline_autoregressive(
                dim, context_dim, hidden_dims, count_bins=count_bins, bound=bound, order=order
            )
        )
        if residual:
            parts.append(conditional_dense_residual(dim, context_dim, hidden, lipschitz))
    return ConditionalComposeTransformModule(parts)


def posterior_flow(
    input_dim: int,
    num_blocks: int = 2,
    hidden_dim: int | None = None,
    *,
    num_autoregressive: int = 2,
    autoregressive_hidden_dim: int | None = None,
    lipschitz: float = 0.9,
    log_scale_bound: float = 4.0,
    init_scale: float = 1.0,
) -> Chain:
    """The flow of :class:`~pyro_invres.autoguide.AutoResidualFlow`, base to latent.

    .. math::

        f = A \\circ F_2 \\circ T_2 \\circ F_1 \\circ T_1, \\qquad
        T_k(z)_i = z_i e^{s_{k,i}(z_{<i})} + t_{k,i}(z_{<i}), \\quad
        F_k(z) = z + g_k(z), \\quad A(z) = \\mu + L z,

    (the default ``K = 2``): affine autoregressive layers ``T_k``
    (:class:`~pyro_invres.transforms.autoregressive.AffineAutoregressive`, the second in
    the reversed order, so every coordinate's scale depends on every other), each
    followed by a one-hidden-layer i-ResNet block ``F_k``
    (:class:`~pyro_invres.transforms.dense_residual.DenseResidual`, ``Lip(g_k) <= c``,
    exact log-det by one ``D x D`` determinant), and a learned lower-triangular affine
    map ``A``. Every part is explicit in this, the sampling, direction. Why this shape
    (and what each part earned in measurements) is in the
    :mod:`~pyro_invres.autoguide` module's docstring. The parts run as one
    :class:`~pyro_invres.transforms.chain.Chain` (validated and cached at its ends only: a
    guide scores its own samples from the one pair it keeps).

    Arguments:
        input_dim: ``D``.
        num_blocks: residual blocks ``F_k`` (0: the ablation without them).
        hidden_dim: each block's hidden units (default ``max(16, 2 D)``).
        num_autoregressive: autoregressive layers ``T_k``, alternating in order with the
            blocks (``T_1 F_1 T_2 F_2 ...``; the longer list continues alone).
        autoregressive_hidden_dim: the MADE's hidden units (default ``3 D + 1``, as
            Pyro's ``AutoIAFNormal``); 0 keeps each log-scale linear in the earlier
            coordinates.
        lipschitz: ``c``, the bound on ``Lip(g_k)``.
        log_scale_bound: each autoregressive layer's log-scale bound.
        init_scale: ``L = init_scale * I`` to start.

    Example:
        >>> import torch
        >>> flow = posterior_flow(5)
        >>> [type(p).__name__ for p in flow.parts]   # doctest: +NORMALIZE_WHITESPACE
        ['AffineAutoregressive', 'DenseResidual', 'AffineAutoregressive', 'DenseResidual',
         'TriangularAffine']
        >>> flow(torch.randn(3, 5)).shape
        torch.Size([3, 5])
    """
    dim = int(input_dim)
    if dim < 1:
        raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
    for name, value in [("num_blocks", num_blocks), ("num_autoregressive", num_autoregressive)]:
        if isinstance(value, bool) or int(value) != value or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    hidden = max(16, 2 * dim) if hidden_dim is None else int(hidden_dim)
    ar_hidden = 3 * dim + 1 if autoregressive_hidden_dim is None else int(autoregressive_hidden_dim)
    if ar_hidden < 0:
        raise ValueError(f"autoregressive_hidden_dim must be >= 0, got {ar_hidden}")
    parts: list[InvertibleModule] = []
    for k in range(max(int(num_blocks), int(num_autoregressive))):
        if k < num_autoregressive:
            order = torch.arange(dim) if k % 2 == 0 else torch.arange(dim).flip(0)
            parts.append(
                affine_autoregressive(
                    dim,
                    [ar_hidden] if ar_hidden else [],
                    order=order,
                    log_scale_bound=log_scale_bound,
                )
            )
        if k < num_blocks:
            parts.append(DenseResidual(dim, hidden, lipschitz))
    parts.append(TriangularAffine(dim, init_scale=init_scale))
    return Chain(parts)


# -- flows by name -------------------------------------------------------------------------------
#: Names accepted by :func:`build_flow`.
FLOWS: tuple[str, ...] = ("iresnet", "revnet", "additive", "affine", "pyro-affine")

#: Tuned option sets of the flows in :data:`FLOWS`, by name: ``build_flow(preset,
#: input_dim, **overrides)`` builds ``PRESETS[preset]["flow"]`` with the preset's other
#: entries as options, ``overrides`` replacing any of them.
#:
#: ``iresnet-2d`` is the flow ``pyro-invres fit`` trains on 2-D toy densities: eight
#: i-ResNet blocks of ``[32, 32]`` with the learned-frequency sine activation (starting
#: at ``omega = 4``), ``Lip(g) <= 0.97`` split between the layers by learned gains, and
#: Newton's method inverting each block when sampling. How it was chosen (and what it
#: beat) is in the docs: "How the pyro-invres fit flow was tuned" (``docs/tradeoffs.md``).
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "iresnet-2d": MappingProxyType(
            {
                "flow": "iresnet",
                "num_blocks": 8,
                "hidden_dims": (32, 32),
                "activation": "sine",
                "activation_kwargs": MappingProxyType({"omega": 4.0}),
                "lipschitz": 0.97,
                "split": "learned",
                "solver": "newton",
            }
        ),
    }
)


def _plain(value: Any) -> Any:
    """A preset entry as a fresh plain value (lists and dicts), safe to store and mutate."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _iresnet_flow(input_dim: int, **cfg: Any) -> TransformModule:
    cfg.setdefault("explicit", "inverse")
    cfg.setdefault("num_blocks", 4)
    return residual_flow(input_dim, **cfg)


def _pyro_affine_flow(
    input_dim: int, num_blocks: int = 4, hidden_dims: Sequence[int] | None = None
) -> TransformModule:
    from pyro.distributions.transforms import affine_coupling

    from .transforms.legacy_layout import load_legacy_layout

    if input_dim < 2:
        raise ValueError(f"pyro-affine coupling needs input_dim >= 2, got {input_dim}")
    hidden = [max(64, 10 * input_dim)] * 2 if hidden_dims is None else list(hidden_dims)
    reverse = list(range(input_dim - 1, -1, -1))  # deterministic: rebuilt from the config
    parts: list[Any] = []
    for _ in range(int(num_blocks)):
        # a module (not Pyro's Permute): its index moves with .to() and deep-copies
        parts += [
            affine_coupling(input_dim, hidden_dims=hidden),
            ChannelPermutation(input_dim, permutation=reverse, event_dim=1),
        ]
    # state dicts saved when the reversal was Pyro's Permute (no buffer) still load
    return load_legacy_layout(ComposeTransformModule(parts[:-1]))


def _optional_factory(module: str, name: str, flow: str) -> Any:
    """``pyro_invres.<module>.<name>``, imported on first use, or a clear error."""
    import importlib

    try:
        factory = getattr(importlib.import_module(f"pyro_invres.{module}"), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"flow {flow!r} needs pyro_invres.{module}.{name}, which this installation lacks "
            f"({err}); choose another of {', '.join(FLOWS)}"
        ) from err
    return factory


def _stack(
    factory: Any,
    input_dim: int,
    num_blocks: int = 4,
    permute: bool = True,
    **options: Any,
) -> TransformModule:
    """``num_blocks`` blocks with ActNorm after each and, if ``permute``, a reversal between."""
    if int(num_blocks) < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if input_dim < 2:
        raise ValueError(f"coupling blocks need input_dim >= 2, got {input_dim}")
    from .transforms.legacy_layout import load_legacy_layout

    reverse = list(range(input_dim - 1, -1, -1))  # deterministic: rebuilt from the config
    parts: list[Any] = []
    for k in range(int(num_blocks)):
        if permute and k > 0:
            # a module (not Pyro's Permute): its index moves with .to() and deep-copies
            parts.append(ChannelPermutation(input_dim, permutation=reverse, event_dim=1))
        parts += [factory(input_dim, **options), ActNorm(input_dim)]
    # state dicts saved when the reversal was Pyro's Permute (no buffer) still load
    return load_legacy_layout(ComposeTransformModule(parts))


def _revnet_flow(input_dim: int, **cfg: Any) -> TransformModule:
    factory = _optional_factory("transforms.revnet", "revnet_block", "revnet")
    return _stack(factory, input_dim, permute=False, **cfg)


def _additive_flow(input_dim: int, **cfg: Any) -> TransformModule:
    factory = _optional_factory("transforms.coupling", "additive_coupling", "additive")
    return _stack(factory, input_dim, **cfg)


def _affine_flow(input_dim: int, **cfg: Any) -> TransformModule:
    factory = _optional_factory("transforms.coupling", "affine_coupling", "affine")
    return _stack(factory, input_dim, **cfg)


_BUILDERS = {
    "iresnet": _iresnet_flow,
    "revnet": _revnet_flow,
    "additive": _additive_flow,
    "affine": _affine_flow,
    "pyro-affine": _pyro_affine_flow,
}


def _vector_dim(input_dim: int | Sequence[int]) -> int:
    """``D`` from ``D`` or ``(D,)``; a clear error for anything else."""
    dim = input_dim
    if isinstance(input_dim, Sequence | torch.Size) and not isinstance(input_dim, str):
        if len(input_dim) != 1:
            raise ValueError(
                f"build_flow's flows model vectors: input_dim must be D or (D,), got "
                f"{tuple(input_dim)!r}; for images (C, H, W) use glow, irevnet or residual_flow"
            )
        dim = input_dim[0]
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"input_dim must be a positive int D or a shape (D,), got {input_dim!r}")
    return dim


def build_flow(name: str, input_dim: int | Sequence[int], **cfg: Any) -> TransformModule:
    """Build a flow for density estimation on ``R^input_dim`` from its name and options.

    The flow remembers how it was built in ``flow.flow_config`` (plain types only), which
    :func:`~pyro_invres.train.fit_density` stores in checkpoints and
    :func:`~pyro_invres.checkpoint.load_flow` uses to rebuild it.

    =============== ==================================================================
    ``iresnet``     :func:`~pyro_invres.residual_flow` with ``explicit="inverse"``
                    (scoring data is explicit; options ``num_blocks``, ``hidden_dims``,
                    ``activation``, ``lipschitz``, ``logdet``, ...)
    ``revnet``      :func:`~pyro_invres.transforms.revnet.revnet_block` stack
                    (options ``num_blocks``, ``hidden_dims``, ``affine``, ``activation``)
    ``additive``    :func:`~pyro_invres.transforms.coupling.additive_coupling` stack,
                    halves swapped between blocks
    ``affine``      :func:`~pyro_invres.transforms.coupling.affine_coupling` stack
    ``pyro-affine`` Pyro's own ``affine_coupling`` blocks with reversing permutations,
                    for comparison
    =============== ==================================================================

    Every stack but ``pyro-affine`` puts an :class:`~pyro_invres.ActNorm` after each block.

    A name in :data:`PRESETS` (``iresnet-2d``: the flow ``pyro-invres fit`` trains) builds
    its flow with the preset's options, ``cfg`` overriding them. ``flow_config`` then names
    the underlying flow and lists every option, so a checkpoint rebuilds the same flow even
    if the preset is tuned again later.

    Arguments:
        name: one of :data:`FLOWS` or :data:`PRESETS`.
        input_dim: the event shape of the data, ``D`` or ``(D,)`` (as in Pyro's factories);
            ``flow_config`` records it as the int ``D``. These flows model vectors: for
            images ``(C, H, W)`` use :func:`glow`, :func:`irevnet` or :func:`residual_flow`.
        **cfg: options of the named flow (ints, floats, strings and lists of them).

    Raises:
        ValueError: for an unknown name, a flow whose module is not installed, or an
            ``input_dim`` that is not a positive ``D`` or ``(D,)``.

    Example:
        >>> flow = build_flow("iresnet", 2, num_blocks=2, hidden_dims=[16])
        >>> flow.flow_config
        {'name': 'iresnet', 'input_dim': 2, 'num_blocks': 2, 'hidden_dims': [16]}
        >>> tuned = build_flow("iresnet-2d", 2, num_blocks=1)   # the `pyro-invres fit` flow
        >>> config = tuned.flow_config
        >>> config["name"], config["num_blocks"], config["activation"], config["hidden_dims"]
        ('iresnet', 1, 'sine', [32, 32])
    """
    if name in PRESETS:
        preset = _plain(PRESETS[name])
        name = preset.pop("flow")
        cfg = {**preset, **cfg}
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(
            f"unknown flow {name!r}; choose from {', '.join(FLOWS)} or a preset "
            f"({', '.join(PRESETS)})"
        )
    input_dim = _vector_dim(input_dim)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    flow = builder(input_dim, **dict(config))
    flow.flow_config = {"name": name, "input_dim": input_dim, **config}
    return flow
