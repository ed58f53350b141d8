"""Numerical robustness: long float32 training of the default toy flows stays finite.

Slow: run with ``pytest -m slow tests/test_robustness.py``.
"""

import math

import pyro.distributions as dist
import pytest
import torch

from pyro_invres import residual_flow
from pyro_invres.datasets import sample_toy


@pytest.mark.slow
@pytest.mark.parametrize("explicit", ["inverse", "forward"])
@pytest.mark.parametrize("dataset", ["8gaussians", "checkerboard", "2spirals"])
def test_thousands_of_float32_steps_without_nan(dataset, explicit):
    torch.manual_seed(0)
    data = sample_toy(dataset, 4096, seed=0)
    flow = residual_flow(2, num_blocks=4, hidden_dims=[64, 64], explicit=explicit, activation="elu")
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, flow)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    steps = 2000 if explicit == "inverse" else 600  # scoring data iterates on "forward"
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (256,))]
        loss = -d.log_prob(batch).mean()
        assert math.isfinite(loss.item()), f"non-finite loss at step {step}"
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in flow.parameters()), step
        opt.step()
    with torch.no_grad():
        flow.eval()
        samples = d.sample((1000,))
        assert torch.isfinite(samples).all()
        assert torch.isfinite(d.log_prob(data[:1000])).all()
