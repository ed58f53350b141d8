"""Memory-efficient log-det gradients: Neumann series and gradient-in-forward."""

import math

import pytest
import torch
from conftest import inflate

from pyro_invres import iresnet


def block(mode, logdet="roulette", seed=0, dim=5):
    torch.manual_seed(seed)
    # an exact log-det takes no estimator options (they would not apply)
    options = {} if logdet == "exact" else {"gradient": mode, "n_exact_terms": 2}
    b = iresnet(dim, [24], logdet=logdet, **options).double()
    inflate(b.nn, 3.0)
    return b


def logdet_grads(b, x, weights, seed):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    y = b(x)
    ld = b.log_abs_det_jacobian(x, y)
    grads = torch.autograd.grad((ld * weights).sum(), [x, *b.parameters()], allow_unused=True)
    return ld.detach(), [g if g is not None else torch.zeros(()) for g in grads]


@pytest.mark.parametrize("weights_kind", ["uniform", "per-sample"])
def test_forward_mode_equals_neumann_exactly_even_with_sample_weights(weights_kind):
    x = torch.randn(12, 5, dtype=torch.float64)
    weights = torch.full((12,), 0.3, dtype=torch.float64)
    if weights_kind == "per-sample":
        weights = torch.rand(12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ld_n, g_n = logdet_grads(block("neumann"), x, weights, seed=7)
    ld_f, g_f = logdet_grads(block("forward"), x, weights, seed=7)
    assert torch.equal(ld_n, ld_f)  # the value is the estimate itself in both modes
    for a, b in zip(g_n, g_f):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("mode", ["neumann", "backprop", "forward"])
def test_value_is_the_estimate_not_a_surrogate(mode):
    x = torch.randn(6, 5, dtype=torch.float64)
    torch.manual_seed(11)
    b = block(mode)
    ld, _ = logdet_grads(b, x, torch.ones(6, dtype=torch.float64), seed=11)
    reference = block("backprop")
    with torch.no_grad():
        torch.manual_seed(11)
        y = reference(x)
        expected = reference.log_abs_det_jacobian(x, y)
    assert torch.allclose(ld, expected, atol=1e-12)


@pytest.mark.parametrize("mode", ["neumann", pytest.param("forward", marks=pytest.mark.slow)])
def test_neumann_gradient_is_unbiased_for_the_exact_gradient(mode):
    x = torch.randn(4, 5, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    _, exact = logdet_grads(block("neumann", logdet="exact"), x, weights, seed=0)
    b = block(mode)
    draws = [logdet_grads(b, x, weights, seed=s)[1] for s in range(300)]
    for i, reference in enumerate(exact):
        stack = torch.stack([d[i] for d in draws]).reshape(len(draws), -1)
        mean, se = stack.mean(0), stack.std(0) / math.sqrt(len(draws))
        assert ((mean - reference.reshape(-1)).abs() <= 4.5 * se + 1e-9).all(), i


def graph_size(tensor):
    """Number of autograd nodes reachable from a tensor (a proxy for retained memory)."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def test_neumann_graph_does_not_grow_with_the_number_of_terms():
    x = torch.randn(8, 5, dtype=torch.float64)
    sizes = {}
    for mode in ("neumann", "backprop"):
        for terms in (2, 20):
            b = iresnet(5, [16], logdet="series", n_series_terms=terms, gradient=mode).double()
            ld = b.log_abs_det_jacobian(x, b(x))
            sizes[mode, terms] = graph_size(ld)
    assert sizes["neumann", 20] == sizes["neumann", 2]
    # backprop keeps every term's products (a few nodes each, now that they are explicit
    # products of the kept weights and slopes rather than autograd double-backward nodes)
    assert sizes["backprop", 20] > 3 * sizes["backprop", 2]


def test_forward_mode_keeps_no_logdet_graph():
    x = torch.randn(8, 5, dtype=torch.float64)
    b = iresnet(5, [16], logdet="series", n_series_terms=10, gradient="forward").double()
    ld = b.log_abs_det_jacobian(x, b(x))
    plain = b.nn(x.clone().requires_grad_(True))
    assert graph_size(ld) <= graph_size(plain) + 4


def test_forward_mode_with_a_context_that_requires_grad_falls_back():
    from pyro_invres import conditional_iresnet

    torch.manual_seed(0)
    cond = conditional_iresnet(3, 2, [8], logdet="roulette", gradient="forward").double()
    context = torch.randn(2, dtype=torch.float64, requires_grad=True)
    blk = cond.condition(context)
    x = torch.randn(4, 3, dtype=torch.float64)
    ld = blk.log_abs_det_jacobian(x, blk(x))
    (grad,) = torch.autograd.grad(ld.sum(), [context])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_forward_mode_frees_its_stored_gradients_after_backward():
    """The stored input and parameter gradients are autograd-saved tensors: a backward
    pass that does not retain the graph frees them, even while the block's log-det memo
    still references the node that holds them."""
    b = block("forward")
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    ld = b.log_abs_det_jacobian(x, b(x))
    node = ld.grad_fn
    assert len(node.saved_tensors) == 1 + len(list(b.parameters()))
    ld.sum().backward()
    with pytest.raises(RuntimeError, match="freed|second time"):
        node.saved_tensors  # noqa: B018
