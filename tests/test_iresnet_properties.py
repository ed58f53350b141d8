"""The property harness for i-ResNet blocks (float64), over both explicit directions."""

import hypothesis.strategies as st
import pytest
import torch
from conftest import inflate
from helpers import jacobian_logdet, residual_lipschitz
from hypothesis import given

from pyro_invres import conditional_iresnet, iresnet
from pyro_invres.nn.lipschitz_mlp import _GAIN_RATE

configs = st.fixed_dictionaries(
    {
        "dim": st.integers(1, 5),
        "batch_shape": st.sampled_from([(), (1,), (3,), (2, 3)]),
        "hidden": st.lists(st.integers(1, 12), min_size=0, max_size=2),
        "lipschitz": st.floats(0.1, 0.95),
        "seed": st.integers(0, 2**16),
        "explicit": st.sampled_from(["forward", "inverse"]),
        "activation": st.sampled_from(["lipswish", "clipswish", "elu", "sine"]),
        "split": st.sampled_from(["equal", "learned"]),
        "solver": st.sampled_from(["fixed_point", "anderson", "newton"]),
    }
)


def build(cfg, **kwargs):
    torch.manual_seed(cfg["seed"])
    block = iresnet(
        cfg["dim"],
        cfg["hidden"],
        lipschitz=cfg["lipschitz"],
        explicit=cfg["explicit"],
        activation=cfg["activation"],
        split=cfg.get("split", "equal"),
        solver=cfg.get("solver", "fixed_point"),
        logdet="exact",
        **kwargs,
    ).double()
    inflate(block.nn)  # make the normalisation bind, so c is reached
    return block


@given(configs)
def test_round_trips_bypassing_the_cache(cfg):
    block = build(cfg)
    x = 2.0 * torch.randn(*cfg["batch_shape"], cfg["dim"], dtype=torch.float64)
    assert (block._inverse(block._call(x)) - x).abs().max() < 1e-6
    assert (block._call(block._inverse(x)) - x).abs().max() < 1e-6


@given(configs)
def test_exact_logdet_matches_autograd_jacobian(cfg):
    block = build(cfg)
    x = torch.randn(*cfg["batch_shape"], cfg["dim"], dtype=torch.float64)
    y = block(x)
    ladj = block.log_abs_det_jacobian(x, y)
    assert ladj.shape == cfg["batch_shape"]
    expected = jacobian_logdet(block._call, x)
    assert torch.allclose(ladj, expected, atol=1e-6, rtol=0)
    # and through the other direction: the inverse's Jacobian gives minus the log-det
    inverse_expected = -jacobian_logdet(block._inverse, y.detach())
    assert torch.allclose(ladj, inverse_expected, atol=1e-6, rtol=0)


@given(configs)
def test_lipschitz_bound_holds_after_training_steps(cfg):
    block = build(cfg)
    opt = torch.optim.Adam(block.parameters(), lr=2e-2)
    for _ in range(5):
        x = 2.0 * torch.randn(32, cfg["dim"], dtype=torch.float64)
        # push towards a large residual and log-det, i.e. against the bound
        loss = -block.log_abs_det_jacobian(x, block(x)).mean() - block.nn(x).norm(dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    points = 2.0 * torch.randn(6, cfg["dim"], dtype=torch.float64)
    c = cfg["lipschitz"]
    assert residual_lipschitz(block.nn, points) <= c * (1 + 1e-3)  # training-mode refresh
    block.eval()
    assert residual_lipschitz(block.nn, points) <= c * (1 + 1e-6)  # converged refresh


def test_learned_split_moves_the_budget_but_keeps_the_product():
    """Gains of e^{+-3} between layers: the block bends far more, Lip(g) stays <= c."""
    torch.manual_seed(3)
    c = 0.9
    equal = iresnet(2, [32, 32], lipschitz=c).double()
    learned = iresnet(2, [32, 32], lipschitz=c, split="learned").double()
    learned.load_state_dict(equal.state_dict(), strict=False)
    for block in (equal, learned):
        inflate(block.nn)
    with torch.no_grad():
        learned.nn.log_gains.copy_(torch.tensor([3.0, 0.0, -3.0]) / _GAIN_RATE)
    assert torch.allclose(learned.nn.gains().prod(), torch.tensor(1.0, dtype=torch.float64))
    points = 3.0 * torch.randn(200, 2, dtype=torch.float64)
    for block in (equal, learned):
        block.eval()
        assert residual_lipschitz(block.nn, points) <= c * (1 + 1e-6)

    # curvature: how fast the Jacobian changes between nearby points
    def jac(block, x):
        return torch.autograd.functional.jacobian(block.nn, x)

    def bend(block):
        h = 1e-3 * torch.tensor([1.0, 0.0], dtype=torch.float64)
        return max(float((jac(block, x + h) - jac(block, x)).norm() / 1e-3) for x in points[:50])

    assert bend(learned) > 3 * bend(equal)


def test_split_is_checked():
    with pytest.raises(ValueError, match="split"):
        iresnet(2, [8], split="uneven")
    with pytest.raises(ValueError, match="split"):
        iresnet((1, 4, 4), [4], split="learned")


def test_single_layer_bound_is_tight_after_adversarial_training():
    # one linear layer: Lip(g) = ||W||, so the measured constant must sit at c, not below
    torch.manual_seed(1)
    for c in (0.5, 0.9, 0.97):
        block = iresnet(6, [], lipschitz=c).double()
        inflate(block.nn)
        opt = torch.optim.Adam(block.parameters(), lr=3e-2)
        for _ in range(30):
            x = torch.randn(64, 6, dtype=torch.float64)
            loss = -block.log_abs_det_jacobian(x, block(x)).mean() - block.nn(x).norm(dim=-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        block.eval()
        measured = residual_lipschitz(block.nn, torch.randn(3, 6, dtype=torch.float64))
        assert c * (1 - 1e-3) <= measured <= c * (1 + 1e-6)


@pytest.mark.parametrize("explicit", ["forward", "inverse"])
def test_block_is_a_fixed_function_between_optimizer_steps(explicit):
    torch.manual_seed(0)
    block = iresnet(3, [16, 16], explicit=explicit).double()
    inflate(block.nn)
    block.train()
    opt = torch.optim.SGD(block.parameters(), lr=1e-2)
    sn = block.nn.net[0].parametrizations.weight[0]
    for _ in range(3):
        x = torch.randn(8, 3, dtype=torch.float64)
        y1, y2 = block._call(x), block._call(x)
        assert torch.equal(y1, y2)
        u_before = sn.u.clone()
        assert (block._inverse(y1) - x).abs().max() < 1e-8
        assert torch.equal(sn.u, u_before)  # no refresh without a weight change
        loss = block._call(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        block._call(x)
        assert not torch.equal(sn.u, u_before)  # refreshed after the step


@given(
    st.integers(1, 4),
    st.integers(1, 3),
    st.sampled_from([(), (3,), (2, 3)]),
    st.sampled_from(["forward", "inverse"]),
    st.integers(0, 1000),
)
def test_conditional_block_round_trip_logdet_and_bound(
    dim, context_dim, batch_shape, explicit, seed
):
    torch.manual_seed(seed)
    cond = conditional_iresnet(dim, context_dim, [8], explicit=explicit, logdet="exact").double()
    inflate(cond.nn)
    context = torch.randn(*batch_shape, context_dim, dtype=torch.float64)
    block = cond.condition(context)
    x = torch.randn(*batch_shape, dim, dtype=torch.float64)
    assert (block._inverse(block._call(x)) - x).abs().max() < 1e-6
    ladj = block.log_abs_det_jacobian(x, block(x))
    assert ladj.shape == batch_shape
    if batch_shape == ():
        assert torch.allclose(ladj, jacobian_logdet(block._call, x), atol=1e-6)
        g = lambda z: cond.nn(z, context=context)  # noqa: E731
        assert residual_lipschitz(g, torch.randn(4, dim, dtype=torch.float64)) <= 0.9 * (1 + 1e-3)


def test_evaluation_is_a_fixed_function_even_when_power_iteration_is_slow():
    # a power iteration that has not converged within its cap must not keep moving the
    # weights from one evaluation call to the next
    torch.manual_seed(0)
    block = iresnet(6, [32, 32], lipschitz=0.9)
    inflate(block.nn)
    for m in block.modules():
        if hasattr(m, "max_eval_iterations"):
            m.max_eval_iterations = 2
    block = block.double().eval()
    x = torch.randn(16, 6, dtype=torch.float64)
    first = block._call(x)
    for _ in range(3):
        assert torch.equal(block._call(x), first)
    assert (block._inverse(first) - x).abs().max() < 1e-8
