"""Bad input gets a clear error; non-convergence is never silent."""

import pyro
import pytest
import torch

from pyro_invres import ConvergenceError, ConvergenceWarning, iresnet, residual_flow
from pyro_invres.ops import solve_fixed_point


@pytest.mark.parametrize("c", [0.0, 1.0, 1.5, -0.1])
def test_lipschitz_outside_open_unit_interval(c):
    with pytest.raises(ValueError, match="lipschitz"):
        iresnet(2, lipschitz=c)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("explicit", "sideways"),
        ("logdet", "magic"),
        ("activation", "swish"),
        ("solver", "broyden"),
        ("roulette", "binomial"),
        ("probe", "uniform"),
    ],
)
def test_unknown_option_values(option, value):
    with pytest.raises(ValueError, match=value):
        iresnet(2, **{option: value})


def test_wrong_event_shape_names_expected_and_got():
    block = iresnet(3)
    with pytest.raises(ValueError, match=r"\(3,\).*got shape \(5, 4\)"):
        block(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        block.inv(torch.randn(2))


def test_dtype_mismatch_is_named():
    block = iresnet(2)
    with pytest.raises(ValueError, match="float64"):
        block(torch.randn(3, 2, dtype=torch.float64))


def test_non_finite_inputs_rejected_while_validation_is_on():
    block = iresnet(2)
    bad = torch.tensor([[0.0, float("nan")]])
    with pytest.raises(ValueError, match="non-finite"):
        block(bad)
    with pytest.raises(ValueError, match="non-finite"):
        block.inv(torch.tensor([[float("inf"), 0.0]]))
    pyro.enable_validation(False)
    try:
        block(bad)  # no check, no cost, when the user turned validation off
    finally:
        pyro.enable_validation(True)


def test_bad_counts():
    with pytest.raises(ValueError, match="num_blocks"):
        residual_flow(2, num_blocks=0)
    with pytest.raises(ValueError, match="max_iter"):
        iresnet(2, max_iter=0)


def test_non_convergence_warns_with_residual_and_iterations():
    torch.manual_seed(0)
    block = iresnet(4, [32], lipschitz=0.97, max_iter=2).double()
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(5)
    y = 5 * torch.randn(8, 4, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match=r"error bound .* after 2 iterations"):
        block._inverse(y)
    assert block.solve_stats.last is not None and not block.solve_stats.last.converged
    strict = iresnet(4, [32], lipschitz=0.97, max_iter=2, strict=True).double()
    strict.load_state_dict(block.state_dict())
    with pytest.raises(ConvergenceError, match="did not converge"):
        strict._inverse(y)


def test_solver_reports_and_accelerates():
    torch.manual_seed(0)
    w = torch.randn(6, 6, dtype=torch.float64)
    w = 0.9 * w / torch.linalg.matrix_norm(w, ord=2)
    y = torch.randn(20, 6, dtype=torch.float64)

    def f(x):
        return y - torch.tanh(x @ w.T)

    x1, info1 = solve_fixed_point(f, y, contraction=0.9)
    x2, info2 = solve_fixed_point(f, y, contraction=0.9, method="anderson")
    assert info1.converged and info2.converged
    assert torch.allclose(x1, x2, atol=1e-8)
    assert info2.iterations < info1.iterations
    assert (x1 + torch.tanh(x1 @ w.T) - y).abs().max() < 1e-8


def test_empty_batch():
    block = iresnet(2)
    x = torch.zeros(0, 2)
    assert block(x).shape == (0, 2)
    assert block.inv(torch.zeros(0, 2)).shape == (0, 2)
    assert block.log_abs_det_jacobian(x, block(x)).shape == (0,)
