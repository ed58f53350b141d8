"""Broyden's method with a shared starting inverse Jacobian (ops/broyden.py), and its use by
the conditional dense residual block (Newton for the rows it leaves)."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_invres.ops.broyden import broyden_solve
from pyro_invres.transforms.conditional_dense_residual import ConditionalDenseResidual

F64 = torch.float64
# the module (the package exports a factory of the same name)
cdr = importlib.import_module("pyro_invres.transforms.conditional_dense_residual")


def _problem(d: int, h: int, n: int, lip: float, seed: int, spread: float = 2.0):
    """Rows of ``z + W2 tanh(W1 z + b_row) = t`` with ``||W2|| ||W1|| = lip``."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(h, d, generator=g, dtype=F64)
    w2 = torch.randn(d, h, generator=g, dtype=F64)
    w1 = w1 / torch.linalg.matrix_norm(w1, ord=2)
    w2 = lip * w2 / torch.linalg.matrix_norm(w2, ord=2)
    shift = spread * torch.randn(n, h, generator=g, dtype=F64)

    def fn(z: torch.Tensor) -> torch.Tensor:
        return z + torch.tanh(z @ w1.T + shift) @ w2.T

    z_true = 1.5 * spread * torch.randn(n, d, generator=g, dtype=F64)
    fn.mean_jacobian = lambda z: (  # type: ignore[attr-defined]
        torch.eye(d, dtype=F64) + (w2 * (1 - torch.tanh(z @ w1.T + shift) ** 2).mean(0)) @ w1
    )
    return fn, fn(z_true), z_true


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 12),
    h=st.integers(1, 40),
    n=st.integers(1, 30),
    lip=st.floats(0.1, 0.97),
    seed=st.integers(0, 10_000),
)
def test_solves_every_row_to_the_tolerance(d: int, h: int, n: int, lip: float, seed: int) -> None:
    fn, t, z_true = _problem(d, h, n, lip, seed)
    tol = torch.full_like(t, 1e-11)
    # the identity as H_0 is enough for convergence; the rule alone decides "done"
    z, done, evaluations = broyden_solve(fn, t, t.clone(), torch.eye(d, dtype=F64), tol, 60)
    assert done.shape == (n,)
    residual = (fn(z) - t).abs().amax(-1)
    # a row reported done is within the tolerance, and Lip(z -> fn(z) - z) <= lip bounds
    # its distance to the exact solution
    assert bool((residual[done] <= 1e-11).all())
    err = (z - z_true).norm(dim=-1)
    assert bool((err[done] <= 1e-11 * d**0.5 / (1 - lip) + 1e-12).all())
    assert 1 <= evaluations <= 61
    if lip <= 0.9:
        assert bool(done.all()), (residual.max(), evaluations)


def test_superlinear_with_a_good_start_matrix() -> None:
    fn, t, z_true = _problem(10, 80, 500, 0.9, 1, spread=0.5)
    z0 = t.clone()
    # a good H_0 (the inverse of the rows' average Jacobian) beats the identity
    h0 = torch.linalg.inv(fn.mean_jacobian(t))
    tol = torch.full_like(t, 1e-10)
    _, done_eye, n_eye = broyden_solve(fn, t, z0, torch.eye(10, dtype=F64), tol, 60)
    z, done, n_good = broyden_solve(fn, t, z0, h0, tol, 60)
    assert bool(done.all()) and bool(done_eye.all())
    assert n_good < n_eye
    torch.testing.assert_close(z, z_true, atol=1e-8, rtol=0)


def test_reports_rows_it_did_not_finish() -> None:
    fn, t, _ = _problem(4, 16, 20, 0.9, 2)
    tol = torch.full_like(t, 1e-12)
    z, done, evaluations = broyden_solve(fn, t, t.clone(), torch.eye(4, dtype=F64), tol, 2)
    assert evaluations == 3 and not bool(done.all())
    # done rows are really done; the others are really not
    within = ((fn(z) - t).abs() <= tol).all(-1)
    assert torch.equal(within, done)


def test_done_rows_do_not_move_and_zero_steps_are_safe() -> None:
    fn, t, z_true = _problem(3, 8, 6, 0.5, 3)
    start = t.clone()
    start[:3] = z_true[:3]  # three rows start at their solution
    tol = torch.full_like(t, 1e-12)
    calls: list[torch.Tensor] = []

    def recording(z: torch.Tensor) -> torch.Tensor:
        calls.append(z.clone())
        return fn(z)

    z, done, _ = broyden_solve(recording, t, start, torch.eye(3, dtype=F64), tol, 40)
    assert bool(done.all()) and bool(torch.isfinite(z).all())
    for seen in calls:
        assert torch.equal(seen[:3], z_true[:3])


def test_non_finite_rows_return_to_the_start_and_are_not_done() -> None:
    def fn(z: torch.Tensor) -> torch.Tensor:
        out = z.clone()
        out[0] = float("nan")  # row 0 can never be solved
        return out

    t = torch.randn(3, 2, dtype=F64)
    start = t + 1.0
    z, done, _ = broyden_solve(fn, t, start, torch.eye(2, dtype=F64), torch.tensor(1e-10), 5)
    assert done.tolist() == [False, True, True]
    assert torch.equal(z[0], start[0])
    torch.testing.assert_close(z[1:], t[1:])


def test_refuses_negative_max_iter() -> None:
    with pytest.raises(ValueError, match="max_iter must be >= 0, got -1"):
        broyden_solve(
            lambda z: z, torch.zeros(1, 1), torch.zeros(1, 1), torch.eye(1), torch.tensor(1.0), -1
        )


def _trained_layer(d: int, c: int, h: int, lip: float, seed: int) -> ConditionalDenseResidual:
    torch.manual_seed(seed)
    layer = ConditionalDenseResidual(d, c, h, lipschitz=lip).double()
    with torch.no_grad():
        layer.layer2.mul_(500.0)  # far past the cap: Lip(g) = lip exactly
        layer.layer1[:, -1].normal_()
        layer.context_layer.mul_(3.0)
    return layer


@pytest.mark.parametrize("broyden_steps", [0, 1, 16])
def test_block_falls_back_to_newton_for_rows_broyden_leaves(
    broyden_steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cdr, "BROYDEN_STEPS", broyden_steps)
    layer = _trained_layer(6, 3, 48, 0.95, 0)
    t = layer.condition(torch.randn(50, 3, dtype=F64))
    theta = 4 * torch.randn(7, 50, 6, dtype=F64)
    z = t.inv(theta)  # explicit
    back = t(z.clone())  # sampling: solved
    torch.testing.assert_close(back, theta, atol=1e-9, rtol=0)


def test_block_solve_counts_broyden_steps_against_max_iter() -> None:
    layer = _trained_layer(6, 3, 48, 0.95, 1)
    layer.max_iter = 2
    t = layer.condition(torch.randn(50, 3, dtype=F64))
    with pytest.raises(RuntimeError, match=r"in max_iter=2 steps \(Broyden's, then Newton's\)"):
        t(4 * torch.randn(50, 6, dtype=F64))


def test_block_solve_of_an_empty_batch() -> None:
    layer = _trained_layer(3, 2, 8, 0.9, 0)
    t = layer.condition(torch.randn(2, dtype=F64))
    out = t(torch.zeros(0, 3, dtype=F64))
    assert out.shape == (0, 3)
