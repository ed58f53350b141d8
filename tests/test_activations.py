"""The activations are 1-Lipschitz, and CLipSwish's constant is tight."""

import pytest
import torch
from conftest import inflate
from torch.func import jacrev, vmap

from pyro_invres import iresnet
from pyro_invres.nn.activations import (
    CLIPSWISH_GAIN,
    CLipSwish,
    LipELU,
    LipSine,
    LipSwish,
    make_activation,
)


def _max_jacobian_norm(act: torch.nn.Module, x: torch.Tensor) -> float:
    jac = vmap(jacrev(act))(x).detach()  # (N, out, in)
    return float(torch.linalg.matrix_norm(jac, ord=2).max())


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0, 20.0])
@pytest.mark.parametrize("cls", [LipSwish, CLipSwish])
def test_swish_family_is_one_lipschitz_and_tight(cls, beta):
    act = cls(beta=beta).double()
    # the worst point is beta * x = 2.39936 for both; sample around it and broadly
    worst = 2.39936 / beta
    x = torch.cat(
        [
            torch.linspace(-30, 30, 4001, dtype=torch.float64) / beta,
            worst + torch.linspace(-1e-3, 1e-3, 101, dtype=torch.float64) / beta,
        ]
    ).reshape(-1, 1)
    norm = _max_jacobian_norm(act, x)
    assert norm <= 1.0
    assert norm >= 1.0 - 2e-4  # tight: the normalising constant is not loose


def test_clipswish_gain_constant_is_an_upper_bound():
    t = torch.linspace(-30, 30, 6_000_001, dtype=torch.float64)
    s = torch.sigmoid(t)
    a = s + t * s * (1 - s)
    exact = float(torch.sqrt(a**2 + (1 - a) ** 2).max())
    assert exact <= CLIPSWISH_GAIN < exact * (1 + 1e-5)


def test_clipswish_vector_jacobian_norm_is_the_largest_column():
    """Many coordinates at once: the bound holds for vectors, not just scalars."""
    torch.manual_seed(0)
    act = CLipSwish(beta=0.7).double()
    x = 4 * torch.randn(300, 5, dtype=torch.float64)
    x[0] = 2.39936 / 0.7  # every coordinate at the worst point
    norm = _max_jacobian_norm(act, x)
    assert 1.0 - 1e-4 <= norm <= 1.0


def test_clipswish_images_concatenate_channels():
    act = CLipSwish(dim=-3)
    assert act(torch.randn(2, 3, 4, 5)).shape == (2, 6, 4, 5)


@pytest.mark.parametrize("omega", [0.5, 4.0, 30.0])
def test_sine_is_one_lipschitz_and_tight(omega):
    act = LipSine(omega=omega).double()
    x = torch.linspace(-20, 20, 40001, dtype=torch.float64).reshape(-1, 1) / omega
    norm = _max_jacobian_norm(act, x)
    assert 1.0 - 1e-9 <= norm <= 1.0
    # a sum of many units is bounded by the product of the layer norms, not by the units
    g = iresnet(2, [64], activation="sine", activation_kwargs={"omega": omega}, lipschitz=0.9)
    g = g.nn.double().eval()
    inflate(g)  # so the normalisation binds: unnormalised, these weights give norms >> 1
    pts = 5 * torch.randn(2000, 2, dtype=torch.float64)
    jac = g.forward_with_jacobian(pts)[1].detach()  # checked against autograd elsewhere
    assert float(torch.linalg.matrix_norm(jac, ord=2).max()) <= 0.9 + 1e-9


def test_sine_starting_frequency_and_its_checks():
    act = make_activation("sine", omega=7.0)
    assert float(torch.nn.functional.softplus(act.raw_omega.detach())) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="omega must be positive"):
        make_activation("sine", omega=-1.0)
    with pytest.raises(ValueError, match="takes no option 'beta'"):
        make_activation("sine", beta=2.0)


def test_elu_is_one_lipschitz():
    x = torch.linspace(-10, 10, 2001, dtype=torch.float64).reshape(-1, 1)
    assert _max_jacobian_norm(LipELU().double(), x) <= 1.0 + 1e-12


@pytest.mark.parametrize("name", ["lipswish", "clipswish"])
@pytest.mark.parametrize("beta", [0.5, 16.0, 80.0])
def test_activation_beta_option_sets_the_starting_beta(name, beta):
    act = make_activation(name, beta=beta)
    start = float(torch.nn.functional.softplus(act.raw_beta.detach()))
    assert start == pytest.approx(beta, rel=1e-6)


def test_activation_options_are_checked():
    with pytest.raises(ValueError, match="takes no option 'beta'"):
        make_activation("elu", beta=2.0)
    with pytest.raises(ValueError, match="takes no option 'gamma'"):
        make_activation("lipswish", gamma=1.0)
    with pytest.raises(ValueError, match="beta must be positive"):
        make_activation("lipswish", beta=0.0)
    # ``dim`` is a layout hint that only CLipSwish uses
    assert isinstance(make_activation("elu", dim=-3), LipELU)
    assert make_activation("clipswish", dim=-3).dim == -3


def test_iresnet_passes_activation_options_to_every_activation():
    block = iresnet(2, [8, 8], activation_kwargs={"beta": 16.0})
    betas = [
        float(torch.nn.functional.softplus(m.raw_beta.detach()))
        for m in block.modules()
        if isinstance(m, LipSwish)
    ]
    assert betas == pytest.approx([16.0, 16.0])
    image = iresnet((2, 4, 4), [4], activation="clipswish", activation_kwargs={"beta": 3.0})
    assert [m.dim for m in image.modules() if isinstance(m, CLipSwish)] == [-3]
