"""The iterative solvers report what they achieved, survive singular systems, and half precision.

Issue 13, items 3 (a stop at the rounding floor is not convergence), 8 (Anderson and Newton
never crash on a singular linear system) and 11 (float16 / bfloat16 work end to end).
Every number is compared in float64 against a known answer.
"""

import copy
import math
import re
import warnings

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import ComposeTransformModule

from pyro_invres import (
    ConvergenceError,
    ConvergenceWarning,
    actnorm,
    affine_coupling,
    glow,
    iresnet,
    residual_flow,
)
from pyro_invres.flows import base_shape
from pyro_invres.ops import (
    FixedPoint,
    default_tolerances,
    logdet_exact,
    logdet_from_jacobian,
    make_vjp,
    residual_inverse,
    solve_fixed_point,
)

F64 = torch.float64


def _negative_linear(c, dtype):
    """``y = x + g(x)`` with ``g(x) = -c x``: the inverse is ``y / (1 - c)`` exactly."""
    y = torch.tensor([[1.0, 2.0], [0.1, -0.3]], dtype=F64)
    return y.to(dtype), y / (1 - c)


def _true_error(x, exact):
    return (x.to(F64) - exact).norm(dim=-1)


def _rounding_slack(c, exact, dtype=torch.float32):
    """What the Banach bound cannot see: the rounding of ``f`` itself, ``~eps |x| / (1 - c)``."""
    return 2 * torch.finfo(dtype).eps * float(exact.norm(dim=-1).max()) / (1 - c)


# -- item 3: "converged" means the rigorous bound met the tolerance ---------------------------


@pytest.mark.parametrize("c", [0.99, 0.995])
def test_a_stop_at_the_float_floor_is_not_reported_as_converged(c):
    y, exact = _negative_linear(c, torch.float32)
    atol, rtol = default_tolerances(torch.float32)
    with pytest.warns(ConvergenceWarning, match="stopped shrinking at the rounding floor"):
        x, info = solve_fixed_point(lambda x: y + c * x, y, contraction=c, max_iter=20_000)
    err = _true_error(x, exact)
    tol = atol + rtol * x.to(F64).norm(dim=-1)
    # the true error really is beyond the tolerance (4.9x at c = 0.99 in float32)...
    assert float((err / tol).max()) > 2
    # ...and the solver says so, with a bound that covers the true error
    assert not info.converged and info.stalled
    assert info.error > info.tolerance
    assert float(err.max()) <= info.error + _rounding_slack(c, exact)
    with pytest.raises(ConvergenceError, match=r"error bound .* > tolerance .* rounding floor"):
        solve_fixed_point(lambda x: y + c * x, y, contraction=c, max_iter=20_000, strict=True)


def test_the_bound_reported_at_max_iter_covers_the_true_error():
    c = 0.9999  # the case: true error 483x the tolerance
    y, exact = _negative_linear(c, torch.float32)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        x, info = solve_fixed_point(lambda x: y + c * x, y, contraction=c)
    assert not info.converged
    err = float(_true_error(x, exact).max())
    assert err > 100 * info.tolerance
    assert err <= info.error + _rounding_slack(c, exact)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("c", [0.5, 0.9, 0.97, 0.99])
@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_converged_means_every_sample_is_within_its_tolerance(dtype, c, method):
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=F64)
    w = c * w / torch.linalg.matrix_norm(w, ord=2)
    y = torch.randn(32, 3, dtype=F64) * torch.logspace(-2, 2, 32, dtype=F64)[:, None]
    exact = torch.linalg.solve(torch.eye(3, dtype=F64) + w, y.T).T
    W, Y = w.to(dtype), y.to(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, info = solve_fixed_point(lambda x: Y - x @ W.T, Y, contraction=c, method=method)
    atol, rtol = default_tolerances(dtype)
    tol = atol + rtol * x.to(F64).norm(dim=-1)
    if info.converged:
        assert not caught
        assert bool((_true_error(x, exact) <= tol).all())
    else:  # never silent
        assert [w.category for w in caught] == [ConvergenceWarning]


@pytest.mark.parametrize("name", ["atol", "rtol"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1e-6, "1e-6", True])
def test_bad_tolerances_are_refused_naming_the_value(name, value):
    f = lambda x: 0.5 * torch.tanh(x)  # noqa: E731
    expected = re.escape(f"{name} must be a finite number >= 0, got {value!r}")
    with pytest.raises(ValueError, match=expected):
        solve_fixed_point(f, torch.zeros(2, 2), contraction=0.5, **{name: value})
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0"):
        iresnet(2, **{name: value})


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "newton"])
def test_default_float32_blocks_do_not_warn(solver):
    # the bound binds (weights scaled up), c = 0.97 as in `pyro-invres fit`, data far out
    torch.manual_seed(3)
    block = iresnet(2, [32, 32], lipschitz=0.97, activation="sine", solver=solver)
    with torch.no_grad():
        for name, p in block.nn.named_parameters():
            if "original" in name:
                p.mul_(5)
    z = 3 * torch.randn(512, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        x = block(z)
        back = block._inverse(x.detach().clone())
    info = block.solve_stats.last
    assert info.converged and info.error <= info.tolerance
    assert float((back.detach() - z).norm(dim=-1).max()) < 1e-3


# -- item 8: accelerated solvers survive singular systems and still find the inverse ----------


def _mixed_scale_problem(seed, dtype):
    """A linear ``f`` on a batch whose samples span five orders of magnitude.

    Small samples reach the rounding floor while large ones still iterate, so their
    Anderson differences become exactly parallel or zero: the least-squares system is
    singular (float32 ``torch.linalg.solve`` raised on seed 33 before the fix).
    """
    torch.manual_seed(seed)
    w = torch.randn(2, 2)
    w = (0.97 * w / torch.linalg.matrix_norm(w, ord=2)).to(F64)
    scales = torch.tensor([1e-3, 1.0, 30.0])[torch.randint(0, 3, (256, 1))]
    y = (torch.randn(256, 2) * scales).to(F64)
    exact = torch.linalg.solve(torch.eye(2, dtype=F64) + w, y.T).T
    return w, y, exact


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("seed", [33, 35])
def test_anderson_survives_an_exactly_linear_map(dtype, seed):
    w, y, exact = _mixed_scale_problem(seed, dtype)
    W, Y = w.to(dtype), y.to(dtype)
    x, info = solve_fixed_point(lambda x: Y - x @ W.T, Y, contraction=0.97, method="anderson")
    assert info.converged
    atol, rtol = default_tolerances(dtype)
    assert bool((_true_error(x, exact) <= atol + rtol * exact.norm(dim=-1)).all())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_anderson_survives_a_saturating_map_with_repeated_iterates(dtype):
    # tanh saturates: large samples see an exactly constant f and repeat their iterates
    torch.manual_seed(0)
    w = torch.randn(2, 2)
    w = (0.97 * w / torch.linalg.matrix_norm(w, ord=2)).to(dtype)
    scales = torch.tensor([1e-3, 1.0, 30.0])[torch.randint(0, 3, (256, 1))]
    y = (torch.randn(256, 2) * scales).to(dtype)

    def f(x):
        return y - torch.tanh(x @ w.T)

    x, info = solve_fixed_point(f, y, contraction=0.97, method="anderson")
    reference, ref_info = solve_fixed_point(
        lambda x: y.to(F64) - torch.tanh(x @ w.to(F64).T), y.to(F64), contraction=0.97
    )
    assert info.converged and ref_info.converged
    atol, rtol = default_tolerances(dtype)
    assert bool((_true_error(x, reference) <= atol + rtol * reference.norm(dim=-1)).all())


def test_anderson_history_of_identical_iterates_gives_the_banach_step():
    from pyro_invres.ops.fixed_point import _AndersonStepper

    stepper = _AndersonStepper(history=3, numel_event=2)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    fx = torch.tensor([[1.5, 1.0], [3.0, 4.0]], dtype=F64)  # the second sample is fixed
    step = (fx - x).norm(dim=-1)
    for _ in range(4):  # the same point again and again: every difference is zero
        proposal = stepper.propose(x, fx, None, stepper.accept(x, fx, step))
        assert torch.equal(proposal, fx)


def test_newton_survives_a_singular_jacobian_and_finds_the_inverse():
    c = 0.9
    y = torch.tensor([[0.3, -1.0], [2.0, 0.5], [-4.0, 3.0]], dtype=F64)

    def g(x):
        return c * torch.tanh(x)

    def f(x):
        return y - g(x)

    def singular(x):  # J_f = I: I - J_f is exactly singular at every point
        return f(x), torch.eye(2, dtype=F64).expand(*x.shape, 2)

    def not_finite(x):
        return f(x), torch.full((*x.shape, 2), math.nan, dtype=F64)

    for jacobian in (singular, not_finite):
        x, info = solve_fixed_point(f, y, contraction=c, method="newton", jacobian=jacobian)
        assert info.converged
        assert float((x + g(x) - y).abs().max()) < 1e-9


def test_accelerated_points_where_f_is_not_finite_fall_back():
    # f is NaN beyond |x| = 6, and a poor Jacobian (I - J_f = 0.001) throws every Newton
    # point there: each must be rejected for the Banach step, which converges
    c = 0.99
    y = torch.tensor([[5.0], [-5.0], [0.5]], dtype=F64)

    def f(x):
        return torch.where(x.abs() > 6, math.nan, y - c * torch.atan(x))

    def poor_jacobian(x):
        return f(x), torch.full((*x.shape, 1), 0.999, dtype=F64)

    x, info = solve_fixed_point(f, y, contraction=c, method="newton", jacobian=poor_jacobian)
    assert info.converged
    assert float((x + c * torch.atan(x) - y).abs().max()) < 1e-8


@pytest.mark.parametrize("solver", ["anderson", "newton"])
def test_accelerated_block_inverse_matches_float64_fixed_point(solver):
    torch.manual_seed(5)
    block = iresnet(2, [32, 32], lipschitz=0.97, activation="sine", solver=solver)
    with torch.no_grad():
        for name, p in block.nn.named_parameters():
            if "original" in name:
                p.mul_(5)
    scales = torch.tensor([1e-3, 1.0, 30.0])[torch.randint(0, 3, (1024, 1))]
    y = torch.randn(1024, 2) * scales
    with torch.no_grad():
        x = block._inverse(y)
        ref = copy.deepcopy(block).double()
        s = ref.solver  # the same tolerances, with Banach steps
        ref.solver = FixedPoint(atol=s.atol, rtol=s.rtol, max_iter=s.max_iter, strict=s.strict)
        x64 = ref._inverse(y.double())
    assert block.solve_stats.last.converged
    assert float(_true_error(x, x64).max()) < 1e-3 * (1 + float(x64.norm(dim=-1).max()))


# -- item 11: half precision works end to end ---------------------------------------------------

HALF = [torch.float16, torch.bfloat16]
# how far a half-precision log-density may be from float64 with the same weights (nats)
LOG_PROB_SLACK = {torch.float16: 0.05, torch.bfloat16: 0.5}


def _flows():
    return {
        "residual_flow": (lambda: residual_flow(4, num_blocks=2), (4,)),
        "residual_flow_inverse": (lambda: residual_flow(4, num_blocks=2, explicit="inverse"), (4,)),
        "residual_flow_newton": (lambda: residual_flow(4, num_blocks=2, solver="newton"), (4,)),
        "residual_flow_anderson": (lambda: residual_flow(4, num_blocks=2, solver="anderson"), (4,)),
        "coupling": (lambda: ComposeTransformModule([actnorm(4), affine_coupling(4, [16])]), (4,)),
        "glow": (lambda: glow((1, 4, 4), num_scales=1, steps_per_scale=2, hidden_channels=8), None),
    }


def _density(flow, dtype, shape):
    event = tuple(base_shape(flow, shape)) if len(shape) == 3 else shape
    base = dist.Normal(torch.zeros(event, dtype=dtype), torch.ones(event, dtype=dtype))
    return dist.TransformedDistribution(base.to_event(len(shape)), flow)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(_flows()))
def test_half_precision_flows_score_sample_and_invert(dtype, name):
    make, shape = _flows()[name]
    shape = shape or (1, 4, 4)
    torch.manual_seed(0)
    flow64 = make().double()
    data = torch.rand(16, *shape, dtype=F64) * 2 - 1
    with torch.no_grad():
        lp64 = _density(flow64, F64, shape).log_prob(data)  # initialises ActNorm
    flow = copy.deepcopy(flow64).to(dtype)
    d = _density(flow, dtype, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # the defaults are feasible here
        lp = d.log_prob(data.to(dtype).clone())
        assert lp.dtype == dtype
        assert float((lp.detach().to(F64) - lp64).abs().max()) < LOG_PROB_SLACK[dtype]
        lp.sum().backward()  # gradients through the log-det and the solves
        samples = d.sample((16,))
        assert samples.dtype == dtype and bool(torch.isfinite(samples).all())
        if len(shape) == 1:  # a vector flow: invert it block by block
            z = data.to(dtype).clone()
            with torch.no_grad():
                for t in flow:
                    z = t(z)
                for t in reversed(list(flow)):
                    z = t.inv(z.clone())
            assert float((z.to(F64) - data).abs().max()) < 20 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("d", [1, 2, 5])
def test_half_precision_log_det_is_computed_wide(dtype, d):
    torch.manual_seed(1)
    jac = 0.9 * torch.randn(8, d, d, dtype=F64) / d
    expected = torch.linalg.slogdet(jac + torch.eye(d, dtype=F64)).logabsdet
    value = logdet_from_jacobian(jac.to(dtype))
    assert value.dtype == dtype
    assert torch.allclose(value.to(F64), expected, atol=4 * torch.finfo(dtype).eps * d)
    x = torch.randn(8, d, dtype=F64).to(dtype).requires_grad_(True)
    w = (0.5 * torch.randn(d, d, dtype=F64) / d).to(dtype)
    exact = logdet_exact(make_vjp(x, x @ w.T, create_graph=True), x)
    reference = torch.linalg.slogdet(w.to(F64) + torch.eye(d, dtype=F64)).logabsdet
    assert exact.dtype == dtype
    assert torch.allclose(exact.to(F64), reference.expand(8), atol=4 * torch.finfo(dtype).eps * d)


def test_half_precision_solve_reports_what_it_reached():
    # bfloat16 cannot certify 1e-3: the solve says so instead of claiming convergence
    y = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    with pytest.warns(ConvergenceWarning, match=r"float32"):
        x, info = residual_inverse(
            lambda x: 0.9 * torch.tanh(x), y, contraction=0.9, atol=1e-3, rtol=1e-3
        )
    assert not info.converged and info.error > info.tolerance
