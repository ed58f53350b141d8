"""PixelResidual (pixelwise i-ResNet block) and the glow_residual preset.

Exactness claims are checked in float64 against autograd: the per-pixel log-det against
the full image Jacobian, the inverse's gradients (one Newton step carries the implicit
function's derivative) by gradcheck, and the whole preset's log-density against the
change of variables with an autograd Jacobian.
"""

from __future__ import annotations

import importlib
import math

import pyro.distributions as dist
import pytest
import torch

from pyro_invres.flows import base_shape, glow, glow_residual
from pyro_invres.transforms.inverse import Inverse
from pyro_invres.transforms.pixel_residual import PixelResidual, pixel_residual

# the module (the package exports a factory of the same name)
pr = importlib.import_module("pyro_invres.transforms.pixel_residual")


def _strong_block(shape=(3, 2, 2), hidden=5, lipschitz=0.9, seed=0) -> PixelResidual:
    """A float64 block far from the identity: caps binding, tanh well inside its bend."""
    torch.manual_seed(seed)
    block = PixelResidual(shape, hidden, lipschitz).double()
    with torch.no_grad():
        block.layer1.copy_(2.0 * torch.randn_like(block.layer1))
        block.layer2.copy_(3.0 * torch.randn_like(block.layer2))
        # small hidden biases: tanh is used in its bend, not saturated (slopes near 1)
        block.layer1[:, -1].mul_(0.1)
    return block


def _image_jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """``log|det dfn/dx|`` of one image from autograd's full Jacobian."""
    shape = x.shape
    jac = torch.autograd.functional.jacobian(
        lambda v: fn(v.reshape(1, *shape)).reshape(-1), x.reshape(-1)
    )
    return torch.linalg.slogdet(jac)[1]


def test_logdet_matches_autograd_jacobian_float64():
    block = _strong_block()
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    y, ladj = block.call_and_ladj(x, cached=False)
    assert y.shape == x.shape and ladj.shape == (3,)
    for i in range(3):
        expected = _image_jacobian_logdet(lambda v: block.call(v, cached=False), x[i])
        torch.testing.assert_close(ladj[i], expected, rtol=0, atol=1e-10)
    # the block is far from the identity and nonlinear (its log-det varies from image to
    # image): a test at the identity, where every log-det is 0, could not fail
    jac = torch.autograd.functional.jacobian(lambda v: block.call(v, cached=False), x[:1])
    assert (jac.reshape(12, 12) - torch.eye(12, dtype=torch.float64)).abs().max() > 0.1
    assert ladj.max() - ladj.min() > 0.01


def test_pixels_do_not_interact():
    block = _strong_block()
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    x2 = x.clone()
    x2[..., 0, 0] += 1.0
    changed = (block.call(x, cached=False) != block.call(x2, cached=False)).any(1)
    assert changed[0].tolist() == [[True, False], [False, False]]


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_round_trip_both_ways(dtype, atol):
    block = _strong_block(shape=(4, 3, 3), hidden=7, lipschitz=0.95).to(dtype)
    x = 2 * torch.randn(16, 4, 3, 3, dtype=dtype)
    y, ladj = block.call_and_ladj(x, cached=False)
    x_back, ladj_back = block.inverse_and_ladj(y, cached=False)
    torch.testing.assert_close(x_back, x, rtol=0, atol=atol)
    torch.testing.assert_close(ladj_back, ladj, rtol=0, atol=100 * atol)
    y2 = 2 * torch.randn(16, 4, 3, 3, dtype=dtype)
    torch.testing.assert_close(
        block.call(block.inverse(y2, cached=False), cached=False), y2, rtol=0, atol=atol
    )


def test_newton_alone_finishes_what_broyden_leaves(monkeypatch):
    monkeypatch.setattr(pr, "BROYDEN_STEPS", 0)
    block = _strong_block()
    y = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    x = block.inverse(y, cached=False)
    torch.testing.assert_close(block.call(x, cached=False), y, rtol=0, atol=1e-10)


def test_inverse_reports_when_it_cannot_converge():
    block = PixelResidual((3, 2, 2), 5, 0.95, max_iter=1, atol=1e-300).double()
    with torch.no_grad():
        block.layer1.copy_(2.0 * torch.randn_like(block.layer1))
        block.layer2.copy_(3.0 * torch.randn_like(block.layer2))
    with pytest.raises(RuntimeError, match="did not reach"):
        block.inverse(5 * torch.randn(4, 3, 2, 2, dtype=torch.float64), cached=False)


def test_lipschitz_cap_holds():
    block = _strong_block(lipschitz=0.7)
    raw1, raw2 = block.layer1[:, :-1], block.layer2[:, :-1]
    # without the caps the branch would not be a contraction
    assert torch.linalg.matrix_norm(raw1, 2) * torch.linalg.matrix_norm(raw2, 2) > 1
    w1, w2 = block.weights()
    assert torch.linalg.matrix_norm(w1, 2) <= 1 + 1e-12
    assert torch.linalg.matrix_norm(w2, 2) <= 0.7 + 1e-12
    # aligned weights reach the bound: g(v) = 0.7 tanh(v) per channel, slope 0.7 at 0
    with torch.no_grad():
        block.layer1.zero_()
        block.layer2.zero_()
        block.layer1[:3, :3] = 5 * torch.eye(3)
        block.layer2[:3, :3] = 5 * torch.eye(3)
    w1, w2 = block.weights()
    # per pixel |g(a) - g(b)| <= c |a - b|, on random pairs near the steepest point
    a = 0.3 * torch.randn(2000, 3, dtype=torch.float64)
    b = a + 0.01 * torch.randn(2000, 3, dtype=torch.float64)
    ga, gb = block._branch(a, w1, w2)[0], block._branch(b, w1, w2)[0]
    ratio = (ga - gb).norm(dim=-1) / (a - b).norm(dim=-1)
    assert ratio.max() <= 0.7 + 1e-12
    assert ratio.max() > 0.69  # the bound is reached: it is not vacuous here
    # and the whole image map: |f(a) - f(b)| >= (1 - c) |a - b|, the inverse's condition
    xa = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    xb = xa + 0.5 * torch.randn_like(xa)
    gap = (block.call(xa, cached=False) - block.call(xb, cached=False)).flatten(1).norm(dim=1)
    assert (gap >= 0.3 * (xa - xb).flatten(1).norm(dim=1) - 1e-12).all()


def test_gradcheck_forward_and_inverse():
    # gradients in the input and both weights: the forward's (log-det through slogdet, caps
    # through the SVD) and the inverse's (the implicit function's, by the last Newton step)
    block = _strong_block(shape=(2, 2, 1), hidden=3)
    params = [p.detach().clone().requires_grad_() for p in (block.layer1, block.layer2)]
    x = torch.randn(2, 2, 2, 1, dtype=torch.float64, requires_grad=True)

    def call_and_ladj(x, l1, l2):
        return _functional(block, x, l1, l2, inverse=False)

    def inverse_and_ladj(y, l1, l2):
        return _functional(block, y, l1, l2, inverse=True)

    assert torch.autograd.gradcheck(call_and_ladj, (x, *params))
    assert torch.autograd.gradcheck(inverse_and_ladj, (x, *params))


def test_second_derivatives_of_the_log_det():
    # a Hessian (a Laplace approximation) differentiates the log-det's gradient again:
    # through the elimination's backward, which then forms the inverse with its graph
    block = _strong_block(shape=(3, 2, 1), hidden=4)
    x = torch.randn(2, 3, 2, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: block.call_and_ladj(x, cached=False)[1], (x,))


def _functional(block, value, l1, l2, inverse):
    """``(out, ladj)`` of the block with its parameters replaced by ``l1, l2``."""
    original = block.layer1, block.layer2
    try:
        del block.layer1, block.layer2
        block.layer1, block.layer2 = l1, l2  # plain tensors: gradcheck's inputs
        fn = block.inverse_and_ladj if inverse else block.call_and_ladj
        return fn(value, cached=False)
    finally:
        del block.layer1, block.layer2
        block.layer1, block.layer2 = original


def test_inside_pyro_transformed_distribution():
    block = _strong_block()
    base = dist.Normal(torch.zeros(3, 2, 2, dtype=torch.float64), 1.0).to_event(3)
    # the block as Pyro's forward (sampling explicit, scoring solved) and inverted
    for transform, explicit_scoring in ((block, False), (Inverse(block), True)):
        d = dist.TransformedDistribution(base, [transform])
        y = d.sample((6,))
        assert y.shape == (6, 3, 2, 2)
        log_q = d.log_prob(y)
        x = block.inverse(y, cached=False) if not explicit_scoring else block.call(y, cached=False)
        for i in range(6):
            if explicit_scoring:  # y -> x = block(y): log q(y) = log p(x) + log|det J(y)|
                ladj = _image_jacobian_logdet(lambda v: block.call(v, cached=False), y[i])
                expected = base.log_prob(x[i]) + ladj
            else:  # y = block(x): log q(y) = log p(x) - log|det J(x)|
                ladj = _image_jacobian_logdet(lambda v: block.call(v, cached=False), x[i])
                expected = base.log_prob(x[i]) - ladj
            torch.testing.assert_close(log_q[i], expected, rtol=0, atol=1e-8)


def test_bad_arguments_and_shapes():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        PixelResidual((3, 4), 5)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        PixelResidual((0, 4, 4), 5)
    with pytest.raises(ValueError, match="hidden_channels"):
        PixelResidual(3, 0)
    with pytest.raises(ValueError, match="lipschitz"):
        PixelResidual(3, 4, lipschitz=1.0)
    with pytest.raises(ValueError, match="max_iter"):
        PixelResidual(3, 4, max_iter=0)
    block = PixelResidual((3, 2, 2), 4)
    with pytest.raises(ValueError, match="event shape"):
        block(torch.zeros(5, 2, 2, 2))
    with pytest.raises(ValueError, match="event shape"):
        block.inv(torch.zeros(5, 3, 3, 2))
    # a channel count alone accepts any image size
    assert PixelResidual(3, 4)(torch.zeros(2, 3, 5, 7)).shape == (2, 3, 5, 7)


def test_non_finite_weights_are_named():
    block = PixelResidual((3, 2, 2), 4)
    with torch.no_grad():
        block.layer2[0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite values in \\['layer2'\\]"):
        block(torch.zeros(1, 3, 2, 2))


def test_empty_batch():
    block = _strong_block()
    y = torch.zeros(0, 3, 2, 2, dtype=torch.float64)
    x, ladj = block.inverse_and_ladj(y, cached=False)
    assert x.shape == y.shape and ladj.shape == (0,)


def test_starts_near_identity():
    block = pixel_residual((4, 2, 2), 16)
    x = torch.randn(3, 4, 2, 2)
    y, ladj = block.call_and_ladj(x, cached=False)
    assert (y - x).abs().max() < 0.1 and ladj.abs().max() < 0.1


# -- the glow_residual preset ------------------------------------------------------------
def _preset(dtype=torch.float64):
    torch.manual_seed(1)
    flow = glow_residual(
        (1, 4, 4), num_scales=2, steps_per_scale=1, hidden_channels=4, residual_channels=6
    )
    flow = flow.to(dtype)
    for m in flow.modules():
        if isinstance(m, PixelResidual):  # far from the identity, so the check can fail
            with torch.no_grad():
                m.layer1.copy_(2.0 * torch.randn_like(m.layer1))
                m.layer2.copy_(3.0 * torch.randn_like(m.layer2))
    return flow


def test_preset_log_prob_matches_change_of_variables():
    flow = _preset()
    shape = base_shape(flow, (1, 4, 4))
    base = dist.Normal(torch.zeros(shape, dtype=torch.float64), 1.0).to_event(3)
    d = dist.TransformedDistribution(base, flow)
    y = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    log_q = d.log_prob(y)
    encode = flow.inv
    for i in range(3):
        u = encode(y[i : i + 1])
        ladj = _image_jacobian_logdet(lambda v: encode(v).reshape(1, -1), y[i])
        torch.testing.assert_close(log_q[i], base.log_prob(u[0]) + ladj, rtol=0, atol=1e-8)
    # sampling solves the residual blocks; the samples score back to their own draws
    torch.manual_seed(2)
    u = base.sample((4,))
    x = flow(u)
    torch.testing.assert_close(flow.inv(x.clone()), u, rtol=0, atol=1e-8)


def test_preset_scores_without_solving(monkeypatch):
    flow = _preset(torch.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("scoring must run the residual blocks explicitly")

    monkeypatch.setattr(PixelResidual, "_solve", refuse)
    shape = base_shape(flow, (1, 4, 4))
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(shape), 1.0).to_event(3), flow)
    assert torch.isfinite(d.log_prob(torch.randn(5, 1, 4, 4))).all()


def test_preset_is_glow_plus_one_block_per_step():
    args = ((1, 8, 8), 2, 3, 8)
    hybrid, plain = glow_residual(*args, residual_every=1), glow(*args)
    blocks = [m for m in hybrid.modules() if isinstance(m, PixelResidual)]
    assert len(blocks) == 2 * 3
    # latent-to-data order: the second scale's 16 channels less the factored-out 8 first
    assert [b.channels for b in blocks] == [8, 8, 8, 4, 4, 4]
    assert len(hybrid) == len(plain) + 6


def test_preset_default_is_a_block_after_every_second_step():
    for steps, expected in ((4, 4), (3, 2), (2, 2), (1, 2)):  # one step per scale: every step
        hybrid = glow_residual((1, 8, 8), 2, steps, 8)
        assert sum(isinstance(m, PixelResidual) for m in hybrid.modules()) == expected
    # a checkpoint of the earlier default loads into residual_every=1, and only there
    old = glow_residual((1, 8, 8), 2, 2, 8, residual_every=1)
    glow_residual((1, 8, 8), 2, 2, 8, residual_every=1).load_state_dict(old.state_dict())
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        glow_residual((1, 8, 8), 2, 2, 8).load_state_dict(old.state_dict())


def test_residual_every_places_blocks_after_every_kth_step_of_each_scale():
    args = ((1, 8, 8), 2, 4, 8)
    plain = glow(*args)
    for every, expected in ((1, 8), (2, 4), (4, 2)):
        hybrid = glow_residual(*args, residual_every=every)
        blocks = [m for m in hybrid.modules() if isinstance(m, PixelResidual)]
        assert len(blocks) == expected and len(hybrid) == len(plain) + expected
        # data-to-latent order: each block follows the coupling of a step whose position
        # in its scale is a multiple of ``every``
        kinds = []
        for t in reversed(list(hybrid)):
            while hasattr(t, "transform"):  # Inverse, ChannelSubset
                t = t.transform
            if isinstance(t, PixelResidual) or "Coupling" in type(t).__name__:
                kinds.append("R" if isinstance(t, PixelResidual) else "C")
        pattern = "".join("CR" if (i % 4 + 1) % every == 0 else "C" for i in range(8))
        assert "".join(kinds) == pattern
    # the log-det stays exact with fewer blocks
    torch.manual_seed(0)
    flow = glow_residual((1, 4, 4), 2, 2, 4, residual_channels=5, residual_every=2).double()
    shape = base_shape(flow, (1, 4, 4))
    d = dist.TransformedDistribution(
        dist.Normal(torch.zeros(shape, dtype=torch.float64), 1.0).to_event(3), flow
    )
    y = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    u = flow.inv(y[:1])
    ladj = _image_jacobian_logdet(lambda v: flow.inv(v).reshape(1, -1), y[0])
    torch.testing.assert_close(d.log_prob(y[:1])[0], d.base_dist.log_prob(u[0]) + ladj)
    for bad in (0, 3, 1.5):
        with pytest.raises(ValueError, match="residual_every must be an integer in"):
            glow_residual((1, 8, 8), 2, 2, 8, residual_every=bad)


@pytest.mark.parametrize("bias", [1e3, 1e4])
def test_float32_inverse_with_a_large_output_bias(bias: float) -> None:
    # b2 is not capped: inverting values of size 1 puts v ~ y - b2, whose float32 spacing is
    # above eps**0.75 (1 + |y|): the solve must stop at the rounding floor, not fail
    torch.manual_seed(0)
    block = PixelResidual((3, 2, 2), 8)
    with torch.no_grad():
        block.layer2.mul_(50.0)
        block.layer2[:, -1] = bias
    y = torch.randn(4, 3, 2, 2)
    x = block.inverse(y, cached=False)
    assert bool((x.abs() > bias / 2).all())
    eps = torch.finfo(torch.float32).eps
    assert bool(((block(x) - y).abs() <= 64 * eps * (1 + y.abs() + bias)).all())
