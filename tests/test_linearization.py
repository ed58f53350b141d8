"""The dense branch linearised at a point: vector-Jacobian products without autograd."""

import pytest
import torch

from pyro_invres import iresnet
from pyro_invres.nn import LipschitzMLP
from pyro_invres.nn.linearization import Linearization
from pyro_invres.ops import Roulette, Series

ACTIVATIONS = ["lipswish", "clipswish", "elu", "relu", "sine"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("split", ["equal", "learned"])
def test_products_match_autograd(activation, split):
    torch.manual_seed(0)
    g = LipschitzMLP(4, [9, 7], activation=activation, split=split).double()
    if split == "learned":
        with torch.no_grad():
            g.log_gains.normal_(0.0, 0.05)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    gx, lin = g.linearize(x)
    assert torch.equal(gx, g(x))  # the same operations as the forward pass
    u = torch.randn(3, 6, 4, dtype=torch.float64)  # a batch of 3 probes
    (ref,) = torch.autograd.grad(gx, x, u, is_grads_batched=True, retain_graph=True)
    torch.testing.assert_close(lin.vjp(u), ref, rtol=1e-12, atol=1e-12)
    assert not lin.vjp(u).requires_grad
    # the differentiable product: its gradient is the second derivative autograd gives
    w = torch.randn(6, 4, dtype=torch.float64)
    (first,) = torch.autograd.grad(gx, x, w, create_graph=True)
    params = list(g.parameters())
    expected = torch.autograd.grad(
        (first * u[0]).sum(), params, allow_unused=True, retain_graph=True
    )
    got = torch.autograd.grad((lin.graph_vjp(w) * u[0]).sum(), params, allow_unused=True)
    for a, b in zip(got, expected):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _estimate(block, x, linearized):
    block._linearizes = lambda: linearized  # instance override for this comparison
    torch.manual_seed(1)
    xx = x.clone().requires_grad_(True)
    memo = block._graph_at(xx)
    assert isinstance(memo[2], Linearization) == linearized
    value = block.residual_logdet(xx, memo)
    (value * torch.arange(1.0, 1.0 + len(x), dtype=x.dtype)).sum().backward()
    grads = [xx.grad] + [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in block.parameters()
    ]
    block.zero_grad()
    del block._linearizes
    return value.detach(), grads


@pytest.mark.parametrize("gradient", ["neumann", "backprop", "forward"])
@pytest.mark.parametrize("estimator", [Roulette, Series])
@pytest.mark.parametrize("dim", [2, 5])
def test_block_estimates_equal_the_autograd_path(gradient, estimator, dim):
    """Same probes and draws: the value and every gradient agree to rounding."""
    torch.manual_seed(0)
    block = iresnet(dim, [16, 16], explicit="inverse", logdet=estimator(gradient=gradient))
    block = block.double()
    x = torch.randn(7, dim, dtype=torch.float64)
    v_lin, g_lin = _estimate(block, x, True)
    v_ref, g_ref = _estimate(block, x, False)
    torch.testing.assert_close(v_lin, v_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_lin, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_block_linearizes_by_default_and_not_when_it_cannot():
    block = iresnet(20, [16])  # "auto": roulette above 16 dimensions
    assert block._linearizes()
    assert not iresnet(2, [16])._linearizes()  # exact log-det: its own carried Jacobian
    hooked = iresnet(20, [16])
    hooked.nn.net[0].register_forward_hook(lambda m, i, o: o)
    assert not hooked._linearizes()  # linearize would bypass the hook
    tanh = iresnet(20, [16])
    tanh.nn.net[1] = torch.nn.Tanh()  # no slopes: the autograd path
    assert not tanh._linearizes()
