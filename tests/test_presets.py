"""The property harness over the image presets (float64, small images)."""

import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import jacobian_logdet

from pyro_invres import base_shape, glow, irevnet, residual_flow

SHAPE = (1, 4, 4)

PRESETS = {
    "glow": lambda: glow(SHAPE, num_scales=2, steps_per_scale=1, hidden_channels=6),
    "glow-no-factor": lambda: glow(
        SHAPE, num_scales=1, steps_per_scale=2, hidden_channels=6, factor_out=False
    ),
    "irevnet": lambda: irevnet(SHAPE, num_scales=2, blocks_per_scale=1, hidden_channels=6),
    "residual_flow": lambda: residual_flow(
        SHAPE, num_blocks=1, hidden_dims=[6], num_scales=2, logdet="exact"
    ),
    "residual_flow-inverse": lambda: residual_flow(
        SHAPE, num_blocks=1, hidden_dims=[6], num_scales=1, logdet="exact", explicit="inverse"
    ),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    flow = PRESETS[name]().double()
    with torch.no_grad():  # move away from the identity initialisation
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow


def distribution(flow):
    base = torch.zeros(base_shape(flow, SHAPE), dtype=torch.float64)
    return dist.TransformedDistribution(dist.Normal(base, 1.0).to_event(3), flow)


@pytest.fixture(params=sorted(PRESETS))
def flow(request):
    return build(request.param)


def test_round_trips_with_fresh_tensors(flow):
    z = torch.randn(3, *base_shape(flow, SHAPE), dtype=torch.float64)
    x = flow(z)
    assert x.shape == (3, *SHAPE)
    assert (flow.inv(x.clone()) - z).abs().max() < 1e-8  # clone: no cache can answer
    y = torch.randn(3, *SHAPE, dtype=torch.float64)
    assert (flow(flow.inv(y).clone()) - y).abs().max() < 1e-8


def test_logdet_matches_the_jacobian_of_the_flattened_map(flow):
    z = torch.randn(2, *base_shape(flow, SHAPE), dtype=torch.float64)
    x = flow(z)
    ladj = flow.log_abs_det_jacobian(z, x)
    expected = jacobian_logdet(lambda t: flow(t.clone()), z, event_dim=3)
    assert torch.allclose(ladj, expected, atol=1e-8)


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
def test_shapes_over_batch_shapes(flow, batch_shape):
    d = distribution(flow)
    x = d.rsample(batch_shape)
    assert x.shape == batch_shape + SHAPE
    assert d.log_prob(x).shape == batch_shape
    assert d.log_prob(torch.rand(*batch_shape, *SHAPE, dtype=torch.float64)).shape == batch_shape


def test_gradients_reach_every_parameter(flow):
    d = distribution(flow)
    loss = -d.log_prob(torch.rand(8, *SHAPE, dtype=torch.float64)).mean()
    loss.backward()
    missing = [n for n, p in flow.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters())


def test_training_steps_in_pyro_lower_the_loss(flow):
    pyro.module("flow", flow)
    d = distribution(flow)
    data = 0.3 * torch.rand(32, *SHAPE, dtype=torch.float64) + 0.2
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = -d.log_prob(data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dtype_and_state_dict_round_trip(name):
    flow = build(name)
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    distribution(flow).log_prob(x)  # data-initialise ActNorm, refresh spectral norms
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    clone = build(name, seed=99)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    for mode in ("train", "eval"):
        flow.train(mode == "train")
        clone.train(mode == "train")
        assert torch.equal(flow.inv(x), clone.inv(x.clone()))
    single = flow.float()
    out = single.inv(x.float())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
