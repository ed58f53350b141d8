"""The batch-secant solver: as rigorous as the fixed point, fewer evaluations, never stuck."""

import math
import warnings

import pytest
import torch

from pyro_invres import conditional_iresnet
from pyro_invres.ops.fixed_point import (
    SECANT_MAX_DIM,
    ConvergenceError,
    ConvergenceWarning,
    Secant,
    as_solver,
    solve_fixed_point,
)


def _shared_map(dim: int, batch: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    """``f(x) = y - g(x)``, one ``g`` with ``Lip(g) <= 0.9`` for every sample.

    ``g(x) = A x + 0.05 sin(W x)``: a linear part with eigenvalues up to 0.85 in size (both
    signs; the Banach iteration contracts only by about 0.85 a step) and a mild curvature.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=dtype))
    eig = 0.85 * (2 * torch.rand(dim, generator=g, dtype=dtype) - 1)
    eig[0] = 0.85
    a = q @ torch.diag(eig) @ q.T
    w = torch.randn(dim, dim, generator=g, dtype=dtype)
    w = w / torch.linalg.matrix_norm(w, ord=2)
    y = 2 * torch.randn(batch, dim, generator=g, dtype=dtype)
    return (lambda x: y - x @ a.T - 0.05 * torch.sin(x @ w.T)), y


def _exact(f, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # to the rounding floor
        return solve_fixed_point(f, y, contraction=0.9, atol=1e-14, rtol=0.0, max_iter=5000)[0]


@pytest.mark.parametrize("dim", [2, 5, 10, 40])
def test_the_answer_is_within_the_bound_it_reports(dim: int) -> None:
    f, y = _shared_map(dim, 64, seed=dim)
    exact = _exact(f, y)
    x, info = solve_fixed_point(f, y, contraction=0.9, method="secant", atol=1e-8, rtol=0.0)
    assert info.converged
    assert float((x - exact).norm(dim=-1).max()) <= info.error + 1e-13 <= 1e-8 + 1e-13


@pytest.mark.parametrize("dim", [2, 10, 40])
def test_fewer_evaluations_than_the_fixed_point(dim: int) -> None:
    f, y = _shared_map(dim, 256, seed=1)
    _, banach = solve_fixed_point(f, y, contraction=0.9, atol=0.0, rtol=1e-8)
    _, secant = solve_fixed_point(f, y, contraction=0.9, atol=0.0, rtol=1e-8, method="secant")
    assert secant.converged and banach.converged
    assert secant.iterations <= 0.7 * banach.iterations


def test_samples_the_shared_model_does_not_fit_still_converge() -> None:
    # every sample contracts by 0.9 along its own rotation: the batch's mean Jacobian is ~0
    # and fits none of them, so the safeguard falls back to Banach steps
    angles = torch.linspace(0, 2 * math.pi, 65, dtype=torch.float64)[:-1]
    rot = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], -1)
    rot = 0.9 * rot.reshape(-1, 2, 2)
    y = torch.randn(64, 2, dtype=torch.float64)
    f = lambda x: y - torch.sin((rot @ x.unsqueeze(-1)).squeeze(-1))  # noqa: E731
    exact = _exact(f, y)
    x, info = solve_fixed_point(f, y, contraction=0.9, method="secant", atol=1e-9, rtol=0.0)
    assert info.converged
    assert float((x - exact).norm(dim=-1).max()) <= info.error + 1e-13


def test_non_finite_values_are_reported_not_hidden() -> None:
    f0, y = _shared_map(3, 8)

    def f(x: torch.Tensor) -> torch.Tensor:
        out = f0(x)
        out[5] = float("nan")
        return out

    with pytest.raises(ConvergenceError, match="non-finite"):
        solve_fixed_point(f, y, contraction=0.9, method="secant", strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = solve_fixed_point(f, y, contraction=0.9, method="secant")
    assert not info.converged and any(w.category is ConvergenceWarning for w in caught)


def test_options_and_limits() -> None:
    assert as_solver("secant") == Secant()
    assert Secant(ridge=0.1).options()["ridge"] == 0.1
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
        Secant(ridge=-1.0)
    big = torch.zeros(2, SECANT_MAX_DIM + 1)
    with pytest.raises(ValueError, match=f"at most {SECANT_MAX_DIM} numbers"):
        solve_fixed_point(lambda x: 0.5 * x, big, contraction=0.5, method="secant")


def test_float32_solves_to_the_default_tolerance() -> None:
    f, y = _shared_map(10, 512, dtype=torch.float32)
    x, info = solve_fixed_point(f, y, contraction=0.9, method="secant")
    assert info.converged
    assert float((x - f(x)).norm(dim=-1).max()) < 1e-4


def test_a_conditional_block_inverts_and_differentiates_the_same_with_either_solver() -> None:
    torch.manual_seed(0)
    block = conditional_iresnet(3, 2, [16], explicit="inverse").double()
    context = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for solver in (Secant(atol=1e-12, rtol=0.0), as_solver("fixed_point")):
        block.solver = solver
        block.solver = type(solver)(atol=1e-12, rtol=0.0)
        x = block.condition(context)(z)  # explicit="inverse": the forward solves
        torch.testing.assert_close(block.condition(context).inv(x), z, atol=1e-10, rtol=0)
        params = [z, context, *block.parameters()]
        grads.append(torch.autograd.grad((x**2).sum(), params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)
