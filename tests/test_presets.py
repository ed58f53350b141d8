"""The image presets in Pyro training (float64, small images).

Round trips, log-det vs the Jacobian, shapes, gradients, dtype moves and state dicts of
every preset are checked once for all blocks in ``tests/test_contract.py``.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

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
