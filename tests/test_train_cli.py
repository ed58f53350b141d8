import json
import math

import numpy as np
import pyro
import pytest
import torch

from pyro_invres.cli import DEFAULTS, flow_options, main
from pyro_invres.datasets import sample_toy
from pyro_invres.train import (
    CheckpointError,
    NonFiniteLossError,
    build_flow,
    evaluate_nll,
    fit_density,
    inverse_iterations,
    load_checkpoint,
    load_flow,
    make_density,
    save_checkpoint,
)

TINY = {"num_blocks": 1, "hidden_dims": [16]}


def tiny_flow(**options):
    torch.manual_seed(0)
    return build_flow("iresnet", 2, **{**TINY, **options})


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    return sample_toy("moons", 512, g), sample_toy("moons", 256, g)


class Preempted(RuntimeError):
    pass


def fail_at_step(flow, step, error):
    """Make the first block's network raise (or return nan) on training step ``step``.

    Both ways the block evaluates its network (``forward``, and ``forward_with_jacobian``
    for the exact log-det) are wrapped on the instance: a forward hook would switch the
    block to the path that honours hooks, and the runs compared here must take one path.
    """
    net = flow[0].nn
    calls = {"n": 0}

    def wrap(method):
        def wrapped(x, *args, **kwargs):
            if net.training and torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] == step:
                    if error == "nan":
                        x = x * float("nan")
                    else:
                        raise Preempted(f"preempted at step {step}")
            return method(x, *args, **kwargs)

        return wrapped

    net.forward = wrap(net.forward)
    net.forward_with_jacobian = wrap(net.forward_with_jacobian)


# -- build_flow --------------------------------------------------------------------------------
def test_build_flow_names_and_config():
    flow = build_flow("iresnet", 2, num_blocks=2, hidden_dims=(8,), activation="elu")
    assert flow.flow_config == {
        "name": "iresnet",
        "input_dim": 2,
        "num_blocks": 2,
        "hidden_dims": [8],
        "activation": "elu",
    }
    assert all(block.explicit == "inverse" for block in flow if hasattr(block, "explicit"))
    affine = build_flow("pyro-affine", 2, num_blocks=2, hidden_dims=[8])
    assert make_density(affine, (2,)).log_prob(torch.zeros(4, 2)).shape == (4,)
    with pytest.raises(ValueError, match="iresnet"):
        build_flow("glow", 2)


# -- fit_density --------------------------------------------------------------------------------
def test_fit_density_lowers_the_loss_and_reports(toy):
    train, test = toy
    pyro.param("user_param", torch.ones(1))
    flow = tiny_flow()
    result = fit_density(
        flow, train, steps=30, batch_size=128, lr=1e-2, seed=0, test_data=test, progress=False
    )
    losses = result.losses
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05
    assert math.isfinite(result.train_nll) and math.isfinite(result.test_nll)
    assert result.test_nll == pytest.approx(evaluate_nll(flow, test), abs=1e-5)
    assert result.wall_time > 0 and result.inverse_iterations == 0  # scoring is explicit
    summary = result.summary()
    json.dumps(summary)
    assert summary["final_loss"] == losses[-1] and "losses" not in summary
    # the user's param store is left alone, and holds none of the flow's parameters
    assert set(pyro.get_param_store().keys()) == {"user_param"}
    # sampling iterates, and the count shows it
    before = inverse_iterations(flow)
    with torch.no_grad():
        make_density(flow.eval(), (2,)).sample((64,))
    assert inverse_iterations(flow) > before


def test_fit_density_validates_arguments(toy):
    train, _ = toy
    with pytest.raises(ValueError, match="steps"):
        fit_density(tiny_flow(), train, steps=0, progress=False)
    with pytest.raises(ValueError, match="checkpoint_path"):
        fit_density(tiny_flow(), train, steps=2, resume=True, progress=False)
    with pytest.raises(ValueError, match="data"):
        fit_density(tiny_flow(), train[:1], steps=2, progress=False)


# -- checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_roundtrip_and_rebuild(toy, tmp_path):
    train, test = toy
    flow = tiny_flow()
    path = tmp_path / "run" / "checkpoint.pt"
    fit_density(
        flow,
        train,
        steps=6,
        batch_size=64,
        checkpoint_path=path,
        checkpoint_every=4,
        metadata={"dataset": "moons"},
        progress=False,
    )
    state = load_checkpoint(path)
    assert state["step"] == 6 and len(state["losses"]) == 6
    assert state["config"]["flow"]["name"] == "iresnet"
    assert state["config"]["metadata"] == {"dataset": "moons"}
    rebuilt = load_flow(path)
    assert evaluate_nll(rebuilt, test) == pytest.approx(evaluate_nll(flow, test), abs=1e-6)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp files


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_a_checkpoint"])
def test_damaged_checkpoint_raises_checkpoint_error(toy, tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    fit_density(tiny_flow(), toy[0], steps=2, batch_size=64, checkpoint_path=path, progress=False)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(3.0)})
    good = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.filterwarnings("ignore:Encountered NaN")
@pytest.mark.parametrize("validation", [True, False])
def test_nan_names_the_step_and_keeps_the_last_good_checkpoint(toy, tmp_path, validation):
    path = tmp_path / "checkpoint.pt"
    flow = tiny_flow(num_blocks=2)
    fail_at_step(flow, 8, "nan")
    options = dict(steps=12, batch_size=64, checkpoint_path=path, checkpoint_every=5)
    with pyro.validation_enabled(validation), pytest.raises(NonFiniteLossError) as info:
        fit_density(flow, toy[0], progress=False, **options)
    assert "at step 8" in str(info.value) and str(path) in str(info.value)
    assert info.value.step == 8
    state = load_checkpoint(path)
    assert state["step"] == 5
    assert all(
        torch.isfinite(v).all() for v in state["flow_state"].values() if v.is_floating_point()
    )


def test_resume_continues_exactly(toy, tmp_path):
    train, _ = toy
    options = dict(steps=12, batch_size=64, lr=1e-2, lr_final=0.5, seed=3, progress=False)

    straight = tiny_flow()
    expected = fit_density(straight, train, checkpoint_path=tmp_path / "a.pt", **options)

    path = tmp_path / "b.pt"
    first = tiny_flow()
    fail_at_step(first, 8, "raise")
    with pytest.raises(Preempted):
        fit_density(first, train, checkpoint_path=path, checkpoint_every=3, **options)
    assert load_checkpoint(path)["step"] == 6
    torch.manual_seed(123)  # a different process: different initial weights and RNG
    resumed = build_flow("iresnet", 2, **TINY)
    result = fit_density(resumed, train, checkpoint_path=path, resume=True, **options)

    assert result.start_step == 6 and result.losses == expected.losses
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert result.train_nll == expected.train_nll


def test_resume_into_a_different_flow_is_a_checkpoint_error(toy, tmp_path):
    path = tmp_path / "checkpoint.pt"
    fit_density(tiny_flow(), toy[0], steps=2, batch_size=64, checkpoint_path=path, progress=False)
    other = build_flow("iresnet", 2, num_blocks=2, hidden_dims=[16])
    with pytest.raises(CheckpointError, match="does not fit"):
        fit_density(other, toy[0], steps=4, checkpoint_path=path, resume=True, progress=False)


# -- the command line ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("fit")
    argv = ["fit", "--steps", "20", "--out", str(out), "--quiet", "--n-train", "1000"]
    argv += ["--n-test", "300", "--num-blocks", "1", "--hidden", "16", "--dataset", "moons"]
    assert main(argv) == 0
    return out


def test_cli_fit_writes_everything(fitted):
    for name in ("density.png", "samples.png", "metrics.json", "checkpoint.pt"):
        assert (fitted / name).stat().st_size > 0, name
    metrics = json.loads((fitted / "metrics.json").read_text())
    assert metrics["dataset"] == "moons" and metrics["steps"] == 20
    for key in ("train_nll", "test_nll", "wall_time_s", "inverse_iterations_sample"):
        assert math.isfinite(metrics[key]), key
    assert metrics["inverse_iterations_sample"] > 0
    assert metrics["config"]["flow"]["hidden_dims"] == [16]
    assert metrics["config"]["flow"]["activation"] == DEFAULTS["activation"] == "sine"
    assert metrics["config"]["flow"]["solver"] == DEFAULTS["solver"] == "newton"
    assert metrics["config"]["flow"]["activation_kwargs"] == {"omega": DEFAULTS["omega"]}
    assert (fitted / "density.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_flow_options_reach_the_network_and_the_checkpoint(fitted):
    # the starting frequency is in the config the checkpoint rebuilds the flow from
    flow = load_flow(fitted / "checkpoint.pt")
    assert flow.flow_config["activation_kwargs"] == {"omega": DEFAULTS["omega"]}

    def starts(flow, name):
        return [
            float(torch.nn.functional.softplus(getattr(m, name).detach()))
            for m in flow.modules()
            if hasattr(m, name)
        ]

    opts = {"num_blocks": 1, "hidden": "4"}
    swish = build_flow("iresnet", 2, **flow_options(activation="lipswish", beta=8.0, **opts))
    assert starts(swish, "raw_beta") == pytest.approx([8.0])
    sine = build_flow("iresnet", 2, **flow_options(omega=2.5, **opts))
    assert starts(sine, "raw_omega") == pytest.approx([2.5])
    assert starts(sine, "raw_beta") == []
    assert "activation_kwargs" not in flow_options(activation="elu")
    assert "activation" not in flow_options("revnet")
    with pytest.raises(TypeError, match="gamma"):
        flow_options(gamma=1.0)


def test_cli_sample_and_evaluate(fitted, tmp_path, capsys):
    checkpoint = str(fitted / "checkpoint.pt")
    for suffix in (".pt", ".npy", ".csv"):
        out = tmp_path / f"s{suffix}"
        assert main(["sample", "--checkpoint", checkpoint, "--n", "50", "--out", str(out)]) == 0
    assert torch.load(tmp_path / "s.pt").shape == (50, 2)
    assert np.load(tmp_path / "s.npy").shape == (50, 2)
    assert np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1).shape == (50, 2)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", checkpoint, "--n", "200"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dataset"] == "moons" and report["n"] == 200 and math.isfinite(report["nll"])
    assert main(["evaluate", "--checkpoint", checkpoint, "--n", "200", "--dataset", "rings"]) == 0
    assert json.loads(capsys.readouterr().out)["nll"] > report["nll"]


def one_line_error(capsys, argv, *needles, status=1):
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_cli_errors_are_one_line(fitted, tmp_path, capsys):
    # choices are argparse's: a usage error, status 2, also one line
    one_line_error(
        capsys, ["fit", "--dataset", "banana", "--out", str(tmp_path)], "banana", "moons", status=2
    )
    one_line_error(capsys, ["fit", "--flow", "glow", "--out", str(tmp_path)], "glow", status=2)
    missing = str(tmp_path / "nope.pt")
    one_line_error(capsys, ["evaluate", "--checkpoint", missing], "no checkpoint")
    broken = tmp_path / "broken.pt"
    broken.write_bytes((fitted / "checkpoint.pt").read_bytes()[:1000])
    one_line_error(capsys, ["evaluate", "--checkpoint", str(broken)], "corrupted")
    one_line_error(
        capsys,
        ["sample", "--checkpoint", str(broken), "--out", str(tmp_path / "x.pt")],
        "corrupted",
    )
    checkpoint = str(fitted / "checkpoint.pt")
    one_line_error(
        capsys, ["sample", "--checkpoint", checkpoint, "--out", str(tmp_path / "x.txt")], ".npy"
    )
    one_line_error(
        capsys,
        ["sample", "--checkpoint", checkpoint, "--out", str(tmp_path / "no" / "dir" / "x.pt")],
        "does not exist",
    )
    one_line_error(
        capsys, ["evaluate", "--checkpoint", checkpoint, "--dataset", "banana"], "banana", status=2
    )
