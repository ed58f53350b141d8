"""Data for density estimation: the 2-D toy densities and the 8x8 digits.

The toy densities are the ones used to show flows at work in the FFJORD, i-ResNet and
Residual Flow papers [1, 2, 3]. Each is a sampler written in torch, reproducible from a
seed, scaled so that the data lies roughly within ``[-4, 4]^2``:

================  ===================================================================
``8gaussians``    eight Gaussians (std 0.35) evenly spaced on a circle of radius 2.83
``checkerboard``  uniform on 8 of the 16 squares of a checkerboard over ``[-4, 4]^2``
``2spirals``      two interleaved spirals with Gaussian noise
``moons``         two interleaving half circles
``rings``         four concentric noisy circles, radii 0.75 to 3
``pinwheel``      five curved arms
``circles``       two concentric noisy circles, radii 1.5 and 3
``swissroll``     the 2-D projection of the Swiss roll
================  ===================================================================

:func:`load_digits` loads scikit-learn's bundled 8x8 digits (no download), dequantised
and scaled to ``[0, 1]``; :func:`bits_per_dim` turns a model's negative log-likelihood on
that scale into bits per dimension of the original discrete data.

References:
    [1] Grathwohl et al., *FFJORD: Free-form Continuous Dynamics for Scalable Reversible
        Generative Models*, ICLR 2019. arXiv:1810.01367
    [2] Behrmann et al., *Invertible Residual Networks*, ICML 2019. arXiv:1811.00995
    [3] Chen et al., *Residual Flows for Invertible Generative Modeling*, NeurIPS 2019.
        arXiv:1906.02735
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DIGITS_LEVELS",
    "TOY_DATASETS",
    "bits_per_dim",
    "load_digits",
    "sample_toy",
]

TOY_DATASETS: tuple[str, ...] = (
    "8gaussians",
    "checkerboard",
    "2spirals",
    "moons",
    "rings",
    "pinwheel",
    "circles",
    "swissroll",
)

#: Pixel values of the digits are the integers ``0..16``: 17 levels.
DIGITS_LEVELS = 17

_SPLIT_SEED = 20190606  # fixed: the digits train/test split never depends on ``seed``
_TEST_FRACTION = 0.2

Sampler = Callable[[int, "torch.Generator | None"], Tensor]


# -- the toy samplers (float64 on the CPU; converted at the end) ------------------------------
def _randn(n: int, g: torch.Generator | None, *shape: int) -> Tensor:
    return torch.randn(n, *shape, generator=g, dtype=torch.float64)


def _rand(n: int, g: torch.Generator | None, *shape: int) -> Tensor:
    return torch.rand(n, *shape, generator=g, dtype=torch.float64)


def _randint(n: int, g: torch.Generator | None, high: int) -> Tensor:
    return torch.randint(high, (n,), generator=g)


def _polar(radius: Tensor, angle: Tensor) -> Tensor:
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)


def _eight_gaussians(n: int, g: torch.Generator | None) -> Tensor:
    angle = _randint(n, g, 8).double() * (math.pi / 4)
    centres = _polar(torch.full_like(angle, 4.0), angle)
    return (centres + 0.5 * _randn(n, g, 2)) / math.sqrt(2.0)


def _checkerboard(n: int, g: torch.Generator | None) -> Tensor:
    x1 = 4.0 * _rand(n, g) - 2.0
    # rows alternate with the column: column parity shifts the row by one unit
    x2 = _rand(n, g) - 2.0 * _randint(n, g, 2).double() + torch.floor(x1).remainder(2.0)
    return 2.0 * torch.stack([x1, x2], dim=-1)


def _two_spirals(n: int, g: torch.Generator | None) -> Tensor:
    t = torch.sqrt(_rand(n, g)) * 3.0 * math.pi  # up to 540 degrees
    arm = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=-1) + 0.5 * _rand(n, g, 2)
    sign = 1.0 - 2.0 * _randint(n, g, 2).double().unsqueeze(-1)
    return sign * arm / 3.0 + 0.1 * _randn(n, g, 2)


def _moons(n: int, g: torch.Generator | None) -> Tensor:
    angle = math.pi * _rand(n, g)
    lower = _randint(n, g, 2).bool().unsqueeze(-1)
    upper_moon = _polar(torch.ones_like(angle), angle)
    lower_moon = torch.tensor([1.0, 0.5], dtype=torch.float64) - upper_moon
    x = torch.where(lower, lower_moon, upper_moon) + 0.1 * _randn(n, g, 2)
    return 2.0 * x + torch.tensor([-1.0, -0.2], dtype=torch.float64)


def _rings(n: int, g: torch.Generator | None) -> Tensor:
    radius = 0.75 * (1 + _randint(n, g, 4).double())  # 0.75, 1.5, 2.25, 3
    angle = 2.0 * math.pi * _rand(n, g)
    return _polar(radius, angle) + 0.08 * _randn(n, g, 2)


def _pinwheel(n: int, g: torch.Generator | None) -> Tensor:
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    label = _randint(n, g, arms).double()
    feat = _randn(n, g, 2) * torch.tensor([radial_std, tangential_std], dtype=torch.float64)
    feat[:, 0] += 1.0
    angle = label * (2.0 * math.pi / arms) + rate * torch.exp(feat[:, 0])
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotated = torch.stack(
        [cos * feat[:, 0] - sin * feat[:, 1], sin * feat[:, 0] + cos * feat[:, 1]], dim=-1
    )
    return 2.0 * rotated


def _circles(n: int, g: torch.Generator | None) -> Tensor:
    radius = 1.0 - 0.5 * _randint(n, g, 2).double()  # 1 or 0.5
    angle = 2.0 * math.pi * _rand(n, g)
    return 3.0 * (_polar(radius, angle) + 0.08 * _randn(n, g, 2))


def _swissroll(n: int, g: torch.Generator | None) -> Tensor:
    t = 1.5 * math.pi * (1.0 + 2.0 * _rand(n, g))
    return (_polar(t, t) + _randn(n, g, 2)) / 5.0


_SAMPLERS: dict[str, Sampler] = {
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
    "moons": _moons,
    "rings": _rings,
    "pinwheel": _pinwheel,
    "circles": _circles,
    "swissroll": _swissroll,
}


def _as_generator(seed: int | torch.Generator | None) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, a torch.Generator or None, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(seed)


def sample_toy(
    name: str,
    n: int,
    seed: int | torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> Tensor:
    """Draw ``n`` points from one of the 2-D toy densities in :data:`TOY_DATASETS`.

    Arguments:
        name: one of :data:`TOY_DATASETS`.
        n: the number of points, ``n >= 0``.
        seed: an int (the same points every time), a CPU :class:`torch.Generator` (drawn
            from and advanced), or ``None`` (torch's global generator, so
            ``pyro.set_rng_seed`` applies).
        dtype: the floating dtype of the result.
        device: where the result lives (sampling always runs on the CPU).

    Returns:
        A tensor of shape ``(n, 2)``.

    Raises:
        ValueError: for an unknown ``name`` (the message lists the valid ones) or ``n < 0``.

    Example:
        >>> x = sample_toy("moons", 500, seed=0)
        >>> x.shape, x.dtype
        (torch.Size([500, 2]), torch.float32)
        >>> torch.equal(x, sample_toy("moons", 500, seed=0))
        True
        >>> bool(x.abs().max() < 5)
        True
    """
    sampler = _SAMPLERS.get(name)
    if sampler is None:
        raise ValueError(f"unknown toy data set {name!r}; choose from {', '.join(TOY_DATASETS)}")
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    x = sampler(int(n), _as_generator(seed))
    return x.to(dtype=dtype, device=device)


# -- the digits ---------------------------------------------------------------------------------
def _sklearn_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits needs scikit-learn (it ships the 8x8 digits): "
            "pip install scikit-learn  (or pip install 'pyro-invres[examples]')"
        ) from err
    bunch = sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    return images, labels


def load_digits(
    split: str = "train",
    dequantize: bool = True,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits as images in ``[0, 1]``, ready for density estimation.

    Pixels are the integers :math:`x \\in \\{0, \\dots, 16\\}` (17 levels). With
    uniform dequantisation each image becomes

    .. math::

        y = \\frac{x + u}{17}, \\qquad u \\sim \\mathcal{U}[0, 1)^{64},

    a continuous variable in ``[0, 1)^64``. Without it, pixels sit at the bin centres
    ``(x + 1/2) / 17``, on the same scale.

    **Bits per dimension.** A density :math:`p_Y` fitted to ``y`` gives the dequantised
    data :math:`v = x + u = 17 y` the density :math:`p_V(v) = p_Y(v / 17)\\,17^{-D}`, and
    :math:`-\\mathbb{E}\\log p_V` bounds the negative log-likelihood of the discrete
    ``x`` from above. So the log-Jacobian of the scaling, :math:`D \\log 17` nats per image
    (``D = 64``), must be *added* to the NLL on the ``[0, 1]`` scale before dividing by
    :math:`D \\log 2`; :func:`bits_per_dim` does exactly that. Forgetting it flatters the
    model by :math:`\\log_2 17 \\approx 4.09` bits/dim.

    The split is fixed (80 % train, 20 % test, by a permutation with a fixed seed), so
    train and test never overlap whatever ``seed`` is; ``seed`` only draws the
    dequantisation noise.

    Arguments:
        split: ``"train"`` (1438 images), ``"test"`` (359 images) or ``"all"`` (1797).
        dequantize: add uniform noise (``True``) or use bin centres (``False``).
        seed: the seed of the dequantisation noise.
        dtype: the floating dtype of the images.
        return_labels: also return the digit labels ``(N,)``.

    Returns:
        Images of shape ``(N, 1, 8, 8)``, and the labels if ``return_labels``.

    Raises:
        ValueError: for an unknown ``split``.
        ImportError: if scikit-learn is not installed.

    Example:
        >>> x = load_digits("test")
        >>> x.shape, bool(x.min() >= 0), bool(x.max() < 1)
        (torch.Size([359, 1, 8, 8]), True, True)
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}; choose from train, test, all")
    images, labels = _sklearn_digits()
    if split != "all":
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(_SPLIT_SEED))
        n_test = int(round(_TEST_FRACTION * len(images)))
        index = order[n_test:] if split == "train" else order[:n_test]
        index = index.sort().values  # keep scikit-learn's order within the split
        images, labels = images[index], labels[index]
    if dequantize:
        noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(int(seed)))
        images = images + noise.double()
    else:
        images = images + 0.5
    images = (images / DIGITS_LEVELS).unsqueeze(1).to(dtype)
    # (16 + u) / 17 < 1, but rounding to a narrower dtype could reach 1
    images = images.clamp_(max=1.0 - torch.finfo(dtype).eps / 2)
    return (images, labels) if return_labels else images


def bits_per_dim(
    nll_nats_per_image: float | Tensor, num_dims: int, scale: float = DIGITS_LEVELS
) -> float | Tensor:
    """Bits per dimension of discrete data from an NLL measured on the rescaled data.

    .. math::

        \\mathrm{bpd} = \\frac{\\mathrm{NLL}_{[0,1]} + D \\log s}{D \\log 2}

    where :math:`\\mathrm{NLL}_{[0,1]}` is the negative log-likelihood in nats per image of
    the dequantised data divided by ``s`` (as :func:`load_digits` returns it) and
    :math:`D \\log s` the log-Jacobian of that division. Use ``scale=256`` for 8-bit
    images scaled by 1/256, ``scale=1`` for an NLL already on the integer scale.

    Arguments:
        nll_nats_per_image: the mean NLL (nats per image) on the scaled data; a float or a
            tensor (element-wise).
        num_dims: the dimensions ``D`` of one image (64 for the digits).
        scale: the divisor ``s`` that mapped the integer data to the model's scale.

    Example:
        >>> round(bits_per_dim(0.0, 64), 4)          # log2(17): a uniform density on [0, 1)
        4.0875
        >>> round(bits_per_dim(-64 * math.log(17), 64), 6)
        0.0
    """
    if int(num_dims) != num_dims or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    return (nll_nats_per_image + num_dims * math.log(scale)) / (num_dims * math.log(2.0))
