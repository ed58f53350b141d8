"""Newton's method for the iterative inverse: the same answers in fewer evaluations."""

import math

import pytest
import torch

from pyro_invres import conditional_iresnet, iresnet
from pyro_invres.ops import FixedPoint, residual_inverse, solve_fixed_point


def _arctan_problem(c=0.99):
    """``x = f(x)`` with ``f(x) = x - (1 - c) x - c atan(x)``: ``Lip(f) = c``, root at 0.

    Plain Newton on ``F(x) = (1 - c) x + c atan(x)`` diverges from ``|x| >= 10`` (it
    overshoots into a cycle near +-153), so only the safeguard makes it converge.
    """

    def f_and_jacobian(x):
        fx = x - (1 - c) * x - c * torch.atan(x)
        slope = c * x**2 / (1 + x**2)  # f'(x) = 1 - (1 - c) - c / (1 + x^2)
        return fx, slope.unsqueeze(-1)

    return f_and_jacobian


def test_plain_newton_diverges_where_the_safeguarded_one_converges():
    fj = _arctan_problem()
    x = torch.tensor([[10.0]], dtype=torch.float64)
    for _ in range(50):  # unguarded Newton never comes back
        fx, jac = fj(x)
        x = x - (x - fx) / (1 - jac[..., 0])
    assert float(x.abs()) > 100
    start = torch.tensor([[10.0], [-30.0], [0.5]], dtype=torch.float64)
    root, info = solve_fixed_point(
        lambda x: fj(x)[0], start, contraction=0.99, method="newton", jacobian=fj, atol=1e-9
    )
    assert info.converged
    assert float(root.abs().max()) < 1e-9


def test_newton_agrees_with_fixed_point_in_far_fewer_evaluations():
    torch.manual_seed(0)
    block = iresnet(4, [32, 32], lipschitz=0.97, activation="sine").double()
    with torch.no_grad():
        for name, p in block.nn.named_parameters():
            if "original" in name:
                p.mul_(5)  # the bound binds: c = 0.97 is reached
    y = 3 * torch.randn(64, 4, dtype=torch.float64)

    def solve(method):
        jac = block.nn.forward_with_jacobian if method == "newton" else None
        return residual_inverse(
            block.nn, y, contraction=0.97, method=method, jacobian=jac, rtol=1e-10, atol=1e-10
        )

    with torch.no_grad():
        (x_fp, fp), (x_nt, nt) = solve("fixed_point"), solve("newton")
    assert fp.converged and nt.converged
    assert torch.allclose(x_nt, x_fp, atol=1e-8)
    with torch.no_grad():
        assert float((x_nt + block.nn(x_nt) - y).abs().max()) < 1e-9
    assert nt.iterations * 3 < fp.iterations


def test_newton_needs_a_jacobian_and_one_event_dimension():
    f = lambda x: 0.5 * torch.tanh(x)  # noqa: E731
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="method='newton' takes jacobian"):
        solve_fixed_point(f, x, method="newton")
    with pytest.raises(ValueError, match="and only it"):
        solve_fixed_point(f, x, jacobian=lambda x: (f(x), None))
    with pytest.raises(ValueError, match="one event dimension"):
        solve_fixed_point(f, x, method="newton", event_dim=2, jacobian=lambda x: (f(x), None))
    with pytest.raises(ValueError, match="needs jacobian"):
        residual_inverse(f, x, method="newton")


def test_block_refuses_newton_without_a_carried_jacobian():
    with pytest.raises(ValueError, match="forward_with_jacobian"):
        iresnet((2, 4, 4), [4], solver="newton")
    with pytest.raises(ValueError, match="forward_with_jacobian"):
        from pyro_invres.transforms import InvertibleResidual

        InvertibleResidual(torch.nn.Tanh(), 2, lipschitz=0.9, solver="newton")


@pytest.mark.parametrize("explicit", ["forward", "inverse"])
def test_newton_block_round_trip_and_gradcheck(explicit):
    torch.manual_seed(1)
    block = iresnet(3, [8], explicit=explicit, solver="newton", logdet="exact").double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    side = block._inverse if explicit == "forward" else block._call
    other = block._call if explicit == "forward" else block._inverse
    assert torch.allclose(other(side(x)), x, atol=1e-9)
    assert block.solve_stats.last.converged
    # the adjoint is one linear solve with (I + J_g(x*))^T: exact in x and the parameters
    assert torch.autograd.gradcheck(side, (x,))
    assert torch.autograd.gradcheck(lambda y: block.residual_logdet(side(y)), (x,))
    params = [p for p in block.parameters() if p.requires_grad]
    y = x.detach()
    g_newton = torch.autograd.grad((side(y) ** 3).sum(), params, allow_unused=True)
    block.solver = FixedPoint(**vars(block.solver))  # same tolerances, Banach steps
    g_fixed = torch.autograd.grad((side(y) ** 3).sum(), params, allow_unused=True)
    for a, b in zip(g_newton, g_fixed):
        if a is not None:
            assert torch.allclose(a, b, atol=1e-8)


def test_conditional_block_with_newton():
    torch.manual_seed(2)
    block = conditional_iresnet(2, 3, [16], solver="newton").double()
    context = torch.randn(5, 3, dtype=torch.float64)
    b = block.condition(context)
    z = torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(b.inv(b(z).clone()), z, atol=1e-9)
    assert b.solve_stats.last.iterations <= 8


def test_newton_float32_reaches_its_tolerance():
    torch.manual_seed(3)
    block = iresnet(2, [32, 32], lipschitz=0.97, activation="sine", solver="newton")
    with torch.no_grad():
        for name, p in block.nn.named_parameters():
            if "original" in name:
                p.mul_(5)
    z = torch.randn(256, 2)
    x = block(z)
    back = block._inverse(x.clone())
    info = block.solve_stats.last
    assert info.converged and math.isfinite(info.error)
    assert float((back - z).detach().norm(dim=-1).max()) < 1e-4
