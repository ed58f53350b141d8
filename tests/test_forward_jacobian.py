"""The Jacobian a network carries forward, and the exact log-det built from it.

Every check is against autograd in float64: the carried Jacobian against
``torch.autograd.functional.jacobian``, the log-det against ``slogdet`` of that Jacobian,
and its gradients (in the parameters and the input) with ``gradcheck`` and against the
vector-Jacobian-product path it replaces.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_invres import conditional_iresnet, iresnet
from pyro_invres.nn import ConditionalLipschitzMLP, ContextBound, LipschitzMLP
from pyro_invres.nn.activations import CLipSwish, LipELU, LipSine, LipSwish
from pyro_invres.ops import logdet_exact, logdet_from_jacobian, make_vjp

ACTIVATIONS = ["lipswish", "clipswish", "elu", "sine"]


def autograd_jacobian(f, x):
    """``(B, D_out, D)`` from autograd, one sample at a time."""
    return torch.stack([torch.autograd.functional.jacobian(f, xi) for xi in x])


def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize(
    "activation", [LipSwish(beta=3.0), CLipSwish(beta=0.5), LipELU(), LipSine(omega=3.0)]
)
def test_activation_jacobian_matches_autograd(activation):
    act = activation.double()
    x = torch.randn(6, 5, dtype=torch.float64) * 3
    tangents = torch.randn(6, 3, 5, dtype=torch.float64)  # three tangent rows per sample
    y, jt = act.forward_with_tangents(x, tangents)
    assert torch.equal(y, act(x))
    expected = tangents @ autograd_jacobian(act, x).transpose(-1, -2)
    torch.testing.assert_close(jt, expected, rtol=1e-12, atol=1e-12)


def test_clipswish_refuses_image_layout():
    with pytest.raises(ValueError, match="vectors"):
        CLipSwish(dim=-3).forward_with_tangents(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, 1))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("split", ["equal", "learned"])
@pytest.mark.parametrize("hidden", [[], [7], [9, 6]])
def test_mlp_jacobian_matches_autograd(activation, split, hidden):
    torch.manual_seed(1)
    g = LipschitzMLP(3, hidden, lipschitz=0.9, activation=activation, split=split).double()
    perturb(g)
    x = torch.randn(4, 3, dtype=torch.float64)
    gx, jac = g.forward_with_jacobian(x)
    torch.testing.assert_close(gx, g(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac, autograd_jacobian(g, x), rtol=1e-10, atol=1e-12)


def test_mlp_jacobian_over_extra_batch_dims():
    g = LipschitzMLP(2, [8], lipschitz=0.9).double()
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    gx, jac = g.forward_with_jacobian(x)
    assert gx.shape == (3, 4, 2) and jac.shape == (3, 4, 2, 2)
    flat = autograd_jacobian(g, x.reshape(-1, 2)).reshape(3, 4, 2, 2)
    torch.testing.assert_close(jac, flat, rtol=1e-10, atol=1e-12)


def test_conditional_mlp_jacobian_matches_autograd():
    torch.manual_seed(2)
    g = ConditionalLipschitzMLP(2, 3, [8, 8], lipschitz=0.9, activation="clipswish").double()
    perturb(g)
    x = torch.randn(5, 2, dtype=torch.float64)
    context = torch.randn(5, 3, dtype=torch.float64)
    gx, jac = g.forward_with_jacobian(x, context)
    torch.testing.assert_close(gx, g(x, context), rtol=1e-12, atol=1e-12)
    jacobian = torch.autograd.functional.jacobian
    expected = torch.stack([jacobian(lambda v, c=c: g(v, c), xi) for xi, c in zip(x, context)])
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)
    bound = ContextBound(g, context)
    assert hasattr(bound, "forward_with_jacobian")
    torch.testing.assert_close(bound.forward_with_jacobian(x)[1], jac)


def test_context_bound_without_a_carried_jacobian_says_so():
    net = torch.nn.Bilinear(2, 3, 2)

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, context):
            return self.net(x, context)

    assert not hasattr(ContextBound(Wrapped(), torch.zeros(3)), "forward_with_jacobian")


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(1, 4),
    scale=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
)
def test_logdet_from_jacobian_matches_slogdet(d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(6, d, d, generator=g, dtype=torch.float64)
    jac = scale * jac / torch.linalg.matrix_norm(jac, ord=2)[:, None, None]
    expected = torch.linalg.slogdet(jac + torch.eye(d, dtype=torch.float64)).logabsdet
    torch.testing.assert_close(logdet_from_jacobian(jac), expected, rtol=1e-12, atol=1e-12)


def test_logdet_from_jacobian_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        logdet_from_jacobian(torch.zeros(3, 2, 1))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_logdet_from_jacobian_gradcheck(d):
    jac = 0.3 * torch.randn(4, d, d, dtype=torch.float64)
    jac.requires_grad_(True)
    assert torch.autograd.gradcheck(logdet_from_jacobian, (jac,))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("explicit", ["forward", "inverse"])
def test_block_logdet_and_gradients_equal_the_vjp_path(activation, explicit):
    """The carried Jacobian changes how the exact log-det is computed, not what it is."""
    torch.manual_seed(3)
    block = iresnet(2, [16, 16], activation=activation, split="learned", explicit=explicit)
    block = block.double()
    perturb(block.nn, seed=4)
    assert block._carries_jacobian()
    x0 = torch.randn(7, 2, dtype=torch.float64)

    def run(carry: bool):
        block._carries_jacobian = lambda: carry  # instance override for this comparison
        block.zero_grad()
        x = x0.clone().requires_grad_(True)  # a new tensor: not answered from the cache
        y = block(x) if explicit == "forward" else block.inv(x)
        ladj = block.log_abs_det_jacobian(*((x, y) if explicit == "forward" else (y, x)))
        ladj.sum().backward()
        grads = [p.grad.clone() for p in block.parameters() if p.grad is not None]
        return ladj.detach(), x.grad.clone(), grads

    ladj_j, dx_j, dp_j = run(True)
    ladj_v, dx_v, dp_v = run(False)
    del block._carries_jacobian
    torch.testing.assert_close(ladj_j, ladj_v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx_j, dx_v, rtol=1e-10, atol=1e-12)
    assert len(dp_j) == len(dp_v) > 0
    for a, b in zip(dp_j, dp_v):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_block_logdet_gradcheck_through_the_carried_jacobian():
    torch.manual_seed(5)
    block = iresnet(2, [8], activation="lipswish").double().eval()
    assert block._carries_jacobian()
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)

    def ladj(v):
        return block.residual_logdet(v)

    assert torch.autograd.gradcheck(ladj, (x,))
    assert torch.autograd.gradgradcheck(ladj, (x,))


def test_block_logdet_matches_autograd_jacobian_in_float64():
    torch.manual_seed(6)
    block = iresnet(2, [32, 32], activation="clipswish").double()
    perturb(block.nn, seed=7)
    x = torch.randn(10, 2, dtype=torch.float64)
    jac = autograd_jacobian(lambda v: v + block.nn(v), x)
    expected = torch.linalg.slogdet(jac).logabsdet
    torch.testing.assert_close(block.residual_logdet(x), expected, rtol=1e-12, atol=1e-12)
    vjp_path = logdet_exact(make_vjp(x.requires_grad_(), block.nn(x), False), x)
    torch.testing.assert_close(block.residual_logdet(x), vjp_path, rtol=1e-12, atol=1e-12)
    assert math.isfinite(float(expected.sum()))


def test_conditional_block_uses_the_carried_jacobian():
    torch.manual_seed(8)
    block = conditional_iresnet(2, context_dim=3, hidden_dims=[16]).double()
    conditioned = block.condition(torch.randn(3, dtype=torch.float64))
    assert conditioned._carries_jacobian()
    x = torch.randn(4, 2, dtype=torch.float64)
    jac = autograd_jacobian(lambda v: v + conditioned.nn(v), x)
    expected = torch.linalg.slogdet(jac).logabsdet
    torch.testing.assert_close(conditioned.residual_logdet(x), expected, rtol=1e-12, atol=1e-12)


def test_a_hooked_network_keeps_the_path_that_calls_it():
    block = iresnet(2, [8])
    assert block._carries_jacobian()
    seen = []
    handle = block.nn.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    assert not block._carries_jacobian()
    block.log_abs_det_jacobian(x := torch.randn(3, 2), block(x))
    assert seen  # the hook saw the evaluation that served the log-det
    handle.remove()
    assert block._carries_jacobian()


def test_only_the_exact_estimator_on_vectors_carries_the_jacobian():
    assert not iresnet(2, [8], logdet="roulette")._carries_jacobian()
    assert not iresnet(20, [8])._carries_jacobian()  # "auto" is roulette above 16 dims
    assert iresnet(20, [8], logdet="exact")._carries_jacobian()
