"""fit_density's history (issue 17 item 3) and its defaults shared with the CLI (item 4).

The history holds the loss of every step and the held-out NLL every ``eval_every`` steps;
it is plain JSON, survives a checkpoint (a resumed run's history is an uninterrupted run's),
and scoring held-out data never changes what training does.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from pyro_invres import train
from pyro_invres.cli import DEFAULTS
from pyro_invres.datasets import sample_toy
from pyro_invres.evaluation import evaluate_nll
from pyro_invres.train import FIT_DEFAULTS, CheckpointError, build_flow, fit_density

TINY = {"num_blocks": 1, "hidden_dims": [8]}


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    return sample_toy("moons", 256, g), sample_toy("moons", 128, g)


def tiny_flow(**options):
    torch.manual_seed(0)
    return build_flow("iresnet", 2, **{**TINY, **options})


class Preempted(RuntimeError):
    pass


def test_history_lengths_types_and_json(toy):
    train_data, test = toy
    result = fit_density(
        tiny_flow(), train_data, steps=7, batch_size=64, test_data=test, eval_every=3,
        progress=False,
    )  # fmt: skip
    history = result.history
    assert history["step"] == list(range(1, 8)) and history["loss"] == result.losses
    assert history["eval_step"] == [3, 6, 7]  # every 3 steps, and the last one
    assert len(history["eval_nll"]) == 3
    assert all(type(v) is float for v in history["loss"] + history["eval_nll"])
    assert all(type(s) is int for s in history["step"] + history["eval_step"])
    assert json.loads(json.dumps(history)) == history
    # the last score is the final evaluation's (the whole test set fits in eval_max)
    assert history["eval_nll"][-1] == result.test_nll


def test_held_out_rows_are_capped_at_eval_max(toy):
    train_data, test = toy
    flow = tiny_flow()
    result = fit_density(
        flow, train_data, steps=2, batch_size=64, test_data=test, eval_every=2, eval_max=16,
        progress=False,
    )  # fmt: skip
    rows = test[torch.linspace(0, len(test) - 1, 16).round().long()]
    assert result.history["eval_nll"] == [evaluate_nll(flow, rows)]
    assert result.history["eval_nll"][0] != result.test_nll  # the final one uses every row


def test_no_scores_without_test_data_or_eval_every(toy):
    train_data, test = toy
    for options in ({"test_data": None}, {"test_data": test, "eval_every": None}):
        result = fit_density(
            tiny_flow(), train_data, steps=3, batch_size=64, progress=False, **options
        )
        assert result.history["eval_step"] == [] and result.history["eval_nll"] == []
        assert len(result.history["loss"]) == 3


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "10"])
def test_eval_every_is_validated(toy, bad):
    with pytest.raises(ValueError, match="eval_every must be a positive integer"):
        fit_density(tiny_flow(), toy[0], steps=2, eval_every=bad, progress=False)


def test_scoring_leaves_training_bit_identical(toy):
    """With a stochastic log-det, scoring draws random numbers (checked first): training
    must still see exactly the random numbers it sees without scoring."""
    train_data, test = toy
    options = {"logdet": "roulette"}
    probe = tiny_flow(**options)
    before = torch.get_rng_state()
    evaluate_nll(probe, test)
    assert not torch.equal(before, torch.get_rng_state())  # the evaluation is random

    runs = []
    for eval_every in (None, 2):
        flow = tiny_flow(**options)
        result = fit_density(
            flow, train_data, steps=8, batch_size=64, test_data=test, eval_every=eval_every,
            seed=4, progress=False,
        )  # fmt: skip
        runs.append((result, flow))
    (plain, flow_a), (scored, flow_b) = runs
    assert scored.history["eval_step"] == [2, 4, 6, 8]
    assert plain.losses == scored.losses  # exactly, every step
    for (name, a), b in zip(flow_a.state_dict().items(), flow_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_continues_the_history(toy, tmp_path, monkeypatch):
    train_data, test = toy
    options = dict(
        steps=12, batch_size=64, test_data=test, eval_every=4, checkpoint_every=2, seed=1,
        progress=False,
    )  # fmt: skip
    straight = fit_density(tiny_flow(), train_data, checkpoint_path=tmp_path / "a.pt", **options)

    real_save = train.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        if state["step"] == 6:  # killed right after its checkpoint at step 6
            raise Preempted

    path = tmp_path / "b.pt"
    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(Preempted):
        fit_density(tiny_flow(), train_data, checkpoint_path=path, **options)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    state = train.load_checkpoint(path)
    assert state["history"]["eval_step"] == [4]

    resumed = fit_density(tiny_flow(), train_data, checkpoint_path=path, resume=True, **options)
    assert resumed.start_step == 6
    assert resumed.history == straight.history
    assert resumed.history["eval_step"] == [4, 8, 12]
    assert train.load_checkpoint(path)["history"]["eval_step"] == [4, 8, 12]


def test_a_checkpoint_without_history_resumes_with_its_losses(toy, tmp_path):
    """Checkpoints written before the history was kept hold only the losses."""
    path = tmp_path / "c.pt"
    fit_density(tiny_flow(), toy[0], steps=3, batch_size=64, checkpoint_path=path, progress=False)
    state = train.load_checkpoint(path)
    del state["history"]
    train.save_checkpoint(path, state)
    result = fit_density(
        tiny_flow(), toy[0], steps=5, batch_size=64, checkpoint_path=path, resume=True,
        lr_final=FIT_DEFAULTS["lr_final"], progress=False,
    )  # fmt: skip
    assert result.history["step"] == [1, 2, 3, 4, 5] and result.history["eval_step"] == []


@pytest.mark.parametrize(
    "history",
    [
        {"eval_step": [1, 2], "eval_nll": [3.0]},
        {"eval_step": [9], "eval_nll": [3.0]},  # past the checkpoint's step
        {"eval_step": ["1"], "eval_nll": [3.0]},
        {"eval_step": [1], "eval_nll": ["x"]},
        [1, 2],
    ],
)
def test_a_damaged_history_is_a_checkpoint_error(toy, tmp_path, history):
    path = tmp_path / "c.pt"
    fit_density(tiny_flow(), toy[0], steps=3, batch_size=64, checkpoint_path=path, progress=False)
    state = train.load_checkpoint(path)
    state["history"] = history
    train.save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="'history' must hold"):
        fit_density(tiny_flow(), toy[0], steps=5, checkpoint_path=path, resume=True, progress=False)


def test_defaults_are_the_command_lines_schedule():
    """One schedule: fit_density's defaults are FIT_DEFAULTS, and the CLI's agree."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(fit_density).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert {k: defaults[k] for k in FIT_DEFAULTS} == dict(FIT_DEFAULTS)
    assert FIT_DEFAULTS["lr"] == 1e-2 and FIT_DEFAULTS["lr_final"] == 0.1
    for key in ("steps", "batch_size", "lr", "lr_final"):
        assert DEFAULTS[key] == FIT_DEFAULTS[key], key
    with pytest.raises(TypeError):
        FIT_DEFAULTS["lr"] = 1.0  # read-only: a caller cannot change everyone's default
