"""State that must stay right: loaded weights, learned Lipschitz splits, pickling, contexts.

Each test asserts what a user gets (issue 13, items 6, 7, 9 and 12):

* whatever state dict is loaded (averaged weights, edited weights, buffers from another
  run), every i-ResNet block keeps ``Lip(g) <= c`` in training and in evaluation mode;
* a learned Lipschitz split stays finite, bounded and invertible for any finite gains;
* a whole flow survives ``torch.save``, ``pickle``, ``copy.deepcopy`` and a worker process,
  giving the same ``log_prob`` and still training;
* a conditional block given a context of the wrong shape says what it expected.

Numbers are compared in float64.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from conftest import inflate
from helpers import residual_lipschitz

from pyro_invres import InvertibleResidual, iresnet, residual_flow
from pyro_invres.nn import LipschitzMLP

C = 0.9


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _layer_bound(net: torch.nn.Module) -> float:
    """Product over the dense layers of ``||W_l||_2 s_l``, weights as the layers see them.

    Reading ``layer.weight`` runs the spectral parametrization in the module's current
    mode, exactly as a forward pass would; the product bounds ``Lip(g)``.
    """
    gains = net.gains().detach() if getattr(net, "log_gains", None) is not None else None
    bound, i = 1.0, 0
    for m in net.modules():
        if isinstance(m, torch.nn.Linear):
            norm = float(torch.linalg.matrix_norm(m.weight.detach(), ord=2))
            bound *= norm * (1.0 if gains is None else float(gains[i]))
            i += 1
    return bound


def _blocks(flow) -> list[InvertibleResidual]:
    return [b for b in flow if isinstance(b, InvertibleResidual)]


# -- item 6: loading any state dict keeps Lip(g) <= c ------------------------------------


def _make_flow():
    return residual_flow(2, num_blocks=2, hidden_dims=[16, 16], lipschitz=C)


def _trained_state(seed: int) -> dict[str, torch.Tensor]:
    """A flow whose normalisation is active, trained a few steps, saved after a forward
    (so its spectral flags say ``fresh``: the vectors match the weights saved)."""
    torch.manual_seed(seed)
    flow = _make_flow()
    inflate(flow, 6.0)
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    opt = torch.optim.Adam(flow.parameters(), lr=2e-2)
    data = torch.randn(128, 2) * torch.tensor([2.0, 0.5])
    for _ in range(5):
        loss = -dist.TransformedDistribution(base, list(flow)).log_prob(data.clone()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for block in flow:
        block(torch.zeros(1, 2))  # a forward after the last step: the vectors are fresh
    state = {k: v.clone() for k, v in flow.state_dict().items()}
    assert all(bool(v) for k, v in state.items() if k.endswith(".fresh"))
    return state


@pytest.fixture(scope="module")
def two_states() -> tuple[dict, dict]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _trained_state(0), _trained_state(1)
    finally:
        torch.set_default_dtype(previous)


def _averaged(a: dict, b: dict) -> dict:
    # weights averaged, every buffer (u, v, fresh, digest) taken from the first state
    return {k: (a[k] + b[k]) / 2 if k.endswith("original") else a[k] for k in a}


def _scaled(a: dict, b: dict) -> dict:
    # the first state's weights at 2.5x, with the second state's buffers
    return {k: 2.5 * a[k] if k.endswith("original") else b[k] for k in a}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("edit", [_averaged, _scaled])
def test_any_loaded_state_keeps_the_lipschitz_bound(two_states, mode: str, edit) -> None:
    state = edit(*two_states)
    torch.manual_seed(2)
    flow = _make_flow()
    flow.train(mode == "train")
    flow.load_state_dict(state)
    points = torch.randn(8, 2)
    for block in _blocks(flow):
        assert _layer_bound(block.nn) <= C * (1 + 1e-9)
        assert float(residual_lipschitz(block.nn, points)) <= C * (1 + 1e-9)


def test_edited_weights_are_renormalised_in_training_mode(two_states) -> None:
    """The loaded weights' own norm is the one that counts, not the saved vectors'."""
    state = _averaged(*two_states)
    flow = _make_flow().train()
    flow.load_state_dict(state)
    for block in _blocks(flow):
        for m in block.nn.modules():
            if isinstance(m, torch.nn.Linear):
                raw = m.parametrizations.weight.original.detach()
                per_layer = C ** (1 / 3)
                expected = raw / max(1.0, float(torch.linalg.matrix_norm(raw, ord=2)) / per_layer)
                torch.testing.assert_close(m.weight.detach(), expected, rtol=1e-9, atol=0)


def test_a_genuine_state_reloads_bit_for_bit(two_states) -> None:
    """The check costs nothing in exactness: an unedited state gives the same outputs."""
    state = two_states[0]
    x = torch.randn(16, 2)
    outs = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        flow = _make_flow().train()
        flow.load_state_dict(state)
        outs.append([block(x) for block in flow])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_a_state_without_the_weight_digest_still_loads(two_states) -> None:
    """A checkpoint saved before the digest existed loads; its vectors are re-checked."""
    state = {k: v for k, v in _averaged(*two_states).items() if not k.endswith("weight_digest")}
    flow = _make_flow().train()
    flow.load_state_dict(state)
    for block in _blocks(flow):
        assert _layer_bound(block.nn) <= C * (1 + 1e-9)


# -- item 7: a learned split is finite and bounded for any finite gains ------------------

EXTREME_GAINS = [[6.0, -3.0, -3.0], [60.0, -30.0, -30.0], [1e4, -5e3, -5e3], [-1e4, 0.0, 1e4]]


@pytest.mark.parametrize("log_gains", EXTREME_GAINS)
def test_extreme_learned_gains_stay_finite_bounded_and_invertible(log_gains) -> None:
    torch.manual_seed(0)
    block = iresnet(2, [16, 16], lipschitz=C, split="learned", explicit="forward", atol=1e-12)
    inflate(block, 5.0)
    with torch.no_grad():
        block.nn.log_gains.copy_(torch.tensor(log_gains))
    gains = block.nn.gains().detach()
    assert bool(torch.isfinite(gains).all())
    assert float(gains.max()) <= 1e3 * (1 + 1e-12) and float(gains.min()) >= 1e-3 * (1 - 1e-12)
    assert math.isclose(float(gains.prod()), 1.0, rel_tol=1e-12)
    x = torch.randn(64, 2)
    y = block._call(x)
    assert bool(torch.isfinite(y).all())
    assert _layer_bound(block.nn) <= C * (1 + 1e-9)
    assert float(residual_lipschitz(block.nn, x[:8])) <= C * (1 + 1e-9)
    torch.testing.assert_close(block._inverse(y.clone()), x, atol=1e-9, rtol=0)


def test_extreme_gains_stay_finite_in_float32() -> None:
    torch.manual_seed(0)
    net = LipschitzMLP(2, [16, 16], lipschitz=C, split="learned").float()
    with torch.no_grad():
        net.log_gains.copy_(torch.tensor([6.0, -3.0, -3.0]))
    out = net(torch.randn(32, 2, dtype=torch.float32))
    assert bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(net.gains()).all())


def test_gains_inside_the_cap_are_the_plain_parametrisation() -> None:
    """Ordinary training is untouched: inside the cap the gains are exp(a - mean a)."""
    net = LipschitzMLP(2, [8, 8], split="learned")
    with torch.no_grad():
        net.log_gains.copy_(torch.tensor([0.2, -0.05, -0.1]))
    a = 15.0 * net.log_gains
    assert torch.equal(net.gains(), torch.exp(a - a.mean()))


def test_a_huge_learning_rate_keeps_the_learned_split_sound() -> None:
    torch.manual_seed(0)
    block = iresnet(2, [16, 16], lipschitz=C, split="learned", explicit="forward")
    opt = torch.optim.Adam(block.parameters(), lr=10.0)
    x = torch.randn(64, 2)
    for _ in range(10):
        # grow the log-det: pushes the gains (and the curvature) as far as they will go
        loss = -block.log_abs_det_jacobian(x, block(x)).mean() - block(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        y = block._call(x)
        assert bool(torch.isfinite(y).all())
        assert _layer_bound(block.nn) <= C * (1 + 1e-9)
        torch.testing.assert_close(block._inverse(y.clone()), x, atol=1e-8, rtol=0)
