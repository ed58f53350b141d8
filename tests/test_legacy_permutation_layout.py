"""The coupling presets' reversals: modules now, and what they saved before still loads.

``additive``, ``affine`` and ``pyro-affine`` once put Pyro's ``Permute`` between their
blocks: not an ``nn.Module``, so ``.to(device)`` left its index behind, a used flow could
not be deep-copied, and the state dict numbered the blocks without it. They now hold a
``ChannelPermutation``; state dicts and checkpoints of the old structure (rebuilt here
with Pyro's ``Permute``, exactly as the presets were) must load into the new flows and
give the same densities, and a resumed run must continue as the old flow would have.
"""

from __future__ import annotations

import copy

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.distributions.transforms import Permute
from pyro.distributions.transforms import affine_coupling as pyro_affine_coupling

from pyro_invres.checkpoint import CheckpointError, load_checkpoint, load_flow
from pyro_invres.flows import build_flow
from pyro_invres.train import fit_density
from pyro_invres.transforms import ActNorm, ChannelPermutation, initialize_actnorm
from pyro_invres.transforms.coupling import additive_coupling, affine_coupling

PRESETS = ["additive", "affine", "pyro-affine"]
DIM = 3


def old_structure(name: str, input_dim: int, **options):
    """The preset as it was built before: Pyro's ``Permute(reverse)`` between blocks."""
    options = dict(options)
    num_blocks = options.pop("num_blocks")
    reverse = torch.arange(input_dim - 1, -1, -1)
    parts = []
    if name == "pyro-affine":
        for _ in range(num_blocks):
            parts += [pyro_affine_coupling(input_dim, **options), Permute(reverse)]
        return ComposeTransformModule(parts[:-1])
    factory = {"additive": additive_coupling, "affine": affine_coupling}[name]
    for k in range(num_blocks):
        if k > 0:
            parts.append(Permute(reverse))
        parts += [factory(input_dim, **options), ActNorm(input_dim)]
    return ComposeTransformModule(parts)


def preset_options(name: str) -> dict:
    """The options the preset records for a small flow (its defaults included)."""
    config = build_flow(name, DIM, num_blocks=3, hidden_dims=[8]).flow_config
    return {k: v for k, v in config.items() if k not in ("name", "input_dim")}


def trained_old_flow(name: str):
    torch.manual_seed(0)
    flow = old_structure(name, DIM, **preset_options(name)).double()
    initialize_actnorm(flow, torch.randn(64, DIM, dtype=torch.float64) * 2 + 1)
    with torch.no_grad():  # off the initial values (an affine coupling starts at identity)
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow.eval()


def log_prob(flow, x):
    base = dist.Normal(torch.zeros(DIM, dtype=x.dtype), 1.0).to_event(1)
    return dist.TransformedDistribution(base, [flow]).log_prob(x.clone())


@pytest.mark.parametrize("name", PRESETS)
def test_the_reversal_is_a_module_that_moves_and_deep_copies(name):
    flow = build_flow(name, DIM, num_blocks=3, hidden_dims=[8])
    reversals = [m for m in flow if isinstance(m, ChannelPermutation)]
    assert len(reversals) == 2 and len(flow) == len(flow.parts)  # every part is a module
    assert all(r.permutation.tolist() == [2, 1, 0] for r in reversals)
    # .to(device) reaches the index (the meta device stands in for a GPU here)
    on_meta = copy.deepcopy(flow).to("meta")
    assert all(m.permutation.is_meta for m in on_meta if isinstance(m, ChannelPermutation))
    moved = flow.double()
    x = torch.randn(4, DIM, dtype=torch.float64)
    moved(x)  # used: each block holds a cached pair
    for r in reversals:
        assert torch.equal(copy.deepcopy(r)(x), r(x))
    if name != "pyro-affine":  # Pyro's own AffineCoupling caches a non-leaf tensor too
        assert torch.equal(copy.deepcopy(moved)(x), moved(x))


@pytest.mark.parametrize("name", PRESETS)
def test_an_old_state_dict_loads_into_the_new_flow(name):
    old = trained_old_flow(name)
    saved = old.state_dict()
    assert not any(k.endswith("permutation") for k in saved)  # Pyro's Permute saved nothing
    torch.manual_seed(1)  # other weights
    new = build_flow(name, DIM, **preset_options(name)).double()
    result = new.load_state_dict(saved)
    assert not result.missing_keys and not result.unexpected_keys
    new.eval()
    x = torch.randn(50, DIM, dtype=torch.float64)
    expected = log_prob(old, x)
    assert torch.isfinite(expected).all()
    assert torch.equal(log_prob(new, x), expected)
    z = torch.randn(50, DIM, dtype=torch.float64)
    assert torch.equal(new(z), old(z))
    assert all(
        m.permutation.tolist() == [2, 1, 0] for m in new if isinstance(m, ChannelPermutation)
    )
    assert saved.keys() == old.state_dict().keys()  # the caller's dict is left as it was


@pytest.mark.parametrize("name", PRESETS)
def test_an_old_checkpoint_loads_and_resumes_as_the_old_flow_would(name, tmp_path):
    data = torch.randn(256, DIM) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
    options = preset_options(name)
    config = {"name": name, "input_dim": DIM, **options}
    fit = dict(batch_size=64, lr=1e-2, lr_final=1.0, seed=3, eval_every=None, progress=False)
    path = tmp_path / "old.pt"
    torch.manual_seed(0)
    old = old_structure(name, DIM, **options)
    fit_density(old, data, steps=3, checkpoint_path=path, config=config, **fit)
    assert not any(k.endswith("permutation") for k in torch.load(path)["flow_state"])

    loaded = load_flow(path)
    x = torch.randn(20, DIM)
    assert torch.equal(log_prob(loaded, x), log_prob(old.eval(), x))

    # resumed with today's flow: the same losses as the old flow trained straight through,
    # so every optimiser moment went back to its own tensor
    torch.manual_seed(0)
    straight = fit_density(old_structure(name, DIM, **options), data, steps=6, **fit)
    resumed = fit_density(
        build_flow(name, DIM, **options), data, steps=6, checkpoint_path=path, resume=True, **fit
    )
    assert resumed.start_step == 3
    assert resumed.losses == straight.losses
    assert any(k.endswith("permutation") for k in load_checkpoint(path)["flow_state"])


def test_only_a_missing_permutation_is_filled():
    flow = build_flow("affine", DIM, num_blocks=2, hidden_dims=[8])
    saved = flow.state_dict()
    # a permutation that is stored is loaded as it is, not replaced by the reversal
    stored = {**saved, "2.permutation": torch.tensor([0, 2, 1])}
    stored["2.inverse_permutation"] = torch.tensor([0, 2, 1])
    flow.load_state_dict(stored)
    assert flow[2].permutation.tolist() == [0, 2, 1]
    # an old-layout dict that lacks a block is reported, never renumbered into a wrong fit
    old = {("3" + k[1:] if k[0] == "4" else "2" + k[1:] if k[0] == "3" else k): v
           for k, v in saved.items() if k[0] != "2"}  # fmt: skip
    fresh = build_flow("affine", DIM, num_blocks=2, hidden_dims=[8])
    fresh.load_state_dict(old)
    broken = {k: v for k, v in old.items() if not k.startswith("3.")}
    with pytest.raises(RuntimeError, match="Missing key"):
        build_flow("affine", DIM, num_blocks=2, hidden_dims=[8]).load_state_dict(broken)


def test_a_loaded_permutation_must_be_a_permutation(tmp_path):
    perm = ChannelPermutation(4, permutation=[3, 2, 1, 0], event_dim=1)
    state = perm.state_dict()
    for bad, what in [
        (torch.tensor([0, 0, 1, 2]), "permutation"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "permutation"),
        (torch.tensor([0, 1, 2]), "permutation"),
        (torch.tensor([1, 0, 2, 3]), "inverse_permutation"),
    ]:
        with pytest.raises(ValueError, match=f"^{what} must be"):
            perm.load_state_dict({**state, what: bad})
        assert perm.permutation.tolist() == [3, 2, 1, 0]  # left as it was
    # inside a flow, and through a checkpoint
    flow = build_flow("affine", DIM, num_blocks=2, hidden_dims=[8])
    forged = {**flow.state_dict(), "2.permutation": torch.tensor([0, 0, 1])}
    with pytest.raises(ValueError, match=r"2\.permutation must be a permutation of range\(3\)"):
        flow.load_state_dict(forged)
    path = tmp_path / "fit.pt"
    fit_density(flow, torch.randn(64, DIM), steps=1, batch_size=32, checkpoint_path=path,
                eval_every=None, progress=False)  # fmt: skip
    state = load_checkpoint(path)
    state["flow_state"]["2.permutation"] = torch.tensor([0, 0, 1])
    with pytest.raises(CheckpointError, match="must be a permutation"):
        load_flow(state)
