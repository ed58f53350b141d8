"""ActNorm initialises once and never again: VI guides, density fits and resumed runs.

Regression for issue 13, item 1: an autoguide draws one latent per SVI step, so a
data-initialised ActNorm never initialised while its parameters trained, and the first
batched sample in training mode (``guide.get_posterior().sample((500,))``) then
"initialised" it over the trained values: the getting-started VI example returned
``E[z0 z1]`` of about -0.8 where the posterior's is 0.98. The example is run here from the
docs' own code block, so docs and test cannot drift apart.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from pyro_invres import ActNorm, initialize_actnorm, residual_flow
from pyro_invres.train import build_flow, fit_density

DOCS = Path(__file__).resolve().parents[1] / "docs" / "getting_started.md"
DOCS_STEPS = "range(1000)"


# -- the getting-started VI example --------------------------------------------------------------
def vi_example_code() -> str:
    """The python block of the docs' section "A first variational posterior"."""
    text = DOCS.read_text()
    section = text.split("## A first variational posterior", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the VI section of getting_started.md should hold one python block"
    code = blocks[0]
    for needle in ("AutoNormalizingFlow(model, partial(residual_flow, num_blocks=2))", DOCS_STEPS):
        assert needle in code, f"the docs example no longer contains {needle!r}"
    return code


def run_vi_example(steps: int | None = None) -> torch.Tensor:
    """Run the docs' block (with ``steps`` SVI steps instead of 1000) and return its ``z``."""
    code = vi_example_code()
    if steps is not None:
        code = code.replace(DOCS_STEPS, f"range({steps})")
    namespace: dict = {"__name__": "getting_started_vi"}
    with contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng():
        exec(compile(code, str(DOCS), "exec"), namespace)  # noqa: S102 - our own docs
    guide = namespace["guide"]
    # the guide was used straight after training, in training mode, as the docs do
    assert all(m.training for m in guide.modules())
    return namespace["z"].detach().double()


def exact_posterior() -> dict[str, float]:
    """Moments of p(z | y) for the docs' model by quadrature (float64).

    ``z ~ N(0, I)``, twenty ``y_i = 1 ~ N(z0 z1, 0.5)``: ``log p = -|z|^2/2 - 40 (1 - z0 z1)^2``.
    The posterior is symmetric under ``z -> -z`` (two modes); "folded" moments are those of
    ``z sign(z0 + z1)``, the mode with ``z0 + z1 > 0``, which a guide that settles on
    either mode (or both) must match.
    """
    grid = torch.linspace(-5.0, 5.0, 1601, dtype=torch.float64)
    z0, z1 = torch.meshgrid(grid, grid, indexing="ij")
    log_p = -(z0**2 + z1**2) / 2 - 40 * (1 - z0 * z1) ** 2
    w = (log_p - log_p.max()).exp()
    w = w / w.sum()
    prod = float((w * z0 * z1).sum())
    half = w * (z0 + z1 > 0)
    half = half / half.sum()
    mean = float((half * z0).sum())
    sd = float((half * (z0 - mean) ** 2).sum().sqrt())
    corr = float((half * (z0 - mean) * (z1 - mean)).sum()) / sd**2
    return {"E[z0 z1]": prod, "mean": mean, "sd": sd, "corr": corr}


def folded_moments(z: torch.Tensor) -> dict[str, object]:
    folded = z * torch.sign(z.sum(-1, keepdim=True))
    return {
        "E[z0 z1]": float((z[:, 0] * z[:, 1]).mean()),
        "mean": folded.mean(0),
        "sd": folded.std(0),
        "corr": float(torch.corrcoef(folded.T)[0, 1]),
    }


def test_exact_posterior_moments():
    """The reference itself: the mode of -log p sits on z0 z1 = 1 - 1/80 (where the prior's
    pull balances the likelihood's) and the numbers are the documented ones."""
    truth = exact_posterior()
    assert truth["E[z0 z1]"] == pytest.approx(0.982, abs=2e-3)
    assert truth["mean"] == pytest.approx(1.085, abs=2e-3)
    assert truth["sd"] == pytest.approx(0.483, abs=2e-3)


def test_docs_vi_example_gives_the_posterior_short_run():
    """The docs' block as written, with 500 SVI steps instead of 1000 (about 5 s)."""
    truth = exact_posterior()
    got = folded_moments(run_vi_example(steps=500))
    assert abs(got["E[z0 z1]"] - truth["E[z0 z1]"]) < 0.2, got
    expected_mean = torch.full((2,), truth["mean"], dtype=torch.float64)
    assert torch.allclose(got["mean"], expected_mean, atol=0.2), got
    # reverse KL makes a guide narrower than the posterior, not wider; the bug gave
    # standardised samples (E[z0 z1] = their correlation, negative; folded means near 0.4)
    assert bool(((got["sd"] > 0.3 * truth["sd"]) & (got["sd"] < 1.25 * truth["sd"])).all()), got
    assert abs(got["corr"] - truth["corr"]) < 0.3, got  # the banana's tilt within a mode


@pytest.mark.slow
def test_docs_vi_example_gives_the_posterior_verbatim():
    """The docs' block exactly as a reader runs it: 1000 steps, one particle."""
    truth = exact_posterior()
    got = folded_moments(run_vi_example())
    assert abs(got["E[z0 z1]"] - truth["E[z0 z1]"]) < 0.15, got
    assert torch.allclose(
        got["mean"], torch.full((2,), truth["mean"], dtype=torch.float64), atol=0.2
    ), got
    assert bool(((got["sd"] > 0.3 * truth["sd"]) & (got["sd"] < 1.25 * truth["sd"])).all()), got
    assert abs(got["corr"] - truth["corr"]) < 0.25, got  # the banana's tilt within a mode


# -- the layer's rule ----------------------------------------------------------------------------
def snapshot(norm: ActNorm) -> tuple[torch.Tensor, torch.Tensor]:
    return norm.log_scale.detach().clone(), norm.bias.detach().clone()


def train_on_single_samples(norm: ActNorm, steps: int = 20) -> None:
    """What an autoguide does: one sample per step, grad on, training mode."""
    optim = torch.optim.Adam(norm.parameters(), lr=0.05)
    target = torch.tensor([2.0, -1.0], dtype=norm.bias.dtype)
    for _ in range(steps):
        y = norm(torch.randn(2, dtype=norm.bias.dtype))
        loss = (y - target).square().sum()
        optim.zero_grad()
        loss.backward()
        optim.step()


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_batched_training_call_after_training_never_changes_the_parameters(direction):
    torch.manual_seed(0)
    norm = ActNorm(2).double()
    train_on_single_samples(norm)
    assert norm.is_initialized  # locked at the first step, a batch of one
    before = snapshot(norm)
    assert not torch.equal(before[1], torch.zeros(2, dtype=torch.float64))  # it did train
    batch = 5.0 + 3.0 * torch.randn(500, 2, dtype=torch.float64)
    out = norm(batch) if direction == "forward" else norm.inv(batch)
    after = snapshot(norm)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    # and the map is the trained one, not a standardisation of this batch
    expected = batch * before[0].exp() + before[1]
    if direction == "inverse":
        expected = (batch - before[1]) * (-before[0]).exp()
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)


def test_batch_of_one_without_grad_leaves_the_layer_to_initialise_from_data():
    """Pyro's single-sample probes under no_grad, or a peek at one sample, change nothing."""
    norm = ActNorm(2).double()
    with torch.no_grad():
        norm(torch.randn(2, dtype=torch.float64))
        norm(torch.randn(1, 2, dtype=torch.float64))
    assert not norm.is_initialized
    data = 4.0 + 2.0 * torch.randn(400, 2, dtype=torch.float64)
    y = norm(data)
    assert norm.is_initialized
    assert torch.allclose(y.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(y.std(0, correction=0), torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_evaluation_mode_calls_never_initialise():
    norm = ActNorm(2).double().eval()
    x = 3.0 + torch.randn(50, 2, dtype=torch.float64)
    assert torch.equal(norm(x), x) and not norm.is_initialized


def test_parameters_trained_in_eval_mode_are_kept():
    torch.manual_seed(1)
    norm = ActNorm(2).double().eval()
    train_on_single_samples(norm)
    assert not norm.is_initialized  # eval-mode calls do not set the flag ...
    before = snapshot(norm)
    norm.train()
    norm(10.0 * torch.randn(300, 2, dtype=torch.float64))
    after = snapshot(norm)  # ... but trained values are never overwritten
    assert norm.is_initialized
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_state_dict_of_an_uninitialised_but_trained_layer_round_trips():
    """A checkpoint saved with initialized=False over trained values (a guide trained by an
    older version, or in eval mode) must not be re-initialised after loading."""
    torch.manual_seed(2)
    trained = ActNorm(2).double().eval()
    train_on_single_samples(trained)
    state = trained.state_dict()
    assert not bool(state["initialized"])
    loaded = ActNorm(2).double()
    loaded.load_state_dict(state)
    assert loaded.is_initialized
    loaded(7.0 + 3.0 * torch.randn(300, 2, dtype=torch.float64))  # training mode, batched
    assert torch.equal(loaded.log_scale, state["log_scale"])
    assert torch.equal(loaded.bias, state["bias"])


def test_state_dict_carries_the_flag_both_ways():
    # locked at the identity by a first single-sample step, saved before any update
    locked = ActNorm(2).double()
    locked(torch.randn(2, dtype=torch.float64)).sum().backward()
    assert locked.is_initialized
    loaded = ActNorm(2).double()
    loaded.load_state_dict(locked.state_dict())
    x = 5.0 + torch.randn(100, 2, dtype=torch.float64)
    assert loaded.is_initialized and torch.equal(loaded(x), x)  # stays the identity
    # a fresh layer's state: still free to initialise from the first batch
    fresh = ActNorm(2).double()
    fresh.load_state_dict(ActNorm(2).double().state_dict())
    assert not fresh.is_initialized
    y = fresh(x)
    assert torch.allclose(y.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)


def test_initialize_from_is_explicit_and_refuses_to_overwrite():
    data = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]], dtype=torch.float64)
    out_side = ActNorm(2).double().initialize_from(data)  # data = the layer's outputs
    z = out_side.inv(data)
    assert torch.allclose(z.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z.std(0, correction=0), torch.ones(2, dtype=torch.float64))
    in_side = ActNorm(2).double().eval().initialize_from(data, side="input")  # any mode
    y = in_side(data)
    assert torch.allclose(y.std(0, correction=0), torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="initialised already"):
        out_side.initialize_from(2 * data)
    out_side.initialize_from(2 * data, force=True)
    assert torch.allclose(out_side.bias, 2 * data.mean(0))
    with pytest.raises(ValueError, match="at least two samples"):
        ActNorm(2).double().initialize_from(data[:1])
    with pytest.raises(ValueError, match="side"):
        ActNorm(2).double().initialize_from(data, side="data")


def test_initialize_actnorm_sets_every_layer_once_in_any_mode():
    torch.manual_seed(3)
    flow = residual_flow(2, num_blocks=3, hidden_dims=[8], explicit="inverse").double().eval()
    data = torch.tensor([4.0, -2.0], dtype=torch.float64) + torch.randn(256, 2).double() * 3
    assert initialize_actnorm(flow, data) == 3
    norms = [m for m in flow.modules() if isinstance(m, ActNorm)]
    assert all(m.is_initialized for m in norms)
    x = flow[-1].inv(data)  # the last layer standardises the data
    assert torch.allclose(x.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    before = [snapshot(m) for m in norms]
    assert initialize_actnorm(flow, 100 * data) == 0  # never twice
    assert all(torch.equal(a[1], m.bias) for a, m in zip(before, norms))
    with pytest.raises(ValueError, match="at least two samples"):
        initialize_actnorm(residual_flow(2, num_blocks=1, hidden_dims=[8]).double(), data[:1])


# -- density fits --------------------------------------------------------------------------------
def test_fit_density_initialises_actnorm_from_the_data_even_with_batches_of_one():
    """fit_density initialises explicitly from the data before its first step: a batch
    of one (or Pyro's single-sample probe) can no longer leave the layers at the identity."""
    torch.manual_seed(4)
    data = torch.tensor([5.0, -3.0]) + torch.randn(512, 2) * torch.tensor([4.0, 0.5])
    flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8])
    fit_density(flow, data, steps=1, batch_size=1, lr=1e-12, progress=False)
    norm = flow[-1]  # the outermost ActNorm sees the data: x = (y - bias) / exp(log_scale)
    assert isinstance(norm, ActNorm) and norm.is_initialized
    mean, std = data.double().mean(0), data.double().std(0, correction=0)
    assert torch.allclose(norm.bias.detach().double(), mean, atol=1e-4)
    assert torch.allclose(norm.log_scale.detach().double().exp(), std, rtol=1e-4)


def test_resumed_fit_keeps_the_trained_actnorm(tmp_path):
    """A resumed run restores initialised, trained layers and continues exactly as an
    uninterrupted one: the explicit initialisation leaves them alone."""
    torch.manual_seed(5)
    data = 2.0 + torch.randn(300, 2) * torch.tensor([3.0, 0.3])
    # a constant rate (lr_final 1): the 3-step run's schedule is the 6-step run's start
    kwargs = {"batch_size": 64, "lr": 1e-2, "lr_final": 1.0, "progress": False}

    def build(seed: int):
        torch.manual_seed(seed)
        return build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8])

    straight = build(0)
    fit_density(straight, data, steps=6, **kwargs)
    path = tmp_path / "c.pt"
    fit_density(build(0), data, steps=3, checkpoint_path=path, **kwargs)
    resumed = build(123)  # other weights: everything must come from the checkpoint
    fit_density(resumed, data, steps=6, checkpoint_path=path, resume=True, **kwargs)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
