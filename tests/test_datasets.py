import math

import pytest
import torch

from pyro_invres.datasets import DIGITS_LEVELS, TOY_DATASETS, bits_per_dim, load_digits, sample_toy


# -- toy densities ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_shape_dtype_and_scale(name):
    x = sample_toy(name, 2000, seed=0)
    assert x.shape == (2000, 2)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # "roughly unit-to-4 range": spread of order one, nearly everything inside [-5, 5]
    assert 0.5 < float(x.std(0).min()) and float(x.std(0).max()) < 3.0
    assert float(x.abs().quantile(0.99)) < 5.0


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_is_reproducible_from_a_seed(name):
    a = sample_toy(name, 300, seed=7)
    assert torch.equal(a, sample_toy(name, 300, seed=7))
    assert not torch.equal(a, sample_toy(name, 300, seed=8))


def test_toy_generator_is_advanced_and_global_rng_respected():
    g = torch.Generator().manual_seed(3)
    first, second = sample_toy("rings", 100, g), sample_toy("rings", 100, g)
    assert not torch.equal(first, second)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(first, sample_toy("rings", 100, g))
    torch.manual_seed(11)
    a = sample_toy("pinwheel", 50)
    torch.manual_seed(11)
    assert torch.equal(a, sample_toy("pinwheel", 50))


def test_toy_dtype_device_and_empty():
    x = sample_toy("checkerboard", 10, seed=0, dtype=torch.float64, device="cpu")
    assert x.dtype == torch.float64
    assert sample_toy("moons", 0, seed=0).shape == (0, 2)


def test_toy_structure():
    # 8gaussians: every point near one of eight centres on the circle of radius 2*sqrt(2)
    x = sample_toy("8gaussians", 4000, seed=1).double()
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 2 * math.sqrt(2) * torch.stack([angles.cos(), angles.sin()], -1)
    nearest = torch.cdist(x, centres).min(1)
    assert float(nearest.values.quantile(0.99)) < 1.3
    assert torch.bincount(nearest.indices, minlength=8).min() > 350
    # checkerboard: points sit in squares whose integer corners have an even sum
    x = sample_toy("checkerboard", 4000, seed=1).double() / 2
    assert (torch.floor(x).sum(1).remainder(2) == 0).all()
    # rings: radii cluster at 0.75, 1.5, 2.25, 3
    r = sample_toy("rings", 4000, seed=1).norm(dim=1)
    distance = (r.unsqueeze(1) - torch.tensor([0.75, 1.5, 2.25, 3.0])).abs().min(1).values
    assert float(distance.quantile(0.99)) < 0.3


def test_unknown_toy_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        sample_toy("banana", 10)
    for name in TOY_DATASETS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="non-negative"):
        sample_toy("moons", -1)
    with pytest.raises(TypeError):
        sample_toy("moons", 3, seed=1.5)


# -- digits ----------------------------------------------------------------------------------------
def test_digits_shapes_range_and_split():
    pytest.importorskip("sklearn")
    train, train_labels = load_digits("train", return_labels=True)
    test = load_digits("test")
    assert train.shape == (1438, 1, 8, 8) and test.shape == (359, 1, 8, 8)
    assert train_labels.shape == (1438,) and set(train_labels.tolist()) == set(range(10))
    assert len(load_digits("all")) == len(train) + len(test)
    for x in (train, test):
        assert x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) < 1.0
    # deterministic: the same split and noise every call
    assert torch.equal(train, load_digits("train"))
    assert torch.equal(test, load_digits("test", seed=0))
    with pytest.raises(ValueError, match="split"):
        load_digits("validation")


def test_digits_dequantisation_is_uniform_within_each_level():
    pytest.importorskip("sklearn")
    centres = load_digits("test", dequantize=False).double() * DIGITS_LEVELS
    levels = centres - 0.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    levels = levels.round()
    assert float(levels.min()) == 0.0 and float(levels.max()) == 16.0
    a = load_digits("test", seed=1).double() * DIGITS_LEVELS
    b = load_digits("test", seed=2).double() * DIGITS_LEVELS
    assert not torch.equal(a, b)
    # same split whatever the seed: each dequantised pixel lies in its own level's bin
    for x in (a, b):
        offset = x - levels
        assert float(offset.min()) > -1e-4 and float(offset.max()) < 1 + 1e-4
    # the noise is roughly uniform on [0, 1)
    u = a - levels
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(u.var()) - 1 / 12) < 0.01


# -- bits per dimension ----------------------------------------------------------------------------
def test_bits_per_dim_accounts_for_the_scaling():
    # uniform density on [0, 1)^D: NLL 0 on the scaled data is log2(17) bits on 17 levels
    assert bits_per_dim(0.0, 64) == pytest.approx(math.log2(17))
    # an NLL that exactly cancels the log-Jacobian of the scaling is 0 bits
    assert bits_per_dim(-64 * math.log(17), 64) == pytest.approx(0.0, abs=1e-12)
    # 8-bit images scaled by 1/256: a uniform model is 8 bits/dim
    assert bits_per_dim(0.0, 3 * 32 * 32, scale=256) == pytest.approx(8.0)
    assert bits_per_dim(100.0, 10, scale=1) == pytest.approx(100 / (10 * math.log(2)))
    nll = torch.tensor([0.0, 64 * math.log(2)])
    out = bits_per_dim(nll, 64)
    assert torch.allclose(out, torch.tensor([math.log2(17), math.log2(17) + 1]).to(out.dtype))
    with pytest.raises(ValueError):
        bits_per_dim(1.0, 0)
    with pytest.raises(ValueError):
        bits_per_dim(1.0, 4, scale=0)
