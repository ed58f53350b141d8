"""The rational-quadratic spline of Neural Spline Flows (pyro_invres.ops.rq_spline)."""

import math

import pytest
import torch

from pyro_invres.ops.rq_spline import _knots, rq_spline

B = 3.0
K = 6
D = 4


def _params(*batch, k=K, d=D, scale=1.5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (*batch, d)
    w = scale * torch.randn(*shape, k, generator=g, dtype=dtype)
    h = scale * torch.randn(*shape, k, generator=g, dtype=dtype)
    der = scale * torch.randn(*shape, k - 1, generator=g, dtype=dtype)
    return w, h, der


def _inverse_softplus(v):
    return math.log(math.expm1(v))


def _points(*shape, dtype=torch.float64, seed=1):
    # spread over [-1.6 B, 1.6 B] so that a good share falls in each tail
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=dtype) * 2 - 1) * 1.6 * B


def test_round_trip_with_broadcast_parameters():
    w, h, der = _params(5)  # (5, D, K): one spline per batch member
    x = _points(7, 5, D)  # a larger sample batch in front
    assert ((x.abs() > B).sum() > 10) and ((x.abs() < B).sum() > 10)
    y, ld = rq_spline(x, w, h, der, B)
    assert y.shape == x.shape and ld.shape == x.shape
    x_back, ld_inv = rq_spline(y, w, h, der, B, inverse=True)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-10, rtol=0)
    # the map is not the identity inside, so the round trip checks something
    assert (y - x)[x.abs() < B].abs().max() > 0.1
    # outside the bound: identity exactly
    out = x.abs() > B
    assert torch.equal(y[out], x[out]) and torch.equal(ld[out], torch.zeros_like(ld[out]))

    # parameters with their own full batch, and inverse first then forward
    w2, h2, d2 = _params(7, 5, seed=3)
    x2, _ = rq_spline(x, w2, h2, d2, B, inverse=True)
    y2, _ = rq_spline(x2, w2, h2, d2, B)
    torch.testing.assert_close(y2, x, atol=1e-10, rtol=0)
    # broadcast result equals the explicitly expanded one
    y3, ld3 = rq_spline(
        x, w.expand(7, 5, D, K), h.expand(7, 5, D, K), der.expand(7, 5, D, K - 1), B
    )
    assert torch.equal(y3, y) and torch.equal(ld3, ld)


@pytest.mark.parametrize("inverse", [False, True])
def test_log_derivative_matches_autograd(inverse):
    w, h, der = _params(3)
    x = _points(2, 3, D, seed=5).requires_grad_(True)
    y, ld = rq_spline(x, w, h, der, B, inverse=inverse)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(ld, grad.log(), atol=1e-10, rtol=1e-10)


def test_inverse_log_derivative_is_minus_forward_at_solution():
    w, h, der = _params(3)
    y = _points(2, 3, D, seed=7)
    x, ld_inv = rq_spline(y, w, h, der, B, inverse=True)
    _, ld_fwd = rq_spline(x, w, h, der, B)
    torch.testing.assert_close(ld_inv, -ld_fwd, atol=1e-10, rtol=1e-10)
    assert ld_fwd[y.abs() < B].abs().max() > 0.1


def test_gradients_finite_everywhere():
    w, h, der = _params(3)
    w, h, der = (t.requires_grad_(True) for t in (w, h, der))
    # far-tail points would overflow xi ** 2 in the spline branch if it were not clamped
    vals = [-1e300, -1e6, -B - 1e-12, -B, 0.0, B, B + 1e-12, 1e6, 1e300]
    x = torch.tensor(vals, dtype=torch.float64)
    x = x[:, None, None].expand(len(vals), 3, D).clone().requires_grad_(True)
    for inverse in (False, True):
        y, ld = rq_spline(x, w, h, der, B, inverse=inverse)
        assert torch.isfinite(y).all() and torch.isfinite(ld).all()
        grads = torch.autograd.grad((y + ld).sum(), (x, w, h, der))
        assert all(torch.isfinite(g).all() for g in grads)
        tail = x.detach().abs() > B
        assert (grads[0][tail] == 1).all()  # identity tails


def test_monotone_and_continuous():
    w, h, der = _params(1, d=3, scale=2.5, seed=11)
    x = torch.linspace(-B - 1, B + 1, 20001, dtype=torch.float64)
    y, ld = rq_spline(x[:, None].expand(-1, 3), w, h, der, B)
    dy = y.diff(dim=0)
    assert (dy > 0).all()
    # continuity: no jump larger than the steepest slope times the step
    step = x[1] - x[0]
    assert (dy <= ld.exp().max(0).values * step * 1.01).all()

    # across each interior knot: left and right limits agree in value and derivative
    # scale 2.5 makes some bins steep (slope ~ 400 with knot slopes ~ 0.05), where the
    # slope changes by ~1e4 relative per unit of x near a knot: hence a tiny eps
    xs = _knots(w, B, 1e-3)[0]  # (3, K + 1)
    eps = 1e-10
    for side in (-eps, eps):
        ya, lda = rq_spline(xs + side, w[..., None, :], h[..., None, :], der[..., None, :], B)
        yk, ldk = rq_spline(xs, w[..., None, :], h[..., None, :], der[..., None, :], B)
        # a jump in value fails here, one in slope on the next line
        torch.testing.assert_close(ya, yk + side * ldk.exp(), atol=1e-9, rtol=0)
        torch.testing.assert_close(lda, ldk, atol=1e-3, rtol=0)

    # at +-bound: value continuous with the identity, derivative 1 from inside
    edge = torch.tensor([-B, B], dtype=torch.float64)
    for x0 in (edge, edge + torch.tensor([eps, -eps], dtype=torch.float64)):
        x0 = x0[:, None].expand(2, 3).clone().requires_grad_(True)
        y0, ld0 = rq_spline(x0, w, h, der, B)
        (g0,) = torch.autograd.grad(y0.sum(), x0)
        torch.testing.assert_close(y0, x0.detach(), atol=1e-9, rtol=0)
        torch.testing.assert_close(g0, torch.ones_like(g0), atol=1e-5, rtol=0)
        torch.testing.assert_close(ld0, torch.zeros_like(ld0), atol=1e-5, rtol=0)


def test_knots_match_the_parameterisation():
    w, h, der = _params(2)
    xs, ys = _knots(w, B, 1e-3), _knots(h, B, 1e-3)
    assert (xs[..., 0] == -B).all() and (xs[..., -1] == B).all()
    expected = 1e-3 + (1 - 1e-3 * K) * torch.softmax(w, -1)
    torch.testing.assert_close(xs.diff(dim=-1), 2 * B * expected, atol=1e-12, rtol=0)
    # the spline passes through every knot, with derivative 1 at the ends and
    # min_derivative + softplus(d) inside
    y, ld = rq_spline(xs, w[..., None, :], h[..., None, :], der[..., None, :], B)
    torch.testing.assert_close(y, ys, atol=1e-12, rtol=0)
    deltas = 1e-3 + torch.nn.functional.softplus(der)
    torch.testing.assert_close(ld[..., 1:-1], deltas.log(), atol=1e-12, rtol=0)
    torch.testing.assert_close(ld[..., [0, -1]], torch.zeros_like(ld[..., [0, -1]]))


def test_identity_when_widths_equal_heights_and_derivatives_one():
    w, _, _ = _params(2, seed=13)
    ones = torch.full((2, D, K - 1), _inverse_softplus(1 - 1e-3), dtype=torch.float64)
    x = _points(5, 2, D, seed=17)
    for heights in (w, torch.zeros_like(w)):
        widths = w if heights is w else torch.zeros_like(w)  # uneven and even bins
        y, ld = rq_spline(x, widths, heights, ones, B)
        torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
        torch.testing.assert_close(ld, torch.zeros_like(ld), atol=1e-12, rtol=0)
        xi, ldi = rq_spline(x, widths, heights, ones, B, inverse=True)
        torch.testing.assert_close(xi, x, atol=1e-12, rtol=0)
        torch.testing.assert_close(ldi, torch.zeros_like(ldi), atol=1e-12, rtol=0)
    # equal bins but derivatives other than 1, or widths != heights: not the identity
    y, _ = rq_spline(x, torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(ones), B)
    assert (y - x).abs().max() > 1e-3
    y, _ = rq_spline(x, w, torch.zeros_like(w), ones, B)
    assert (y - x).abs().max() > 1e-3


@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck(inverse):
    w, h, der = _params(2, d=2, k=3, seed=19)
    x = torch.tensor([[-3.7, 0.4], [1.1, -2.2]], dtype=torch.float64)  # one in the tail
    args = tuple(t.clone().requires_grad_(True) for t in (x, w, h, der))

    def f(x, w, h, der):
        return rq_spline(x, w, h, der, B, inverse=inverse)

    assert torch.autograd.gradcheck(f, args)


def test_float32_round_trip():
    w, h, der = _params(5, dtype=torch.float32)
    x = _points(64, 5, D, dtype=torch.float32)
    y, ld = rq_spline(x, w, h, der, B)
    assert y.dtype == torch.float32 and ld.dtype == torch.float32
    x_back, ld_inv = rq_spline(y, w, h, der, B, inverse=True)
    # Where the spline is flat (slopes down to ~3e-4 here) the inverse amplifies y's own
    # rounding by 1 / slope: that is conditioning, not the solver, so the x-side error is
    # allowed to grow by it while the output-side error must stay ~1e-5 everywhere.
    slope = ld.double().exp()
    err = (x_back - x).abs().double()
    assert (err <= 1e-5 * torch.clamp(1 / slope, min=1)).all(), err.max()
    assert (err * slope).max() <= 1e-5
    y_again, _ = rq_spline(x_back, w, h, der, B)
    torch.testing.assert_close(y_again, y, atol=1e-5, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-3, rtol=0)
    # the flat regions are really there, so the allowance above is not vacuous
    assert slope.min() < 1e-2


def test_bin_assignment_at_a_knot_is_consistent():
    w, h, der = _params(1, d=2, seed=23)
    # each knot taken as its own element: x (1, 2, K + 1) against params (1, 2, 1, K)
    xs, ys = _knots(w, B, 1e-3), _knots(h, B, 1e-3)
    wb, hb, db = w[..., None, :], h[..., None, :], der[..., None, :]
    # exactly on every knot, the ends included
    y, ld = rq_spline(xs, wb, hb, db, B)
    torch.testing.assert_close(y, ys, atol=1e-12, rtol=0)
    x_back, ld_inv = rq_spline(ys, wb, hb, db, B, inverse=True)
    torch.testing.assert_close(x_back, xs, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-12, rtol=0)
    # a point on a knot (all but +bound) is the left edge of the bin it is put in (xi = 0),
    # so it comes out bit for bit; put in the bin to its left (xi ~ 1) it would be rounded
    assert torch.equal(y[..., :-1], ys[..., :-1])
    assert torch.equal(x_back[..., :-1], xs[..., :-1])
    # one ulp either side lands in the neighbouring bin with the same value and slope
    for direction in (-math.inf, math.inf):
        xn = torch.nextafter(xs, torch.full_like(xs, direction))
        yn, ldn = rq_spline(xn, wb, hb, db, B)
        torch.testing.assert_close(yn, ys, atol=1e-12, rtol=0)
        torch.testing.assert_close(ldn, ld, atol=1e-9, rtol=0)
        assert ((yn - y) * math.copysign(1.0, direction) >= 0).all()  # monotone across it


def test_single_bin_is_the_identity():
    # K = 1: one bin spanning [-B, B] with unit slope and end derivatives 1
    w, h, der = _params(2, k=1)
    x = _points(3, 2, D)
    y, ld = rq_spline(x, w, h, der, B)
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld, torch.zeros_like(ld), atol=1e-12, rtol=0)
