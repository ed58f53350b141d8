"""The conditional one-hidden-layer residual block (ConditionalDenseResidual)."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_invres.transforms.conditional_dense_residual import (
    ConditionalDenseResidual,
    conditional_dense_residual,
)

F64 = torch.float64


def _trained(layer: ConditionalDenseResidual, seed: int = 0) -> None:
    """Weights as after training: W1 and W2 past their caps, a context layer of size 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, scale in ((layer.layer1, 1.0), (layer.layer2, 5.0), (layer.context_layer, 1.0)):
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _layer(explicit: str, d: int = 3, c: int = 2, h: int = 8, seed: int = 0, **kw):
    torch.manual_seed(seed)
    layer = ConditionalDenseResidual(d, c, h, explicit=explicit, **kw).double()
    _trained(layer, seed)
    return layer


def _block_logdets(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det| of each event's block of the autograd Jacobian of the batched map ``fn``,
    after checking that events do not mix (the off-diagonal blocks are zero)."""
    d = x.shape[-1]
    n = x.numel() // d
    jac = jacobian(fn, x).reshape(n, d, n, d)
    blocks = torch.stack([jac[i, :, i, :] for i in range(n)])
    own = torch.eye(n, dtype=torch.bool)[:, None, :, None].expand_as(jac)
    assert float(jac.masked_fill(own, 0).abs().max()) == 0.0
    return torch.linalg.slogdet(blocks)[1].reshape(x.shape[:-1])


@pytest.mark.parametrize("explicit", ["inverse", "forward"])
def test_log_det_both_directions_match_autograd(explicit: str) -> None:
    layer = _layer(explicit)
    t = layer.condition(torch.randn(4, 2, dtype=F64))
    x = torch.randn(3, 4, 3, dtype=F64)
    y, ladj = t.call_and_ladj(x, cached=False)
    assert y.shape == x.shape and ladj.shape == (3, 4)
    torch.testing.assert_close(ladj, _block_logdets(lambda u: t.call(u, cached=False), x))
    # the inverse returns the FORWARD log-det at its output: minus the inverse map's own
    back, ladj_inv = t.inverse_and_ladj(y, cached=False)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(ladj_inv, ladj)
    own = _block_logdets(lambda u: t.inverse(u, cached=False), y)
    torch.testing.assert_close(ladj_inv, -own)
    assert float(ladj.detach().abs().mean()) > 0.05  # the weights make the log-det far from zero


@pytest.mark.parametrize("explicit", ["inverse", "forward"])
def test_explicit_direction_is_the_residual_map(explicit: str) -> None:
    layer = _layer(explicit)
    c = torch.randn(4, 2, dtype=F64)
    t = layer.condition(c)
    u = torch.randn(4, 3, dtype=F64)
    r = u + layer(u, context=c)  # forward() is the branch g(u; c)
    w1, w2 = layer.weights()
    hidden = torch.tanh(u @ w1.T + c @ layer.context_layer.T + layer.layer1[:, -1])
    torch.testing.assert_close(r, u + hidden @ w2.T + layer.layer2[:, -1])
    mapped = t.call(u, cached=False) if explicit == "forward" else t.inverse(u, cached=False)
    torch.testing.assert_close(mapped, r)


@pytest.mark.parametrize("explicit", ["inverse", "forward"])
def test_round_trips_on_large_inputs(explicit: str) -> None:
    layer = _layer(explicit, d=4, c=3, h=16, seed=1)
    with torch.no_grad():
        layer.layer2.mul_(10.0)  # far past the cap: Lip_z(g) = 0.9 exactly
    t = layer.condition(torch.randn(5, 3, dtype=F64))
    x = 50 * torch.randn(7, 5, 4, dtype=F64)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(
                t.inverse(t.call(x, cached=False), cached=False), x, rtol=0, atol=1e-9
            )
            torch.testing.assert_close(
                t.call(t.inverse(x, cached=False), cached=False), x, rtol=0, atol=1e-9
            )


@pytest.mark.parametrize("explicit", ["inverse", "forward"])
def test_float32_newton_on_large_values(explicit: str) -> None:
    # the tolerance is relative: float32 cannot resolve 7e-6 on a value of size 300
    layer = _layer(explicit, d=4, c=3, h=16, seed=2).float()
    t = layer.condition(torch.randn(3))
    x = 300 * torch.randn(64, 4)
    with torch.no_grad():
        back = t.inverse(t.call(x, cached=False), cached=False)
        torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-3)


def test_the_caps_hold_and_bind() -> None:
    layer = _layer("inverse", d=4, c=2, h=6)
    with torch.no_grad():
        layer.layer1.mul_(5.0)
        layer.layer2.mul_(5.0)
    w1, w2 = layer.weights()
    s1, s2 = torch.linalg.svdvals(w1)[0], torch.linalg.svdvals(w2)[0]
    torch.testing.assert_close(s1, torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(s2, torch.tensor(0.9, dtype=F64))
    # the branch's Jacobian in z has norm <= 0.9 whatever the context (V is free)
    for scale in (0.0, 1.0, 30.0):
        c = scale * torch.randn(2, dtype=F64)
        for z in torch.randn(5, 4, dtype=F64):
            jac = jacobian(lambda u, c=c: layer(u, context=c), z)
            assert float(torch.linalg.matrix_norm(jac, ord=2)) <= 0.9 + 1e-12
    # small weights are left alone
    small = ConditionalDenseResidual(4, 2, 6).double()
    torch.testing.assert_close(small.weights()[1], small.layer2[:, :-1])


def test_starts_near_the_identity() -> None:
    torch.manual_seed(0)
    t = conditional_dense_residual(3, 2, hidden_dim=32).condition(torch.randn(2))
    z = torch.randn(50, 3)
    with torch.no_grad():
        assert float((t(z) - z).abs().max()) < 0.05
        assert float(t.log_abs_det_jacobian(z, t(z)).abs().max()) < 0.05


@pytest.mark.parametrize("explicit", ["inverse", "forward"])
def test_context_batches_and_bad_contexts(explicit: str) -> None:
    layer = ConditionalDenseResidual(3, 2, 8, explicit=explicit)
    t = layer.condition(torch.randn(4, 2))
    assert t.event_shape == (3,) and t._cache_size == 1
    assert t(torch.randn(4, 3)).shape == (4, 3)
    assert t.inv(torch.randn(6, 4, 3)).shape == (6, 4, 3)
    assert layer.condition(torch.randn(2))(torch.randn(6, 5, 3)).shape == (6, 5, 3)
    for call in (t, t.inv):
        with pytest.raises(ValueError, match=r"\(4,\).*\(5,\)"):
            call(torch.randn(5, 3))
        with pytest.raises(ValueError, match=r"\(4,\).*\(4, 5\)"):
            call(torch.randn(4, 5, 3))  # (4,) broadcasts with (4, 5) but does not expand
    with pytest.raises(ValueError, match=r"context_dim=2.*\(4, 3\)"):
        layer.condition(torch.randn(4, 3))
    with pytest.raises(ValueError, match="context_dim=2"):
        layer.condition(torch.tensor(1.0))
    with pytest.raises(ValueError, match="dtype"):
        layer.condition(torch.randn(2, dtype=F64))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0, 2), {}, "input_dim"),
        ((3, -1), {}, "context_dim"),
        ((3, 2, 2.5), {}, "hidden_dim"),
        ((3, 2, True), {}, "hidden_dim"),
        ((3, 2, 8, 1.0), {}, "lipschitz"),
        ((3, 2, 8, 0.0), {}, "lipschitz"),
        ((3, 2, 8, float("nan")), {}, "lipschitz"),
        ((3, 2), {"explicit": "both"}, "explicit"),
        ((3, 2), {"cache_size": 2}, "cache_size"),
        ((3, 2), {"max_iter": 0}, "max_iter"),
    ],
)
def test_constructor_refuses_bad_arguments(args, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ConditionalDenseResidual(*args, **kwargs)


@pytest.mark.parametrize("name", ["layer1", "layer2", "context_layer"])
def test_non_finite_weights_name_the_layer(name: str) -> None:
    layer = ConditionalDenseResidual(3, 2, 8)
    with torch.no_grad():
        getattr(layer, name)[0, -1] = float("nan")  # a bias in the first two
    t = layer.condition(torch.randn(2))
    with pytest.raises(ValueError, match=rf"\['{name}'\]"):
        t(torch.randn(4, 3))
    with pytest.raises(ValueError, match=rf"\['{name}'\]"):
        t.inv(torch.randn(4, 3))


@pytest.mark.parametrize("explicit", ["inverse", "forward"])
def test_newton_failure_names_the_block(explicit: str) -> None:
    layer = _layer(explicit, max_iter=1)
    with torch.no_grad():
        layer.layer2.mul_(10.0)
    t = layer.condition(torch.randn(2, dtype=F64))
    solve = t.inverse if explicit == "forward" else t.call
    with pytest.raises(RuntimeError, match=rf"ConditionalDenseResidual \(explicit='{explicit}'\)"):
        solve(20 * torch.randn(8, 3, dtype=F64), cached=False)
    layer.max_iter = 50
    solve(20 * torch.randn(8, 3, dtype=F64), cached=False)  # converges with enough steps


def test_gradcheck_parameters_and_context() -> None:
    layer = _layer("inverse", d=2, c=2, h=3)
    names = ("layer1", "layer2", "context_layer")

    class Run(torch.nn.Module):
        def __init__(self, newton: bool) -> None:
            super().__init__()
            self.layer, self.newton = layer, newton

        def forward(self, c, z):
            # the block is built inside, so it reads the parameters functional_call swaps in
            t = self.layer.condition(c)
            if self.newton:  # explicit="inverse": the forward is solved
                out, ladj = t.call_and_ladj(z, cached=False)
            else:
                out, ladj = t.inverse_and_ladj(z, cached=False)
            # one output: gradcheck skips an output that does not require grad
            return torch.cat([out, ladj.unsqueeze(-1)], dim=-1)

    def run(newton: bool):
        def fn(l1, l2, v, c, z):
            params = {"layer.layer1": l1, "layer.layer2": l2, "layer.context_layer": v}
            return torch.func.functional_call(Run(newton), params, (c, z))

        return fn

    inputs = [getattr(layer, n).detach().clone().requires_grad_() for n in names]
    inputs += [torch.randn(2, 2, dtype=F64, requires_grad=True)]
    inputs += [torch.randn(2, 2, dtype=F64, requires_grad=True)]
    assert torch.autograd.gradcheck(run(False), inputs)  # the explicit direction
    # the direction solved by Newton: its gradient is the implicit function's
    assert torch.autograd.gradcheck(run(True), inputs, atol=1e-6)
    # and in the module: every parameter and the context get a gradient
    c = torch.randn(4, 2, dtype=F64, requires_grad=True)
    layer.condition(c).inv(torch.randn(5, 4, 2, dtype=F64)).sum().backward()
    for p in (*[getattr(layer, n) for n in names], c):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


@pytest.mark.parametrize("explicit", ["inverse", "forward"])
def test_in_a_pyro_conditional_transformed_distribution(explicit: str) -> None:
    layer = _layer(explicit)
    n, b = 6, 4
    base = dist.Normal(torch.zeros(b, 3, dtype=F64), torch.ones(b, 3, dtype=F64)).to_event(1)
    flow = dist.ConditionalTransformedDistribution(base, [layer])
    c = torch.randn(b, 2, dtype=F64)
    q = flow.condition(c)
    theta = torch.randn(b, 3, dtype=F64)
    assert q.log_prob(theta).shape == (b,)
    draws = q.sample((n,))
    assert draws.shape == (n, b, 3)
    t = layer.condition(c)
    if explicit == "inverse":  # z = r(theta), log q = log N(z) + log det J_r(theta)
        z = t.inverse(draws.clone(), cached=False)
        log_det = _block_logdets(lambda u: t.inverse(u, cached=False), draws)
    else:  # z = r^{-1}(theta), log q = log N(z) - log det J_r(z)
        z = t.inverse(draws.clone(), cached=False)
        log_det = -_block_logdets(lambda u: t.call(u, cached=False), z)
    direct = base.log_prob(z) + log_det
    torch.testing.assert_close(q.log_prob(draws), direct)  # the cached pair
    torch.testing.assert_close(q.log_prob(draws.clone()), direct)  # recomputed
    # one context for a whole batch of draws, through a batch-free base
    base1 = dist.Normal(torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)).to_event(1)
    q1 = dist.ConditionalTransformedDistribution(base1, [layer]).condition(c[0])
    assert q1.sample((n,)).shape == (n, 3) and q1.log_prob(theta).shape == (b,)
