"""Second derivatives through the iterative side (issue 13, item 2).

The iterative side's gradient is an implicit adjoint; a custom backward that builds no graph
makes every second derivative exactly zero (a Hessian of ``log_prob`` of 0, a Laplace
approximation with the prior's curvature missing). Each test compares the second
derivatives autograd gives (``create_graph=True``) with central finite differences of the
first derivatives, in float64, or asserts the clear error where none can be right.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoLaplaceApproximation

from pyro_invres import conditional_iresnet, iresnet
from pyro_invres.ops import residual_inverse

SOLVERS = ["fixed_point", "anderson", "newton"]
TIGHT = {"atol": 1e-13, "rtol": 1e-13}  # finite differences of the gradient need it


def _grad(f, x):
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(f(x), x)[0]


def _fd_jacobian(fn, x, eps=1e-6):
    """Columns d fn / d x_j by central differences (fn: tensor -> tensor)."""
    cols = []
    for j in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[j] = eps
        cols.append(((fn(x + e) - fn(x - e)) / (2 * eps)).reshape(-1))
    return torch.stack(cols, dim=-1)


def _block_and_score(explicit, solver):
    """A curved 2-D block and a scalar function of the input through its iterative side."""
    torch.manual_seed(0)
    block = iresnet(
        2, [16], explicit=explicit, logdet="exact", solver=solver, activation="sine", **TIGHT
    ).double()
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    if explicit == "forward":
        # scoring data: the inverse iterates
        def score(y):
            return dist.TransformedDistribution(base, [block]).log_prob(y).sum()
    else:
        # pushing forward: the forward map iterates, its log-det is taken at its output
        def score(x):
            y = block(x)
            return (base.log_prob(y) + block.log_abs_det_jacobian(x, y)).sum()

    return block, score


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("explicit", ["forward", "inverse"])
def test_hessian_in_the_input_matches_finite_differences(explicit, solver):
    block, score = _block_and_score(explicit, solver)
    y = torch.tensor([0.3, -0.7], dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(score, y)
    reference = _fd_jacobian(lambda t: _grad(score, t), y)
    assert torch.allclose(hessian, reference, atol=1e-8, rtol=1e-7)
    # the flow's curvature is really there (the base alone gives -I)
    assert (hessian + torch.eye(2, dtype=torch.float64)).abs().max() > 1e-2


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("explicit", ["forward", "inverse"])
def test_second_derivatives_in_a_parameter_match_finite_differences(explicit, solver):
    block, score = _block_and_score(explicit, solver)
    y = torch.tensor([[0.3, -0.7], [1.0, 0.2]], dtype=torch.float64)
    p = block.nn.net[2].parametrizations.weight.original  # a spectrally normalised weight
    rows = [0, 5, 17]

    def grad_p(value, at):
        with torch.no_grad():
            old = p.detach().clone()
            p.copy_(value)
        try:
            return torch.autograd.grad(score(at), p)[0].reshape(-1)[rows]
        finally:
            with torch.no_grad():
                p.copy_(old)

    yy = y.clone().requires_grad_(True)
    gp = torch.autograd.grad(score(yy), p, create_graph=True)[0].reshape(-1)
    in_p = torch.stack(
        [torch.autograd.grad(gp[i], p, retain_graph=True)[0].reshape(-1) for i in rows]
    )
    in_y = torch.stack(
        [torch.autograd.grad(gp[i], yy, retain_graph=True)[0].reshape(-1) for i in rows]
    )
    point = p.detach().clone()
    ref_p = _fd_jacobian(lambda t: grad_p(t, y), point)
    ref_y = _fd_jacobian(lambda t: grad_p(point, t), y)
    assert torch.allclose(in_p, ref_p, atol=1e-7, rtol=1e-6)
    assert torch.allclose(in_y, ref_y, atol=1e-7, rtol=1e-6)


def test_hessian_through_a_convolutional_block():
    torch.manual_seed(1)
    block = iresnet((1, 3, 3), [4], logdet="exact", activation="elu", **TIGHT).double()
    base = dist.Normal(torch.zeros(1, 3, 3, dtype=torch.float64), 1.0).to_event(3)

    def score(y):
        return dist.TransformedDistribution(base, [block]).log_prob(y.reshape(1, 3, 3)).sum()

    y = torch.randn(9, dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(score, y)
    assert torch.allclose(hessian, _fd_jacobian(lambda t: _grad(score, t), y), atol=1e-7)


def test_hessian_in_input_and_context_of_a_conditional_block():
    torch.manual_seed(2)
    cond = conditional_iresnet(2, 3, [16], logdet="exact", **TIGHT).double()
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    y = torch.tensor([0.4, -1.1], dtype=torch.float64)

    def score(both):
        block = cond.condition(both[2:])
        return dist.TransformedDistribution(base, [block]).log_prob(both[:2]).sum()

    point = torch.cat([y, torch.tensor([0.5, -0.2, 1.0], dtype=torch.float64)])
    hessian = torch.autograd.functional.hessian(score, point)
    assert torch.allclose(hessian, _fd_jacobian(lambda t: _grad(score, t), point), atol=1e-7)


def _contraction():
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=torch.float64)
    w = (0.8 * w / torch.linalg.matrix_norm(w, ord=2)).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    return w, b, y


@pytest.mark.parametrize("method", SOLVERS)
def test_gradgradcheck_residual_inverse(method):
    w, b, y = _contraction()

    def g(x):
        return torch.tanh(x @ w.T + b)

    def jacobian(x):
        t = torch.tanh(x @ w.T + b)
        return t, (1 - t**2).unsqueeze(-1) * w

    def inverse(y, w_, b_):
        x, _ = residual_inverse(
            g,
            y,
            contraction=0.8,
            params=(w, b),
            method=method,
            jacobian=jacobian if method == "newton" else None,
            **TIGHT,
        )
        return x

    assert torch.autograd.gradcheck(inverse, (y, w, b))
    assert torch.autograd.gradgradcheck(inverse, (y, w, b))


def test_third_derivatives_raise_instead_of_coming_out_wrong():
    y = torch.tensor([[0.3, -1.0]], dtype=torch.float64, requires_grad=True)
    x, _ = residual_inverse(lambda x: 0.5 * torch.sin(x), y, contraction=0.5)
    first = torch.autograd.grad((x**3).sum(), y, create_graph=True)[0]
    second = torch.autograd.grad(first.sum(), y)[0]  # a Hessian-vector product: exact
    assert second.shape == y.shape
    with pytest.raises(RuntimeError, match="third and higher derivatives"):
        torch.autograd.grad(first.sum(), y, create_graph=True)


def test_an_undeclared_tensor_refuses_second_derivatives_in_it():
    w, b, y = _contraction()

    def g(x):  # a plain function: w and b are captured, not declared
        return torch.tanh(x @ w.T + b)

    # first derivatives reach every captured tensor
    x, _ = residual_inverse(g, y, contraction=0.8)
    gw = torch.autograd.grad((x**3).sum(), w)[0]
    x, _ = residual_inverse(g, y, contraction=0.8, params=(w, b))
    assert torch.allclose(gw, torch.autograd.grad((x**3).sum(), w)[0])
    # second derivatives in y alone do not need them
    x, _ = residual_inverse(g, y, contraction=0.8)
    first = torch.autograd.grad((x**3).sum(), y, create_graph=True)[0]
    assert torch.autograd.grad(first.sum(), y)[0].abs().sum() > 0
    # in w they would: a clear error naming params=
    x, _ = residual_inverse(g, y, contraction=0.8)
    with pytest.raises(RuntimeError, match="params="):
        torch.autograd.grad((x**3).sum(), w, create_graph=True)


@pytest.mark.parametrize("gradient", ["neumann", "forward"])
def test_stochastic_logdet_gradients_refuse_second_derivatives(gradient):
    torch.manual_seed(0)
    block = iresnet(2, [8], explicit="inverse", logdet="roulette", gradient=gradient).double()
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    y = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    lp = dist.TransformedDistribution(base, [block]).log_prob(y).sum()
    with pytest.raises(RuntimeError, match="no second derivatives"):
        torch.autograd.grad(lp, y, create_graph=True)
    # first derivatives are unaffected
    lp = dist.TransformedDistribution(base, [block]).log_prob(y).sum()
    assert torch.isfinite(torch.autograd.grad(lp, y)[0]).all()


def test_forward_gradient_fallback_refuses_second_derivatives():
    # a context that requires grad sends gradient="forward" to the Neumann surrogate
    torch.manual_seed(0)
    cond = conditional_iresnet(2, 2, [8], logdet="roulette", gradient="forward").double()
    context = torch.randn(2, dtype=torch.float64, requires_grad=True)
    block = cond.condition(context)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    ladj = block.log_abs_det_jacobian(x, block(x)).sum()
    with pytest.raises(RuntimeError, match="no second derivatives"):
        torch.autograd.grad(ladj, context, create_graph=True)


@pytest.mark.parametrize("explicit", ["forward", "inverse"])
def test_laplace_approximation_with_an_iresnet_prior(explicit):
    # explicit="forward": the prior's log_prob inverts the block (second derivatives through
    # the fixed point); "inverse": it runs the explicit side (through the exact log-det)
    torch.manual_seed(0)
    block = iresnet(
        2, [16], explicit=explicit, logdet="exact", activation="sine", solver="newton", **TIGHT
    ).double()
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    data = torch.tensor([[0.8, -0.3], [1.1, 0.1], [0.5, -0.6]], dtype=torch.float64)
    noise = 0.7

    def model():
        z = pyro.sample("z", dist.TransformedDistribution(base, [block]))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Normal(z, noise).to_event(1), obs=data)

    guide = AutoLaplaceApproximation(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    for _ in range(200):
        svi.step()
    laplace = guide.laplace_approximation()
    covariance = laplace.get_posterior().covariance_matrix

    def neg_log_joint(z):
        prior = dist.TransformedDistribution(base, [block]).log_prob(z)
        return -(prior + dist.Normal(z, noise).to_event(1).log_prob(data).sum())

    z_map = guide.loc.detach().clone()
    gradient = _grad(neg_log_joint, z_map)
    assert gradient.abs().max() < 1e-3  # really at the MAP
    hessian = _fd_jacobian(lambda t: _grad(neg_log_joint, t), z_map)
    assert torch.allclose(covariance, torch.linalg.inv(hessian), atol=1e-7, rtol=1e-6)
    # the prior's curvature is in it: the likelihood alone gives noise^2 / n * I
    likelihood_only = noise**2 / len(data) * torch.eye(2, dtype=torch.float64)
    assert (covariance - likelihood_only).abs().max() > 1e-2


def test_a_singular_newton_adjoint_is_an_error_not_a_nan_gradient():
    """``I + J_g`` cannot be singular while ``Lip(g) < 1``; if a Jacobian says it is (the
    bound was broken), the gradient raises instead of coming back NaN or inf."""
    y = torch.tensor([[0.3, -0.2]], dtype=torch.float64, requires_grad=True)

    def g(x):
        return 0.5 * torch.sin(x)

    def lying_jacobian(x):  # J = -I: I + J is exactly singular
        eye = torch.eye(2, dtype=x.dtype).expand(*x.shape[:-1], 2, 2)
        return g(x), -eye

    def newton_g_jacobian(x):
        return g(x), torch.diag_embed(0.5 * torch.cos(x))

    x, _ = residual_inverse(g, y, contraction=0.5, method="newton", jacobian=newton_g_jacobian)
    (grad,) = torch.autograd.grad(x.sum(), y)
    assert torch.isfinite(grad).all()
    x, _ = residual_inverse(g, y, contraction=0.5, method="newton", jacobian=lying_jacobian)
    with pytest.raises(FloatingPointError, match="singular"):
        torch.autograd.grad(x.sum(), y)
