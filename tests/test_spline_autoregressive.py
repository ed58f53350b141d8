"""Spline autoregressive layers: masks, round trips, exact log-dets, batched contexts."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from pyro_invres.nn.masked_mlp import MaskedMLP
from pyro_invres.transforms.spline_autoregressive import (
    conditional_spline_autoregressive,
    spline_autoregressive,
)


def _trained(module: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> torch.nn.Module:
    """Random output weights, as after training (the layers start as the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


@pytest.mark.parametrize("order", [None, [2, 0, 3, 1]])
def test_masked_mlp_is_autoregressive_and_sees_the_context(order: list[int] | None) -> None:
    torch.manual_seed(0)
    net = _trained(MaskedMLP(4, 3, [20, 20], context_dim=2, order=order))
    depends, on_context = torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    # several points: at one point a dead relu can hide a dependence the masks allow
    for _ in range(8):
        x, c = torch.randn(4), torch.randn(2)
        jac_x = torch.autograd.functional.jacobian(lambda v, c=c: net(v, c), x)  # (4, 3, 4)
        depends |= jac_x.abs().sum(1) > 0
        jac_c = torch.autograd.functional.jacobian(lambda v, x=x: net(x, v), c)
        on_context |= jac_c.abs().sum((1, 2)) > 0
    rank = net.order
    assert torch.equal(depends, rank[:, None] > rank[None, :])
    # every coordinate, the first in rank order included, depends on the context
    assert bool(on_context.all())


def test_masked_mlp_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="hidden_dims"):
        MaskedMLP(3, 2, [])
    with pytest.raises(ValueError, match="permutation"):
        MaskedMLP(3, 2, [8], order=[0, 0, 1])
    net = MaskedMLP(3, 2, [8], context_dim=2)
    with pytest.raises(ValueError, match="context"):
        net(torch.randn(3))


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_round_trip_and_exact_logdet(dim: int) -> None:
    layer = _trained(spline_autoregressive(dim, [16, 16], count_bins=6, bound=3.0)).double()
    x = 2.5 * torch.randn(7, dim, dtype=torch.float64)  # inside and outside the bound
    y, ladj = layer.call_and_ladj(x, cached=False)
    assert torch.allclose(layer.inverse(y, cached=False), x, atol=1e-10)
    x2, ladj2 = layer.inverse_and_ladj(y, cached=False)
    assert torch.allclose(ladj2, ladj, atol=1e-10)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: layer.call(v, cached=False), x[i])
        assert torch.allclose(ladj[i], torch.linalg.slogdet(jac)[1], atol=1e-9)
        # triangular in the network's order
        rank = layer.nn.order
        assert bool((jac[rank[:, None] < rank[None, :]] == 0).all())


def test_conditional_batched_contexts_and_distribution() -> None:
    dim, ctx, n, batch = 3, 4, 5, 6
    layer = _trained(conditional_spline_autoregressive(dim, ctx, [16], order=[2, 1, 0])).double()
    contexts = torch.randn(batch, ctx, dtype=torch.float64)
    t = layer.condition(contexts)
    x = torch.randn(n, batch, dim, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x, cached=False)
    assert y.shape == (n, batch, dim) and ladj.shape == (n, batch)
    assert torch.allclose(t.inverse(y, cached=False), x, atol=1e-10)
    # each draw uses its own context: the same as conditioning on that context alone
    for b in range(batch):
        yb = layer.condition(contexts[b]).call(x[:, b], cached=False)
        assert torch.allclose(yb, y[:, b], atol=1e-12)
    base = dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1)
    q = dist.ConditionalTransformedDistribution(base, [layer]).condition(contexts[0])
    theta = q.sample((50,))
    z, back = t.inverse_and_ladj(theta[:, None].expand(50, batch, dim), cached=False)
    expected = base.log_prob(z[:, 0]) - back[:, 0]
    assert torch.allclose(q.log_prob(theta), expected, atol=1e-10)
    with pytest.raises(ValueError, match="context"):
        layer.condition(torch.randn(batch, ctx + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="expand"):
        layer.condition(contexts).call(torch.randn(n, batch + 1, dim, dtype=torch.float64))


def test_gradients_reach_the_network_and_context() -> None:
    layer = _trained(conditional_spline_autoregressive(2, 3, [8], count_bins=4)).double()
    context = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 2, dtype=torch.float64)

    def score(c: torch.Tensor) -> torch.Tensor:
        return layer.condition(c).inverse_and_ladj(y, cached=False)[1].sum()

    assert torch.autograd.gradcheck(score, (context,))
    score(context).backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in layer.parameters())
