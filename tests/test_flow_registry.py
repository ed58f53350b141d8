"""Flows by name (issue 14 item 5): one registry in pyro_invres.flows, the tuned
`pyro-invres fit` flow reachable from Python, checkpoints and evaluation in modules of
their own, and the old import paths still working."""

import pytest
import torch

from pyro_invres import checkpoint, cli, evaluation, flows, train
from pyro_invres.flows import FLOWS, PRESETS, build_flow


def _outputs(flow, dim=2):
    torch.manual_seed(1)
    x = torch.randn(16, dim, dtype=torch.float64)
    flow = flow.double().eval()
    with torch.no_grad():
        y = flow(x)
        ladj = flow.log_abs_det_jacobian(x, y)
    return y, ladj


def test_the_fit_flow_is_reachable_by_name():
    torch.manual_seed(0)
    by_name = build_flow("iresnet-2d", 2)
    torch.manual_seed(0)
    by_cli = build_flow("iresnet", 2, **cli.flow_options())
    # the same description (what a checkpoint stores) and the same network, weight for weight
    assert by_name.flow_config == by_cli.flow_config
    assert by_name.flow_config["name"] == "iresnet"
    for (k, a), (_, b) in zip(by_name.state_dict().items(), by_cli.state_dict().items()):
        assert torch.equal(a, b), k
    for a, b in zip(_outputs(by_name), _outputs(by_cli)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cli_defaults_are_the_preset():
    preset = PRESETS["iresnet-2d"]
    assert cli.DEFAULTS["num_blocks"] == preset["num_blocks"] == 8
    assert cli.DEFAULTS["hidden"] == "32,32"
    options = cli.flow_options()
    for key in ("num_blocks", "activation", "lipschitz", "split", "solver"):
        assert options[key] == preset[key], key
    assert options["hidden_dims"] == list(preset["hidden_dims"])
    assert options["activation_kwargs"] == dict(preset["activation_kwargs"])


def test_presets_are_read_only_and_overrides_do_not_leak():
    with pytest.raises(TypeError):
        PRESETS["iresnet-2d"]["num_blocks"] = 2  # type: ignore[index]
    flow = build_flow("iresnet-2d", 2, num_blocks=1, hidden_dims=[4])
    assert flow.flow_config["num_blocks"] == 1 and flow.flow_config["hidden_dims"] == [4]
    flow.flow_config["activation_kwargs"]["omega"] = 99.0
    assert PRESETS["iresnet-2d"]["num_blocks"] == 8
    assert PRESETS["iresnet-2d"]["activation_kwargs"]["omega"] == 4.0


def test_unknown_names_list_flows_and_presets():
    with pytest.raises(ValueError, match="iresnet-2d") as info:
        build_flow("iresnet2d", 2)
    assert all(name in str(info.value) for name in FLOWS)


def test_a_preset_flow_round_trips_through_a_checkpoint(tmp_path):
    from pyro_invres.datasets import sample_toy

    torch.manual_seed(0)
    flow = build_flow("iresnet-2d", 2, num_blocks=1, hidden_dims=[8])
    data = sample_toy("moons", 128, seed=0)
    train.fit_density(
        flow, data, steps=2, batch_size=64, checkpoint_path=tmp_path / "c.pt", progress=False
    )
    loaded = checkpoint.load_flow(tmp_path / "c.pt")
    assert loaded.flow_config == flow.flow_config
    nll = evaluation.evaluate_nll(flow.double(), data.double())
    assert nll == pytest.approx(evaluation.evaluate_nll(loaded.double(), data.double()), abs=1e-9)


def test_old_import_paths_are_the_new_objects():
    assert train.build_flow is flows.build_flow and train.FLOWS is flows.FLOWS
    for name in (
        "CHECKPOINT_FORMAT",
        "CheckpointError",
        "atomic_write",
        "load_checkpoint",
        "load_flow",
        "save_checkpoint",
        "MAX_CONFIG_INT",
    ):
        assert getattr(train, name) is getattr(checkpoint, name), name
    for name in ("make_density", "evaluate_nll", "inverse_iterations"):
        assert getattr(train, name) is getattr(evaluation, name), name


# -- one vocabulary for the event shape: `input_dim`, an int or a shape, as in Pyro ---------------
@pytest.mark.parametrize("name", FLOWS)
def test_build_flow_takes_d_or_a_shape_and_records_d(name):
    torch.manual_seed(0)
    as_int = build_flow(name, 3, num_blocks=1, hidden_dims=[8])
    torch.manual_seed(0)
    as_shape = build_flow(name, torch.Size([3]), num_blocks=1, hidden_dims=[8])
    assert as_int.flow_config == as_shape.flow_config
    assert as_shape.flow_config["input_dim"] == 3
    for a, b in zip(_outputs(as_int, 3), _outputs(as_shape, 3)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [(1, 8, 8), (), 0, -2, True, 2.0, "2"])
def test_build_flow_names_what_input_dim_it_expected(bad):
    with pytest.raises(ValueError, match="input_dim must be"):
        build_flow("iresnet", bad)


def test_image_factories_take_input_dim():
    import inspect

    for factory in (flows.glow, flows.irevnet, flows.residual_flow):
        assert next(iter(inspect.signature(factory).parameters)) == "input_dim"
    flow = flows.glow(input_dim=(1, 8, 8), num_scales=1, steps_per_scale=1, hidden_channels=4)
    assert tuple(flows.base_shape(flow, (1, 8, 8))) == (4, 4, 4)
    with pytest.raises(ValueError, match=r"image shape \(C, H, W\)"):
        flows.irevnet(3)


def test_residual_flow_takes_a_vector_shape():
    torch.manual_seed(0)
    a = flows.residual_flow(3, num_blocks=1, hidden_dims=[8])
    torch.manual_seed(0)
    b = flows.residual_flow((3,), num_blocks=1, hidden_dims=[8])
    for u, v in zip(_outputs(a, 3), _outputs(b, 3)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_make_density_takes_d_or_a_shape():
    flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8]).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    a = evaluation.make_density(flow, 2, dtype=torch.float64).log_prob(x)
    b = evaluation.make_density(flow, (2,), dtype=torch.float64).log_prob(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
