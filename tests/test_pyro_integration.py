"""Inside Pyro: shapes, parameter registration, SVI and AutoNormalizingFlow.

State dicts of every flow are checked in ``tests/test_contract.py``.
"""

from functools import partial

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.optim import Adam

from pyro_invres import conditional_iresnet, iresnet, residual_flow


def mixed_flow(dim=4):
    return [
        iresnet(dim, [16]),
        T.Permute(torch.randperm(dim)),
        T.affine_coupling(dim),
        iresnet(dim, [16], explicit="inverse"),
    ]


@pytest.mark.parametrize("batch_shape", [(), (3,), (3, 4)])
def test_shapes_in_a_mixed_transformed_distribution(batch_shape):
    torch.manual_seed(0)
    base = dist.Normal(torch.zeros(batch_shape + (4,)), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, mixed_flow())
    y = d.rsample()
    assert y.shape == batch_shape + (4,)
    assert d.log_prob(y).shape == batch_shape
    y = d.rsample((2,))
    assert y.shape == (2,) + batch_shape + (4,)
    assert d.log_prob(y).shape == (2,) + batch_shape
    assert d.log_prob(torch.randn(2, *batch_shape, 4)).shape == (2,) + batch_shape


def test_pyro_module_registers_every_parameter():
    flow = residual_flow(3, num_blocks=2)
    pyro.module("flow", flow)
    names = set(pyro.get_param_store().keys())
    expected = {f"flow$$${n}" for n, _ in flow.named_parameters()}
    assert names == expected and len(names) > 0


def test_svi_density_fit_lowers_the_loss():
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    data = torch.randn(256, 2) @ torch.tensor([[1.0, 0.9], [0.0, 0.4]]) + 1.0
    flow = residual_flow(2, num_blocks=2, hidden_dims=[32], explicit="inverse")

    def model(data):
        pyro.module("flow", flow)
        d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), flow)
        with pyro.plate("data", len(data)):
            pyro.sample("x", d, obs=data)

    def guide(data):
        pass

    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(data) for _ in range(60)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 50


def test_conditional_flow_in_pyro():
    torch.manual_seed(0)
    cond = conditional_iresnet(2, 3, [16])
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    d = dist.ConditionalTransformedDistribution(base, [cond])
    context = torch.randn(5, 3)
    y = d.condition(context).rsample((5,))
    assert y.shape == (5, 2)
    lp = d.condition(context).log_prob(y)
    assert lp.shape == (5,)
    pyro.module("cond", cond)
    assert len(pyro.get_param_store().keys()) == len(list(cond.parameters()))


def banana_model():
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("b", dist.Normal(a**2, 0.3))


def test_auto_normalizing_flow_trains():
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    init = partial(residual_flow, num_blocks=2, hidden_dims=[32, 32])
    guide = AutoNormalizingFlow(banana_model, init)
    elbo = Trace_ELBO(num_particles=32, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(banana_model, guide, Adam({"lr": 1e-2}), elbo)
    svi.step()
    store = pyro.get_param_store()
    before = {k: v.detach().clone() for k, v in store.items() if "transform$$$" in k}
    assert len(before) == len(list(guide.transform.parameters()))
    losses = [svi.step() for _ in range(150)]
    after = dict(pyro.get_param_store().items())
    assert all(not torch.equal(before[k], after[k].detach()) for k in before)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 1.0, (first, last)
