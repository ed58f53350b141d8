"""The image residual flow's learned split prior (``residual_flow(..., split_prior=True)``).

Invertibility and the log-det against an autograd Jacobian in float64 are checked by the
contract suite (``tests/test_contract.py``, case ``residual_flow-image-split-prior``).
"""

import pyro.distributions as dist
import pytest
import torch

from pyro_invres import base_shape, residual_flow
from pyro_invres.transforms.coupling import BoundedAffineCoupling

SHAPE = (1, 8, 8)


def _is_prior(layer) -> bool:
    while not isinstance(layer, BoundedAffineCoupling) and hasattr(layer, "transform"):
        layer = layer.transform  # Inverse(...), ChannelSubset(...)
    return isinstance(layer, BoundedAffineCoupling)


def _log_prob(flow, x):
    base = dist.Normal(torch.zeros(base_shape(flow, SHAPE), dtype=x.dtype), 1.0).to_event(3)
    return dist.TransformedDistribution(base, list(flow)).log_prob(x)


def test_one_prior_per_factor_out_the_identity_at_first_and_then_learned():
    torch.manual_seed(0)
    plain = residual_flow(SHAPE, 1, [4], num_scales=3, logdet="exact").double()
    flow = residual_flow(SHAPE, 1, [4], num_scales=3, logdet="exact", split_prior=True).double()
    priors = [t for t in flow if _is_prior(t)]
    others = [t for t in flow if not _is_prior(t)]
    assert len(priors) == 2 and len(others) == len(plain)
    for mine, theirs in zip(others, plain):
        mine.load_state_dict(theirs.state_dict())
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    # zero-initialised: the density of the flow without priors
    assert torch.allclose(_log_prob(flow, x), _log_prob(plain, x), atol=1e-10)
    with torch.no_grad():
        for p in priors[0].parameters():
            p.add_(0.3 * torch.randn_like(p))
    # and learned: its parameters move the density
    assert not torch.allclose(_log_prob(flow, x), _log_prob(plain, x), atol=1e-6)


def test_split_prior_needs_a_factor_out_and_an_image():
    with pytest.raises(ValueError, match="split_prior needs a factor-out"):
        residual_flow(SHAPE, 1, [4], num_scales=1, split_prior=True)
    with pytest.raises(ValueError, match="split_prior needs a factor-out"):
        residual_flow(SHAPE, 1, [4], num_scales=2, factor_out=False, split_prior=True)
    with pytest.raises(ValueError, match="split_prior applies to image flows"):
        residual_flow(3, 1, [4], split_prior=True)
