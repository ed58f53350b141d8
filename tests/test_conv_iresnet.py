"""The convolutional i-ResNet: spectral norm of the convolution operator itself."""

import pytest
import torch
from conftest import inflate
from helpers import jacobian_logdet

from pyro_invres import iresnet
from pyro_invres.nn import spectral_norm


def image_operator_norm(g, x):
    flat = x.reshape(-1)
    jac = torch.autograd.functional.jacobian(lambda z: g(z.reshape(x.shape)).reshape(-1), flat)
    return torch.linalg.matrix_norm(jac, ord=2)


@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("c", [0.6, 0.9])
def test_conv_operator_norm_at_most_c_after_training(kernel, c):
    torch.manual_seed(0)
    shape = (2, 5, 5)
    block = iresnet(shape, [], kernel_sizes=[kernel], lipschitz=c).double()
    inflate(block.nn)
    opt = torch.optim.Adam(block.parameters(), lr=3e-2)
    for _ in range(10):
        x = torch.randn(8, *shape, dtype=torch.float64)
        loss = -block.residual_logdet(x).mean() - block.nn(x).flatten(1).norm(dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(*shape, dtype=torch.float64)
    assert image_operator_norm(block.nn, x) <= c * (1 + 1e-3)
    block.eval()
    measured = image_operator_norm(block.nn, x)
    # a single convolution: the bound is reached, not merely respected
    assert c * (1 - 1e-3) <= measured <= c * (1 + 1e-6)


def test_kernel_reshape_norm_is_not_the_operator_norm():
    # why power iteration runs on the convolution: the reshaped kernel's norm differs
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.mul_(10)
    kernel_norm = torch.linalg.matrix_norm(conv.weight.reshape(2, -1), ord=2)
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    op = image_operator_norm(lambda z: conv(z.unsqueeze(0))[0], x)
    assert not torch.isclose(kernel_norm, op, rtol=1e-2)
    spectral_norm(conv, 0.5, input_shape=(2, 6, 6))
    conv.eval()
    assert image_operator_norm(lambda z: conv(z.unsqueeze(0))[0], x) <= 0.5 * (1 + 1e-6)


@pytest.mark.parametrize("explicit", ["forward", "inverse"])
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 2)])
def test_image_block_round_trip_logdet_shapes(explicit, batch_shape):
    torch.manual_seed(1)
    shape = (2, 4, 4)
    block = iresnet(shape, [6, 6], explicit=explicit, logdet="exact").double()
    inflate(block.nn)
    x = torch.randn(*batch_shape, *shape, dtype=torch.float64)
    y = block._call(x)
    assert y.shape == x.shape
    assert (block._inverse(y) - x).abs().max() < 1e-8
    assert (block._call(block._inverse(x)) - x).abs().max() < 1e-8
    ladj = block.log_abs_det_jacobian(x, block(x))
    assert ladj.shape == batch_shape
    if batch_shape in [(), (3,)]:
        assert torch.allclose(ladj, jacobian_logdet(block._call, x, event_dim=3), atol=1e-8)


def test_image_block_rejects_bad_shapes():
    with pytest.raises(ValueError, match="kernel sizes"):
        iresnet((2, 4, 4), [4], kernel_sizes=[2, 3])
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        iresnet((2, 4), [4])
    block = iresnet((2, 4, 4), [4])
    with pytest.raises(ValueError, match=r"\(2, 4, 4\)"):
        block(torch.randn(3, 2, 5, 5))


def test_conv_spectral_norm_buffers_survive_save_and_load():
    torch.manual_seed(0)
    block = iresnet((1, 4, 4), [4])
    x = torch.randn(2, 1, 4, 4)
    y = block(x)
    clone = iresnet((1, 4, 4), [4])
    clone.load_state_dict(block.state_dict())
    assert torch.equal(clone(x.clone()), y)
