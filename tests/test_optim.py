"""JointOptim: Pyro's per-parameter Adam semantics with one optimizer, and its state."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_invres.optim import JointOptim, joint_adam


def _model(data: torch.Tensor, net: torch.nn.Module) -> None:
    pyro.module("net", net)
    loc = net(data)
    scale = pyro.param("scale", torch.ones(1), constraint=dist.constraints.positive)
    with pyro.plate("n", len(data)):
        pyro.sample("y", dist.Normal(loc.squeeze(-1), scale), obs=data.sum(-1) ** 2)


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _run(optim: object, steps: int, state: dict | None = None, net_state: dict | None = None):
    net = _net()
    data = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    with pyro.get_param_store().scope():
        if net_state is not None:
            net.load_state_dict(net_state["net"])
            pyro.param("scale", net_state["scale"], constraint=dist.constraints.positive)
        if state is not None:
            optim.set_state(state)  # type: ignore[attr-defined]
        svi = SVI(lambda: _model(data, net), lambda: None, optim, Trace_ELBO())
        losses = []
        for _ in range(steps):
            losses.append(svi.step())
            optim.step()  # type: ignore[attr-defined]
        scale = pyro.param("scale").detach().clone()
        # inside the scope: Pyro's optimizers look names up in the param store
        saved = optim.get_state()  # type: ignore[attr-defined]
    return losses, {"net": net.state_dict(), "scale": scale, "optim": saved}


def test_matches_pyros_per_parameter_adam_with_clipping() -> None:
    """Same losses as pyro.optim.ExponentialLR(Adam) + clip_norm, to rounding."""
    pyro_optim = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "gamma": 0.97},
        clip_args={"clip_norm": 0.5},  # small enough to bind on most steps
    )
    reference, ref_params = _run(pyro_optim, 30)
    ours, params = _run(joint_adam(0.05, clip_norm=0.5, gamma=0.97), 30)
    assert torch.allclose(torch.tensor(ours), torch.tensor(reference), rtol=1e-5, atol=1e-5)
    for key, value in ref_params["net"].items():
        assert torch.allclose(params["net"][key], value, atol=1e-5)
    # the clip did bind: without it the trajectory differs
    unclipped, _ = _run(joint_adam(0.05, clip_norm=None, gamma=0.97), 30)
    assert max(abs(a - b) for a, b in zip(unclipped, reference)) > 1e-3


def test_state_round_trip_continues_exactly() -> None:
    whole, _ = _run(joint_adam(0.05, clip_norm=1.0, gamma=0.95), 20)
    first = joint_adam(0.05, clip_norm=1.0, gamma=0.95)
    head, params = _run(first, 10)
    tail, _ = _run(joint_adam(0.05, clip_norm=1.0, gamma=0.95), 10, params["optim"], params)
    # rel 1e-6: the positive "scale" goes through exp(log(.)) when re-registered
    assert head + tail == pytest.approx(whole, rel=1e-6)


def test_resumes_from_pyros_per_parameter_state() -> None:
    """A checkpoint written with pyro.optim.ExponentialLR resumes with JointOptim."""

    def pyro_optim() -> pyro.optim.PyroOptim:
        return pyro.optim.ExponentialLR(
            {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "gamma": 0.95},
            clip_args={"clip_norm": 1.0},
        )

    whole, _ = _run(pyro_optim(), 20)
    first = pyro_optim()
    head, params = _run(first, 10)
    assert "scale" in params["optim"]  # Pyro's layout: one entry per parameter name
    tail, _ = _run(joint_adam(0.05, clip_norm=1.0, gamma=0.95), 10, params["optim"], params)
    assert head + tail == pytest.approx(whole, rel=1e-6)


def test_late_parameters_join_at_the_current_rate() -> None:
    optim = joint_adam(0.1, gamma=0.5)
    with pyro.get_param_store().scope():
        a = pyro.param("a", torch.zeros(2)).unconstrained()
        a.grad = torch.ones(2)
        optim([a])
        optim.step()  # lr 0.1 -> 0.05
        b = pyro.param("b", torch.zeros(3)).unconstrained()
        a.grad, b.grad = torch.ones(2), torch.ones(3)
        optim([a, b])
        # Adam's first step moves by lr: b joined at the decayed rate
        assert torch.allclose(b.detach(), torch.full((3,), -0.05), atol=1e-6)
        names = set(optim.get_state()["params"])
    assert names == {"a", "b"}


def test_bad_clip_norm() -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        JointOptim(torch.optim.Adam, {"lr": 0.1}, clip_norm=0.0)
