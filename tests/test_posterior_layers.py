"""The posterior flow's layers: MADE's autoregressive property, affine autoregressive and
dense residual blocks (exact log-dets against the autograd Jacobian, exact inverses)."""

import pytest
import torch

from pyro_invres.nn.made import MADE, made_masks
from pyro_invres.transforms.autoregressive import affine_autoregressive
from pyro_invres.transforms.dense_residual import DenseResidual, spectral_norms
from tests.helpers import jacobian_logdet, residual_lipschitz


def _randomise(module, scale=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("hidden", [[], [7]])
@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]])
def test_made_output_depends_only_on_earlier_ranks(hidden, order):
    net = MADE(5, hidden, order=torch.tensor(order)).double()
    _randomise(net)
    x = torch.randn(5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: torch.cat(net(z)), x)  # (10, 5)
    rank = torch.tensor(order)
    allowed = (rank[:, None] > rank[None, :]).double().repeat(2, 1)
    assert (jac[allowed == 0] == 0).all()
    # and it uses what it may: every allowed entry is nonzero for random weights
    assert (jac[allowed == 1] != 0).all()


def test_made_refuses_bad_options():
    with pytest.raises(ValueError, match="permutation"):
        made_masks(torch.tensor([0, 0, 1]), 4)
    with pytest.raises(ValueError, match="hidden_dims"):
        MADE(3, [4, 4])
    with pytest.raises(ValueError, match="order"):
        MADE(3, [4], order=torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "build",
    [
        lambda: affine_autoregressive(4, [9]),
        lambda: affine_autoregressive(4, [], order=torch.tensor([3, 1, 0, 2])),
        lambda: affine_autoregressive(1, [3]),
        lambda: DenseResidual(4, 9, lipschitz=0.9),
        lambda: DenseResidual(6, 3, lipschitz=0.5),
    ],
)
def test_logdet_matches_autograd_jacobian_and_inverse_is_exact(build):
    torch.manual_seed(0)
    block = build().double()
    _randomise(block)
    dim = block.event_shape[0]
    x = 2 * torch.randn(7, dim, dtype=torch.float64)
    y = block(x)
    torch.testing.assert_close(
        block.log_abs_det_jacobian(x, y), jacobian_logdet(block, x), rtol=1e-9, atol=1e-9
    )
    back, ladj = block.inverse_and_ladj(y.clone(), cached=False)
    ladj = ladj() if callable(ladj) else ladj
    torch.testing.assert_close(back, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ladj, jacobian_logdet(block, x), rtol=1e-8, atol=1e-8)


def test_dense_residual_keeps_its_lipschitz_bound_for_any_weights():
    block = DenseResidual(5, 12, lipschitz=0.7).double()
    _randomise(block, scale=5.0)  # far outside the bound before capping
    x = torch.randn(40, 5, dtype=torch.float64)
    w1, w2 = block.weights()

    def branch(z):
        return block._branch(z, w1, w2)[0]

    assert float(residual_lipschitz(branch, x)) <= 0.7 + 1e-9


@pytest.mark.parametrize("shape", [(3, 7, 4), (2, 4, 7), (1, 5, 5)])
def test_spectral_norms_match_the_svd_with_its_gradient(shape):
    # tall, wide and square: the Gram side is chosen by shape
    w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    reference = torch.linalg.matrix_norm(w, ord=2)
    torch.testing.assert_close(spectral_norms(w), reference, rtol=1e-12, atol=0)
    weights = torch.randn(shape[0], dtype=torch.float64)
    (ours,) = torch.autograd.grad((spectral_norms(w) * weights).sum(), w)
    (theirs,) = torch.autograd.grad((reference * weights).sum(), w)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    # twice differentiable (a Hessian through the caps is not silently truncated)
    assert torch.autograd.gradgradcheck(spectral_norms, (w,))


def test_spectral_norms_of_float32_weights_and_of_zero():
    w = torch.randn(2, 62, 31)
    exact = torch.linalg.matrix_norm(w.double(), ord=2)
    # the Gram product's rounding: far below what the Lipschitz margin 1 - c needs
    torch.testing.assert_close(spectral_norms(w).double(), exact, rtol=1e-5, atol=0)
    zero = torch.zeros(2, 3, requires_grad=True)
    norm = spectral_norms(zero)
    assert 0 <= float(norm.detach()) < 1e-15
    (grad,) = torch.autograd.grad(norm, zero)
    assert torch.isfinite(grad).all()
    for bad in (float("nan"), float("inf"), 1e20):  # 1e20: its square overflows float32
        w = torch.ones(2, 2)
        w[1, 0] = bad
        with pytest.raises(torch.linalg.LinAlgError, match="non-finite Frobenius norm"):
            spectral_norms(w)


def test_dense_residual_refuses_bad_options():
    with pytest.raises(ValueError, match="lipschitz"):
        DenseResidual(3, 4, lipschitz=1.0)
    with pytest.raises(ValueError, match=">= 1"):
        DenseResidual(3, 0)


def test_dense_residual_names_non_finite_weights_instead_of_an_svd_failure():
    block = DenseResidual(3, 4)
    with torch.no_grad():
        block.layer2[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"expected finite weights.*\['layer2'\].*diverged"):
        block(torch.randn(2, 3))


def test_dense_residual_inverts_large_float32_values():
    # latents far out in a funnel's mouth round trip to within float32's relative precision
    # (the inverse's tolerance scales with |y|)
    torch.manual_seed(0)
    block = DenseResidual(3, 8)
    with torch.no_grad():
        block.layer2.mul_(50.0)  # a trained, non-trivial branch (capped at Lip 0.9 anyway)
    x = 1000.0 * torch.randn(256, 3)
    y = block(x)
    back = block.inverse(y.clone(), cached=False)
    assert ((back - x).abs() <= 1e-4 * (1 + x.abs())).all()


@pytest.mark.parametrize("bias", [1e3, 1e4])
def test_dense_residual_inverts_in_float32_with_a_large_output_bias(bias):
    # b2 is not capped: inverting values y of size 1 puts x ~ y - b2, whose float32 spacing
    # is above eps**0.75 (1 + |y|), so the inverse must stop at the rounding floor, not fail
    torch.manual_seed(0)
    block = DenseResidual(3, 8)
    with torch.no_grad():
        block.layer2.mul_(50.0)
        block.layer2[:, -1] = bias
    y = torch.randn(64, 3)
    x = block.inverse(y, cached=False)
    assert bool((x.abs() > bias / 2).all())  # the solution really is far out
    eps = torch.finfo(torch.float32).eps
    assert bool(((block(x) - y).abs() <= 64 * eps * (1 + y.abs() + bias)).all())
