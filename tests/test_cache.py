"""The inverse cache: proven by counting solves, and it never goes stale."""

import pyro.distributions as dist
import pytest
import torch

from pyro_invres import InvertibleResidual, iresnet, residual_flow


def blocks(flow):
    return [m for m in flow.modules() if isinstance(m, InvertibleResidual)]


def solves(flow):
    return sum(b.solve_stats.solves for b in blocks(flow))


def reset(flow):
    for b in blocks(flow):
        b.solve_stats.reset()


def normal(dim):
    return dist.Normal(torch.zeros(dim), 1.0).to_event(1)


def test_scoring_own_samples_runs_no_fixed_point_iteration():
    torch.manual_seed(0)
    flow = residual_flow(3, num_blocks=3)
    d = dist.TransformedDistribution(normal(3), flow)
    y = d.rsample((16,))
    reset(flow)
    d.log_prob(y)
    assert solves(flow) == 0
    d.log_prob(y.clone())  # fresh data: every block inverts
    assert solves(flow) == 3


def test_explicit_inverse_samples_iterate_and_score_free():
    torch.manual_seed(0)
    flow = residual_flow(3, num_blocks=2, explicit="inverse")
    d = dist.TransformedDistribution(normal(3), flow)
    reset(flow)
    data = torch.randn(10, 3)
    d.log_prob(data)
    assert solves(flow) == 0  # scoring data is explicit
    y = d.sample((4,))
    assert solves(flow) == 2  # sampling iterates
    d.log_prob(y)
    assert solves(flow) == 2  # and its samples score from the cache


def test_logdet_computed_once_per_pair():
    torch.manual_seed(0)
    block = iresnet(3, [8])
    calls = {"n": 0}
    net_forward, net_jacobian = block.nn.forward, block.nn.forward_with_jacobian

    def counting(x):
        calls["n"] += 1
        return net_forward(x)

    def counting_jacobian(x):
        calls["n"] += 1
        return net_jacobian(x)

    block.nn.forward = counting
    block.nn.forward_with_jacobian = counting_jacobian
    x = torch.randn(5, 3)
    y = block(x)
    first = block.log_abs_det_jacobian(x, y)
    second = block.log_abs_det_jacobian(x, y)
    assert first is second
    assert calls["n"] == 1  # the forward pass's own evaluation of g served the log-det


@pytest.mark.parametrize("explicit", ["forward", "inverse"])
def test_full_batch_training_on_one_tensor_does_not_reuse_a_stale_pair(explicit):
    # Pyro issue #2292: the identity cache returns the pair from before the optimizer
    # step and the second backward fails. Here the pair is recomputed once stale.
    torch.manual_seed(0)
    flow = residual_flow(2, num_blocks=2, hidden_dims=[16], explicit=explicit)
    d = dist.TransformedDistribution(normal(2), flow)
    data = torch.randn(64, 2) * 2
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = -d.log_prob(data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_sample_under_no_grad_then_score_with_grad_recomputes():
    torch.manual_seed(0)
    flow = residual_flow(2, num_blocks=1, hidden_dims=[8])
    d = dist.TransformedDistribution(normal(2), flow)
    with torch.no_grad():
        y = d.sample((8,))
    lp = d.log_prob(y)  # grad mode changed: the cached graph-less pair is not reused
    lp.sum().backward()
    assert all(p.grad is not None for p in flow.parameters())


def test_direct_calls_never_leak_a_memo_into_the_cache():
    # a bare _inverse (cache bypassed) must not leave a log-det memo that a later cached
    # call of the other direction would take as its own
    torch.manual_seed(0)
    block = iresnet(3, [8], explicit="inverse", logdet="exact").double()
    x = torch.randn(4, 3, dtype=torch.float64)
    block._inverse(x.clone())
    y = block(x)
    reference = -block.residual_logdet(y.detach())
    assert torch.allclose(block.log_abs_det_jacobian(x, y), reference, atol=1e-12)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_warm_start_from_the_stale_pair_saves_iterations_not_accuracy(solver):
    data = torch.randn(128, 2, dtype=torch.float64) * 2
    runs = {}
    for warm in (False, True):
        torch.manual_seed(0)
        flow = residual_flow(2, num_blocks=3, hidden_dims=[32], warm_start=warm, solver=solver)
        flow = flow.double()
        base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
        d = dist.TransformedDistribution(base, flow)
        opt = torch.optim.SGD(flow.parameters(), lr=1e-3)
        for _ in range(6):
            loss = -d.log_prob(data).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs[warm] = (
            loss.item(),
            sum(b.solve_stats.iterations for b in blocks(flow)),
            sum(b.solve_stats.warm_starts for b in blocks(flow)),
        )
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-8)
    assert runs[True][2] > 0 and runs[False][2] == 0
    assert runs[True][1] < runs[False][1]


def test_updates_through_p_data_are_seen_by_the_cache_and_the_spectral_norm():
    # Pyro's ClippedAdam writes through p.data, which leaves version counters unchanged
    import pyro.optim

    torch.manual_seed(0)
    flow = residual_flow(2, num_blocks=2, hidden_dims=[16])
    d = dist.TransformedDistribution(normal(2), flow)
    data = torch.randn(64, 2) * 2
    opt = pyro.optim.ClippedAdam({"lr": 1e-2})
    sn = blocks(flow)[0].nn.net[0].parametrizations.weight[0]
    losses = []
    for _ in range(4):
        u_before = sn.u.clone()
        loss = -d.log_prob(data).mean()  # the same tensor every step: the cache must see
        loss.backward()
        params = list(flow.parameters())
        opt(params)
        for p in params:
            p.grad = None
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    d.log_prob(data)
    assert not torch.equal(sn.u, u_before)  # refreshed after a p.data update


@pytest.mark.parametrize("index", [0, 1, 5])
def test_a_one_entry_write_through_p_data_triggers_a_refresh(index):
    """The spectral norm's value digest sees a change of a single entry (on and off the
    strided part of the digest), so the bound is re-established."""
    from pyro_invres.nn import LipschitzMLP

    torch.manual_seed(0)
    net = LipschitzMLP(3, [4], lipschitz=0.5)
    net(torch.randn(2, 3))
    layer = net.net[0]
    sn = layer.parametrizations.weight[0]
    raw = layer.parametrizations.weight.original
    sigma_before = float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2))
    raw.data.view(-1)[index] += 50.0  # large: the old (u, v) would badly underestimate
    w = layer.weight.detach()
    assert float(torch.linalg.matrix_norm(w, ord=2)) <= 0.5**0.5 * (1 + 1e-3)
    assert sigma_before <= 0.5**0.5 * (1 + 1e-3)
    assert sn._changed(raw) is False  # seen now


def test_deepcopy_after_a_grad_mode_call():
    # (pickling spectrally normalised modules is refused by torch's parametrize: use
    # state_dict, which is tested elsewhere)
    import copy

    torch.manual_seed(0)
    flow = residual_flow(2, num_blocks=2, hidden_dims=[8])
    d = dist.TransformedDistribution(normal(2), flow)
    y = d.rsample((4,))
    d.log_prob(y).sum().backward()
    clone = copy.deepcopy(flow)
    x = torch.randn(3, 2)
    assert torch.equal(clone(x), flow(x.clone()))
