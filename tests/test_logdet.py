"""Log-det estimators: exact against autograd, stochastic ones against the exact value."""

import math

import pytest
import torch
from conftest import inflate

from pyro_invres import iresnet
from pyro_invres.ops import (
    logdet_exact,
    logdet_roulette,
    logdet_series,
    make_vjp,
    roulette_tail_probability,
    series_truncation_bound,
)


def trained_block(dim=4, c=0.9, steps=150, seed=0):
    """A block trained towards a large log-det, so truncation bias is visible."""
    torch.manual_seed(seed)
    block = iresnet(dim, [32], lipschitz=c, logdet="exact").double()
    inflate(block.nn)
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    x = torch.randn(64, dim, dtype=torch.float64)
    for _ in range(steps):
        loss = -block.log_abs_det_jacobian(x, block(x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    block.eval()
    return block


@pytest.fixture(scope="module")
def block_and_point():
    block = trained_block()
    x = torch.randn(3, 4, dtype=torch.float64).requires_grad_(True)
    gx = block.nn(x)
    vjp = make_vjp(x, gx, create_graph=False)
    exact = logdet_exact(vjp, x)
    jac = torch.stack([torch.autograd.functional.jacobian(block.nn, xi) for xi in x.detach()])
    return block, x, vjp, exact, jac


def test_exact_matches_slogdet(block_and_point):
    _, _, _, exact, jac = block_and_point
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype)
    assert torch.allclose(exact, torch.linalg.slogdet(eye + jac).logabsdet, atol=1e-10)
    # the trained block is far from the identity: the test below can see bias
    assert exact.abs().min() > 0.5


def exact_truncated(jac, n_terms):
    total = torch.zeros(jac.shape[0], dtype=jac.dtype)
    power = torch.eye(jac.shape[-1], dtype=jac.dtype).expand_as(jac)
    for k in range(1, n_terms + 1):
        power = power @ jac
        total = total + (-1) ** (k + 1) / k * power.diagonal(dim1=-2, dim2=-1).sum(-1)
    return total


@pytest.mark.parametrize("n_terms", [2, 5, 10])
def test_series_within_its_bias_bound(block_and_point, n_terms):
    _, x, vjp, exact, jac = block_and_point
    truncated = exact_truncated(jac, n_terms)
    assert ((truncated - exact).abs() <= series_truncation_bound(4, 0.9, n_terms)).all()
    # Hutchinson's estimate of the truncated series is unbiased for it
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [logdet_series(vjp, x, n_terms=n_terms, n_probes=32, generator=g) for _ in range(40)]
    )
    se = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - truncated).abs() <= 4 * se + 1e-12).all()
    assert (
        (draws.mean(0) - exact).abs() <= series_truncation_bound(4, 0.9, n_terms) + 4 * se
    ).all()


@pytest.mark.parametrize(("distribution", "param"), [("geometric", 0.5), ("poisson", 2.0)])
def test_roulette_is_unbiased(block_and_point, distribution, param):
    _, x, vjp, exact, jac = block_and_point
    g = torch.Generator().manual_seed(1)
    draws = torch.stack(
        [
            logdet_roulette(
                vjp, x, distribution=distribution, param=param, n_probes=16, generator=g
            )
            for _ in range(400)
        ]
    )
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert ((mean - exact).abs() <= 4 * se).all(), (mean, exact, se)
    # whereas the 2-term truncation the roulette starts from is visibly biased
    assert ((exact_truncated(jac, 2) - exact).abs() > 4 * se).any()


def test_roulette_tail_probabilities():
    assert roulette_tail_probability(0, "geometric", 0.5) == 1.0
    assert roulette_tail_probability(3, "geometric", 0.5) == pytest.approx(0.125)
    p = roulette_tail_probability(2, "poisson", 2.0)
    assert p == pytest.approx(1 - math.exp(-2) * (1 + 2))
    with pytest.raises(ValueError, match="unknown roulette"):
        roulette_tail_probability(1, "binomial", 0.5)


@pytest.mark.parametrize("logdet", ["series", "roulette"])
def test_estimates_are_differentiable_in_parameters_and_input(logdet):
    torch.manual_seed(0)
    options = {"n_series_terms": 4} if logdet == "series" else {}  # only where it applies
    block = iresnet(3, [8], logdet=logdet, **options).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = block(x)
    ladj = block.log_abs_det_jacobian(x, y)
    (ladj.sum() + y.sum()).backward()  # the output bias does not enter the Jacobian
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in block.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_auto_is_exact_for_small_and_roulette_for_large_dims():
    assert iresnet(4).logdet_method == "exact"
    assert iresnet(32, [8]).logdet_method == "roulette"
    assert iresnet(32, [8], exact_max_dim=64).logdet_method == "exact"


def test_logdet_under_no_grad_is_detached_and_equal():
    torch.manual_seed(0)
    block = iresnet(3, [8]).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with_grad = block.log_abs_det_jacobian(x, block(x))
    with torch.no_grad():
        y = block(x.clone())
        without = block.log_abs_det_jacobian(x, y)
    assert not without.requires_grad
    assert torch.allclose(with_grad, without)
