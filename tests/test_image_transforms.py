"""Image blocks: 1x1 convolution, downsampling, channel permutation.

Round trips, log-det and sign vs the Jacobian, shapes, dtype moves and state dicts are
checked for every block in ``tests/test_contract.py``; here what is specific to these.
"""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_invres.transforms.conv1x1 import InvertibleConv1x1, invertible_conv1x1
from pyro_invres.transforms.downsample import (
    ChannelPermutation,
    InvertibleDownsampling,
    channel_permutation,
    invertible_downsampling,
)

BATCH_SHAPES = [(), (3,), (3, 4)]


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def perturb(block: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Move the parameters away from their initial values (a rotation is too easy)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return block


@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_logdet_over_batches(batch):
    block = perturb(InvertibleConv1x1(2, seed=1), 1)
    x = torch.randn(*batch, 2, 3, 5)
    ladj = block.log_abs_det_jacobian(x, block(x))
    assert ladj.shape == batch
    assert torch.allclose(ladj, 15 * block.log_scale.sum().expand(batch))


@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 2, 2), (1, 6, 4)])
def test_downsampling_is_an_exact_permutation(shape):
    block = InvertibleDownsampling(shape)
    n = torch.Size(shape).numel()
    index = torch.arange(n).reshape(shape)
    out = block._call(index)
    assert out.shape == block.output_shape
    assert torch.equal(out.flatten().sort().values, index.flatten())
    assert torch.equal(block._inverse(out), index)
    jac = jacobian(lambda v: block._call(v.reshape(shape)).reshape(-1), torch.randn(n))
    assert set(jac.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(jac.sum(0), torch.ones(n)) and torch.equal(jac.sum(1), torch.ones(n))


def test_downsampling_layout():
    x = torch.arange(16.0).reshape(1, 4, 4)
    y = InvertibleDownsampling((1, 4, 4))._call(x)
    # channel i*f + j holds offset (i, j) of each 2x2 patch
    assert torch.equal(y[:, 0, 0], torch.tensor([0.0, 1.0, 4.0, 5.0]))
    assert torch.equal(y[0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))


def test_channel_permutation_given():
    block = ChannelPermutation(3, permutation=[2, 0, 1], event_dim=3)
    x = torch.arange(3.0).reshape(3, 1, 1).expand(3, 2, 2)
    assert torch.equal(block(x)[:, 0, 0], torch.tensor([2.0, 0.0, 1.0]))
    assert block.sign == 1  # a 3-cycle is even
    with pytest.raises(NotImplementedError, match="image size"):
        _ = ChannelPermutation(2, permutation=[1, 0]).sign
    assert ChannelPermutation(2, permutation=torch.tensor([1, 0]), event_dim=1).sign == -1


def test_image_blocks_accept_any_size_but_downsampling_is_fixed():
    conv, perm = InvertibleConv1x1(2, seed=0), ChannelPermutation(2, seed=0)
    for hw in [(1, 1), (3, 5)]:
        x = torch.randn(4, 2, *hw)
        assert conv(x).shape == perm(x).shape == x.shape
    down = InvertibleDownsampling((2, 4, 4))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\)"):
        down(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match=r"\(8, 2, 2\)"):
        down.inv(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="event shape"):
        down.forward_shape(torch.Size([4, 4]))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    shape = (2, 4, 4)
    blocks = [
        InvertibleConv1x1(2),
        ChannelPermutation(2),
        InvertibleDownsampling(shape),
        InvertibleConv1x1(8),
        ChannelPermutation(8),
    ]
    for block in blocks:
        perturb(block, 3, scale=0.05)
    params = [p for b in blocks for p in b.parameters()]
    assert len(params) == 6
    base = dist.Normal(torch.zeros(shape), 1.0).to_event(3)
    flow = dist.TransformedDistribution(base, blocks)
    assert flow.event_shape == (8, 2, 2)
    data = torch.randn(16, 8, 2, 2)
    losses = []
    for _ in range(3):  # fresh data: the inverse runs; the cache must not go stale
        for p in params:
            p.grad = None
        loss = -flow.log_prob(data).mean()
        loss.backward()
        for p in params:
            assert p.grad is not None and bool(p.grad.abs().sum() > 0)
        with torch.no_grad():  # plain SGD (torch.optim's first step is slow to import)
            for p in params:
                p -= 1e-3 * p.grad
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # the sampling side: the forward maps carry the gradient, scoring hits the cache
    for p in params:
        p.grad = None
    sample = flow.rsample((4,))
    (-flow.log_prob(sample).sum() + sample.square().sum()).backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)


def test_conv_initialisation_is_a_seeded_rotation():
    a, b, c = (InvertibleConv1x1(4, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.weight(), b.weight())
    assert not torch.allclose(a.weight(), c.weight())
    w = a.weight().detach()
    assert torch.allclose(w @ w.T, torch.eye(4), atol=1e-12)
    assert float(torch.linalg.det(w)) > 0
    assert torch.allclose(a.inverse_weight() @ w, torch.eye(4), atol=1e-12)
    torch.manual_seed(3)
    d = InvertibleConv1x1(4)
    torch.manual_seed(3)
    assert torch.equal(d.weight(), InvertibleConv1x1(4).weight())
    assert torch.equal(
        ChannelPermutation(6, seed=5).permutation, ChannelPermutation(6, seed=5).permutation
    )


def test_factories_and_contract():
    assert invertible_conv1x1(3).event_shape == (3,)
    assert invertible_conv1x1((3, 8, 8)).event_shape == (3, -1, -1)
    assert channel_permutation(4).event_dim == 1
    assert channel_permutation((4, 2, 2)).event_dim == 3
    assert invertible_downsampling((3, 6, 9), factor=3).output_shape == (27, 2, 3)
    for block in [InvertibleConv1x1(2), ChannelPermutation(2), InvertibleDownsampling((1, 2, 2))]:
        assert block.bijective is True
        assert not hasattr(block, "autoregressive")
        assert block._cache_size == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: InvertibleConv1x1(0), "num_channels.*0"),
        (lambda: InvertibleConv1x1(2.5), "num_channels.*2.5"),
        (lambda: InvertibleConv1x1(2, event_dim=4), "event_dim.*4"),
        (lambda: InvertibleConv1x1(2, seed="a"), "seed.*'a'"),
        (lambda: InvertibleConv1x1(2, cache_size=2), "cache_size.*2"),
        (lambda: ChannelPermutation(3, permutation=[0, 0, 1]), r"range\(3\).*\[0, 0, 1\]"),
        (lambda: ChannelPermutation(3, permutation=[0, 1]), r"range\(3\).*\[0, 1\]"),
        (lambda: ChannelPermutation(2, permutation=[0.0, 1.0]), r"range\(2\)"),
        (lambda: ChannelPermutation(2, event_dim=0), "event_dim.*0"),
        (lambda: InvertibleDownsampling((2, 4, 6), factor=4), "factor=4.*W=6"),
        (lambda: InvertibleDownsampling((2, 3, 4)), "factor=2.*H=3"),
        (lambda: InvertibleDownsampling((2, 4, 4), factor=0), "factor.*0"),
        (lambda: InvertibleDownsampling((4, 4)), r"\(C, H, W\).*\(4, 4\)"),
        (lambda: InvertibleDownsampling((2, -1, 4)), "-1"),
        (lambda: invertible_conv1x1((2, 3, 4, 5)), "event_dim.*4"),
    ],
)
def test_bad_arguments_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_inputs_raise_value_error():
    conv = InvertibleConv1x1(3)
    with pytest.raises(ValueError, match=r"\(3, -1, -1\)"):
        conv(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="event shape"):
        ChannelPermutation(3, event_dim=1)(torch.randn(4, 2))
