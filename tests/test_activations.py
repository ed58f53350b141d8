"""The activations are 1-Lipschitz, and CLipSwish's constant is tight."""

import pytest
import torch
from torch.func import jacrev, vmap

from pyro_invres.nn.activations import CLIPSWISH_GAIN, CLipSwish, LipELU, LipSwish


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


def test_elu_is_one_lipschitz():
    x = torch.linspace(-10, 10, 2001, dtype=torch.float64).reshape(-1, 1)
    assert _max_jacobian_norm(LipELU().double(), x) <= 1.0 + 1e-12
