"""torch.func transforms (issue 13, item 10).

The explicit side of an i-ResNet block is plain tensor code and runs under ``jacrev`` and
``vmap`` (with Pyro's validation on too). The iterative side stops on data-dependent
convergence tests and has a custom adjoint: there every transform, and a vectorised
backward pass, raises one clear error that names the alternatives.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_invres import iresnet

ALTERNATIVE = "torch.autograd.functional.jacobian"


def _block(explicit, **kwargs):
    torch.manual_seed(0)
    block = iresnet(2, [16], explicit=explicit, logdet="exact", **kwargs).double()
    block(torch.zeros(1, 2, dtype=torch.float64))  # first use (spectral norms), outside
    return block


def _base():
    return dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)


@pytest.fixture(params=[True, False], ids=["validation", "no-validation"])
def validation(request):
    pyro.enable_validation(request.param)
    return request.param


def test_jacrev_of_the_explicit_map_matches_autograd(validation):
    block = _block("forward")
    x = torch.tensor([0.4, -1.3], dtype=torch.float64)
    jac = torch.func.jacrev(block)(x)
    reference = torch.autograd.functional.jacobian(block, x)
    assert torch.allclose(jac, reference, atol=1e-12)
    assert (jac - torch.eye(2, dtype=torch.float64)).abs().max() > 1e-3  # not the identity


def test_jacrev_of_explicit_scoring_matches_autograd(validation):
    # explicit="inverse" scores data in one pass, its exact log-det from the carried Jacobian
    block = _block("inverse")

    def log_prob(y):
        return dist.TransformedDistribution(_base(), [block]).log_prob(y)

    y = torch.tensor([0.4, -1.3], dtype=torch.float64)
    grad = torch.func.jacrev(log_prob)(y)
    assert torch.allclose(grad, torch.autograd.functional.jacobian(log_prob, y), atol=1e-12)
    hessian = torch.func.jacrev(torch.func.jacrev(log_prob))(y)
    assert torch.allclose(hessian, torch.autograd.functional.hessian(log_prob, y), atol=1e-10)


def test_vmap_of_the_explicit_side_matches_the_batched_call(validation):
    x = torch.randn(5, 2, dtype=torch.float64)
    block = _block("forward")
    assert torch.allclose(torch.vmap(block)(x), block(x.clone()), atol=1e-12)
    block = _block("inverse")

    def log_prob(y):
        return dist.TransformedDistribution(_base(), [block]).log_prob(y)

    assert torch.allclose(torch.vmap(log_prob)(x), log_prob(x.clone()), atol=1e-12)


def test_validation_under_vmap_still_refuses_non_finite_values():
    pyro.enable_validation(True)
    block = _block("forward")
    x = torch.randn(5, 2, dtype=torch.float64)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        torch.vmap(block)(x)


def test_vmap_of_a_vjp_log_det_raises_a_clear_error():
    torch.manual_seed(0)
    block = iresnet(2, [16], explicit="inverse", logdet="series").double()
    block(torch.zeros(1, 2, dtype=torch.float64))

    def log_prob(y):
        return dist.TransformedDistribution(_base(), [block]).log_prob(y)

    with pytest.raises(RuntimeError, match="logdet='exact'"):
        torch.vmap(log_prob)(torch.randn(5, 2, dtype=torch.float64))


# jacfwd's first use loads torch's own forward-AD decompositions with torch.jit.script
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "newton"])
@pytest.mark.parametrize("explicit", ["forward", "inverse"])
def test_the_iterative_side_refuses_transforms_and_names_the_alternative(
    explicit, solver, validation
):
    block = _block(explicit, solver=solver)
    iterative = block.inv if explicit == "forward" else block
    y = torch.tensor([0.4, -1.3], dtype=torch.float64)
    for transform in (torch.func.jacrev, torch.func.jacfwd, torch.vmap):
        with pytest.raises(RuntimeError, match=ALTERNATIVE) as caught:
            transform(iterative)(y if transform is not torch.vmap else y.expand(3, 2))
        assert "iterative" in str(caught.value)
    with pytest.raises(RuntimeError, match=ALTERNATIVE):
        torch.func.grad(lambda t: iterative(t).sum())(y)
    # a vectorised backward pass (is_grads_batched) is refused the same way
    with pytest.raises(RuntimeError, match="vectorize=False"):
        torch.autograd.functional.jacobian(iterative, y, vectorize=True)
    # and the alternative it names works: the inverse's Jacobian is the explicit one's inverse
    jac = torch.autograd.functional.jacobian(iterative, y)
    explicit_map = block if explicit == "forward" else block.inv
    solution = iterative(y).detach()
    forward_jac = torch.autograd.functional.jacobian(explicit_map, solution)
    assert torch.allclose(jac @ forward_jac, torch.eye(2, dtype=torch.float64), atol=1e-8)


def test_a_pair_cached_inside_vmap_does_not_break_a_later_warm_start():
    block = _block("forward")
    block.train()
    torch.vmap(block)(torch.randn(4, 3, 2, dtype=torch.float64))  # caches wrapped tensors
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.01)  # the cached pair goes stale: a warm start would look at it
    y = torch.randn(3, 2, dtype=torch.float64)
    log_prob = dist.TransformedDistribution(_base(), [block]).log_prob(y)
    fresh = iresnet(2, [16], explicit="forward", logdet="exact").double()
    fresh.load_state_dict(block.state_dict())
    expected = dist.TransformedDistribution(_base(), [fresh]).log_prob(y)
    assert torch.allclose(log_prob, expected, atol=1e-8)
