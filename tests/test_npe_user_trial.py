"""A new user's trial of NPE sampling and scoring after the switch to Broyden's method.

The preset's residual blocks now solve the sampling direction by Broyden's method from the
inverse of the batch's average Jacobian (Newton's for any row left). These tests probe what
a user would: batches of very different observations, float64, gradients of draws against
finite differences, scoring draws against scoring fresh copies, round trips, saved state,
grad vs no-grad mode, and blocks pushed to ``lipschitz=0.99`` with contexts far apart, so
that one average Jacobian serves rows whose own Jacobians differ widely.
"""

from __future__ import annotations

import io

import pyro.distributions as dist
import pytest
import torch
from torch.distributions.transforms import ComposeTransform

from pyro_invres.flows import conditional_spline_residual_flow
from pyro_invres.npe import ConditionalFlow
from pyro_invres.transforms.conditional_dense_residual import ConditionalDenseResidual

F64 = torch.float64
PRIOR = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)
# observations of every kind at once: typical, at the prior's edge, zero, far outside
OBS = [[0.25, 0.3], [0.9, -1.5], [0.0, 0.0], [3.0, -4.0], [0.5, 1.9], [1e-30, 0.0]]


def _flow(dtype: torch.dtype = torch.float32) -> ConditionalFlow:
    """The preset in ConditionalFlow, its weights perturbed away from the identity.

    No training (seconds of CPU each time): perturbing every parameter gives the blocks
    context-dependent, far-from-identity Jacobians, which is what the solve must handle.
    """
    torch.manual_seed(0)
    transform = conditional_spline_residual_flow(2, 2, num_layers=2, hidden_dims=(16, 16))
    flow = ConditionalFlow(transform, 2, 2, support=PRIOR.support)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in transform.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for m in transform.modules():
            if isinstance(m, ConditionalDenseResidual):
                m.layer2.mul_(50.0)  # the cap binds: ||W2_hat|| = L
    return flow.to(dtype).eval()


def _sampler(flow: ConditionalFlow, x: torch.Tensor) -> ComposeTransform:
    return ComposeTransform(flow.transforms(x))


def test_batch_of_different_observations_matches_one_at_a_time() -> None:
    """The shared average Jacobian changes the start, not the answer: within the tolerance."""
    flow = _flow(F64)
    x = torch.tensor(OBS, dtype=F64)
    z = torch.randn(50, len(x), 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batch = _sampler(flow, x)(z)
        alone = torch.stack([_sampler(flow, x[i])(z[:, i].clone()) for i in range(len(x))], 1)
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_log_prob_of_draws_agrees_with_fresh_copies(dtype: torch.dtype) -> None:
    """Scoring a draw (cache: the exact base point) vs its copy (explicit r, no solve)."""
    flow = _flow(dtype)
    x = torch.tensor(OBS[:5], dtype=dtype)
    torch.manual_seed(3)
    q = flow.condition(x)
    with torch.no_grad():
        draws = q.sample((500,))
        cached = q.log_prob(draws)
        fresh = flow.condition(x).log_prob(draws.clone())
    assert torch.isfinite(fresh).all()
    torch.testing.assert_close(cached, fresh, rtol=0, atol=1e-8 if dtype == F64 else 5e-3)


def test_round_trip_base_to_theta_to_base_float64() -> None:
    flow = _flow(F64)
    x = torch.tensor(OBS, dtype=F64)
    z = torch.randn(200, len(x), 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theta = _sampler(flow, x)(z)
        back = _sampler(flow, x).inv(theta.clone())
    torch.testing.assert_close(back, z, rtol=0, atol=1e-8)


def test_gradient_of_a_draw_wrt_the_observation_matches_finite_differences() -> None:
    flow = _flow(F64)
    x0 = torch.tensor(OBS[:5], dtype=F64)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, len(x0), 2, dtype=F64, generator=g)
    w = torch.randn(4, len(x0), 2, dtype=F64, generator=g)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return (_sampler(flow, x)(z.clone()) * w).sum()

    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(x), x)
    fd = torch.zeros_like(x0)
    h = 1e-5
    with torch.no_grad():
        for i in range(x0.shape[0]):
            for j in range(x0.shape[1]):
                e = torch.zeros_like(x0)
                e[i, j] = h
                fd[i, j] = (objective(x0 + e) - objective(x0 - e)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-7)


def test_grad_mode_and_no_grad_give_the_same_draws() -> None:
    flow = _flow(F64)
    x = torch.tensor(OBS, dtype=F64)
    z = torch.randn(30, len(x), 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = _sampler(flow, x)(z.clone())
    graph = _sampler(flow, x.clone().requires_grad_(True))(z.clone())
    assert graph.requires_grad
    torch.testing.assert_close(graph.detach(), plain, rtol=0, atol=1e-9)


def test_state_dict_round_trip_gives_the_same_draws() -> None:
    flow = _flow(torch.float32)
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(99)  # a different initialisation, overwritten by the load
    twin = ConditionalFlow(
        conditional_spline_residual_flow(2, 2, num_layers=2, hidden_dims=(16, 16)),
        2,
        2,
        support=PRIOR.support,
    )
    twin.load_state_dict(torch.load(buffer))
    twin.eval()
    x = torch.tensor(OBS, dtype=torch.float32)
    torch.manual_seed(7)
    a = flow.condition(x).sample((100,))
    torch.manual_seed(7)
    b = twin.condition(x).sample((100,))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_stiff_block_with_far_apart_contexts(dtype: torch.dtype) -> None:
    """L = 0.99 with W2_hat W1_hat = -0.99 I: rows' Jacobians run from 0.01 I to I.

    Contexts scaled from 0.1 to 300 put some rows' hidden units at tanh' ~ 1 and others
    saturated, so the batch's average Jacobian is a poor start for every row.
    """
    g = torch.Generator().manual_seed(8)
    d, h = 3, 16
    layer = ConditionalDenseResidual(d, 3, hidden_dim=h, lipschitz=0.99).to(F64)
    q, _ = torch.linalg.qr(torch.randn(h, d, generator=g, dtype=F64))
    with torch.no_grad():
        layer.layer1[:, :-1] = q
        layer.layer2[:, :-1] = -0.99 * q.T
    layer = layer.to(dtype)
    scales = torch.logspace(-1, 2.5, 64, dtype=F64)[:, None]
    ctx = (torch.randn(64, 3, generator=g, dtype=F64) * scales).to(dtype)
    base = (2 * torch.randn(5, 64, d, generator=g, dtype=F64)).to(dtype)
    with torch.no_grad():
        theta = layer.condition(ctx)(base.clone())
        back = layer.condition(ctx).inv(theta.clone())  # explicit r: no solve
    atol = torch.finfo(dtype).eps ** 0.75
    # the stopping rule, with one float spacing of slack for the recomputation
    assert bool(((back - base).abs() <= atol * (1 + base.abs()) * 1.1).all())


@pytest.mark.parametrize("bias", [1e3, 1e4])
def test_float32_sampling_with_a_large_output_bias(bias: float) -> None:
    """The output bias b2 is not capped: training may make it large, the block stays exact.

    Solving r(z) = target puts z near target - b2; with |b2| = 1e3 float32's spacing there
    (6e-5) exceeds the old tolerance atol (1 + |target|) ~ 7e-6 at |target| ~ 1, so no float
    could satisfy it and sampling raised "did not reach atol" on a perfectly invertible
    block. The tolerance must not ask for less than the rounding of r's own terms.
    """
    torch.manual_seed(0)
    layer = ConditionalDenseResidual(3, 2, hidden_dim=16, lipschitz=0.9)
    with torch.no_grad():
        layer.layer2[:, -1] = bias
    t = layer.condition(torch.randn(8, 2))
    base = torch.randn(5, 8, 3)
    with torch.no_grad():
        theta = t(base.clone())
        back = t.inv(theta.clone())
    eps = torch.finfo(torch.float32).eps
    # within a few spacings of the terms r adds up (|theta| ~ |b2|)
    assert bool(((back - base).abs() <= 64 * eps * (1 + base.abs() + bias)).all())


def test_a_solve_that_runs_out_of_steps_says_how_far_it_got() -> None:
    torch.manual_seed(0)
    layer = ConditionalDenseResidual(3, 2, hidden_dim=16, lipschitz=0.99, max_iter=1).to(F64)
    with torch.no_grad():
        layer.layer2.mul_(100.0)
    t = layer.condition(torch.randn(8, 2, dtype=F64))
    with pytest.raises(RuntimeError, match=r"max_iter=1 steps .*: \d+ of 8 rows left, the worst"):
        with torch.no_grad():
            t(20 * torch.randn(8, 3, dtype=F64))
