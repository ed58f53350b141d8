"""The public figures (issue 17 item 3): labelled, titled, a colour bar, exact densities."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from pyro_invres.datasets import sample_toy
from pyro_invres.evaluation import make_density
from pyro_invres.flows import build_flow
from pyro_invres.train import fit_density

pytest.importorskip("matplotlib")
from pyro_invres.plotting import (  # noqa: E402  (after the skip: needs matplotlib)
    LOG_DENSITY_RANGE,
    density_figure,
    loss_figure,
    pair_figure,
    samples_figure,
)


def small_flow(dim: int = 2, **options):
    torch.manual_seed(0)
    return build_flow("iresnet", dim, num_blocks=1, hidden_dims=[8], **options)


@pytest.fixture(scope="module")
def moons():
    return sample_toy("moons", 600, seed=0)


def titles(figure):
    return [ax.get_title() for ax in figure.axes]


def renders(figure) -> bool:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def colour_bars(figure):
    return [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]


# -- density_figure -----------------------------------------------------------------------------
@pytest.mark.parametrize("log_density", [False, True])
def test_density_figure_has_labels_a_colour_bar_and_a_title(moons, log_density):
    figure = density_figure(
        small_flow(), moons, title="iresnet on moons, test NLL 2.50", grid=24,
        log_density=log_density, labels=("a", "b"),
    )  # fmt: skip
    data_ax, model_ax = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert data_ax.get_title() == "data"
    assert model_ax.get_title() == ("model log-density" if log_density else "model density")
    for ax in (data_ax, model_ax):
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("a", "b")
    (bar,) = colour_bars(figure)
    assert bar.get_ylabel() == ("log density" if log_density else "density")
    assert figure.get_suptitle() == "iresnet on moons, test NLL 2.50"
    # one colour scale for both panels, so they compare
    assert data_ax.images[0].get_clim() == model_ax.images[0].get_clim()
    assert renders(figure)


def test_density_figure_draws_the_exact_density_and_leaves_the_flow_as_it_was():
    """The picture is the exact density even for blocks trained with a stochastic log-det,
    the same on every call, and the flow keeps its mode and estimator."""
    flow = small_flow(logdet="roulette")
    flow.train()
    window = ((-2.0, 3.0), (-1.5, 1.5))
    grid = 12
    first = density_figure(flow, limit=window, grid=grid, log_density=True)
    second = density_figure(flow, limit=window, grid=grid, log_density=True)
    drawn = np.asarray(first.axes[0].images[0].get_array())
    assert np.array_equal(drawn, np.asarray(second.axes[0].images[0].get_array()))
    assert flow.training and all(b.logdet == flow[0].logdet for b in flow if hasattr(b, "logdet"))

    xs, ys = torch.linspace(-2.0, 3.0, grid), torch.linspace(-1.5, 1.5, grid)
    points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    exact = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8], logdet="exact")
    exact.load_state_dict(flow.state_dict())
    with torch.no_grad():
        expected = make_density(exact.eval(), (2,)).log_prob(points).reshape(grid, grid)
    assert np.allclose(drawn, expected.double().numpy(), atol=1e-5)
    assert first.axes[0].images[0].get_clim()[0] == pytest.approx(
        float(expected.max()) - LOG_DENSITY_RANGE
    )
    # the window asked for is the window drawn, in data coordinates
    assert first.axes[0].get_xlim() == (-2.0, 3.0) and first.axes[0].get_ylim() == (-1.5, 1.5)


def test_density_figure_window_and_argument_errors(moons):
    flow = small_flow()
    only_model = density_figure(flow, limit=3.0, grid=8)
    assert titles(only_model)[0] == "model density" and len(colour_bars(only_model)) == 1
    assert only_model.axes[0].get_xlim() == (-3.0, 3.0)
    # from data off the origin: the window follows them
    shifted = density_figure(flow, moons + 100.0, grid=8)
    low, high = shifted.axes[0].get_xlim()
    assert low < float(moons[:, 0].min()) + 100 < float(moons[:, 0].max()) + 100 < high
    with pytest.raises(ValueError, match="needs data or limit"):
        density_figure(flow)
    with pytest.raises(ValueError, match="2-D flows.*pair_figure"):
        density_figure(small_flow(3), limit=2.0)
    with pytest.raises(ValueError, match="data must have 2 columns, got 3"):
        density_figure(flow, torch.randn(10, 3))
    with pytest.raises(ValueError, match="limit must"):
        density_figure(flow, limit=((1.0, 0.0), (0.0, 1.0)))
    with pytest.raises(ValueError, match="limit must"):
        density_figure(flow, limit="wide")
    with pytest.raises(ValueError, match="grid must"):
        density_figure(flow, moons, grid=1)
    with pytest.raises(ValueError, match="labels must name the 2"):
        density_figure(flow, moons, labels=("x",))


# -- samples_figure -----------------------------------------------------------------------------
def test_samples_figure_beside_data_labelled_and_titled(moons):
    samples = torch.randn(400, 2)
    figure = samples_figure(samples, moons, title="model samples (iresnet)", labels=["u", "v"])
    assert titles(figure) == ["data", "model samples"]
    assert all((ax.get_xlabel(), ax.get_ylabel()) == ("u", "v") for ax in figure.axes)
    assert figure.get_suptitle() == "model samples (iresnet)"
    alone = samples_figure(samples.numpy())
    assert titles(alone) == ["model samples"] and alone.axes[0].get_xlabel() == "x1"
    assert renders(figure)


def test_samples_figure_says_what_it_cannot_draw():
    samples = torch.randn(50, 2)
    samples[:3, 0] = float("nan")
    samples[3, 1] = float("inf")
    figure = samples_figure(samples)
    assert titles(figure) == ["model samples (4 non-finite rows not shown)"]
    assert len(figure.axes[0].collections[0].get_offsets()) == 46
    with pytest.raises(ValueError, match="3 columns: use pair_figure"):
        samples_figure(torch.randn(10, 3))
    with pytest.raises(ValueError, match="no row without nan"):
        samples_figure(torch.full((5, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        samples_figure(torch.randn(10))


# -- pair_figure --------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3, 5])
def test_pair_figure_has_the_lower_triangle_and_the_diagonal(dim):
    g = torch.Generator().manual_seed(dim)
    samples, data = torch.randn(300, dim, generator=g), 2 * torch.randn(500, dim, generator=g)
    figure = pair_figure(samples, data, title=f"{dim}-D fit")
    assert len(figure.axes) == dim * (dim + 1) // 2
    assert figure.get_suptitle() == f"{dim}-D fit"
    bottom = [ax.get_xlabel() for ax in figure.axes if ax.get_xlabel()]
    assert bottom == [f"x{i + 1}" for i in range(dim)]
    left = [ax.get_ylabel() for ax in figure.axes if ax.get_ylabel()]
    assert left == [f"x{i + 1}" for i in range(1, dim)]
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["data", "model samples"]
    # scatter panels hold the data over the samples, at most max_points of each
    scatters = [ax for ax in figure.axes if ax.collections]
    assert len(scatters) == dim * (dim - 1) // 2
    assert [len(c.get_offsets()) for c in scatters[0].collections] == [300, 500]


def test_pair_figure_limits_points_and_dimensions():
    samples, data = torch.randn(5000, 6), torch.randn(3000, 6)
    figure = pair_figure(samples, data, labels=list("abcdef"), max_points=100, max_dims=3)
    assert len(figure.axes) == 6
    assert figure.get_suptitle() == "dimensions 1-3 of 6 shown"
    assert [ax.get_xlabel() for ax in figure.axes if ax.get_xlabel()] == ["a", "b", "c"]
    offsets = [len(c.get_offsets()) for ax in figure.axes for c in ax.collections]
    assert offsets and max(offsets) == 100
    alone = pair_figure(samples[:, :3])
    assert len(alone.axes) == 6 and not alone.legends
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        pair_figure(torch.randn(10, 1))
    with pytest.raises(ValueError, match="data must have 3 columns, got 4"):
        pair_figure(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="labels must name the 3"):
        pair_figure(torch.randn(10, 3), labels=["a", "b"])
    with pytest.raises(ValueError, match="max_points"):
        pair_figure(torch.randn(10, 3), max_points=0)


# -- loss_figure --------------------------------------------------------------------------------
def test_loss_figure_of_a_real_fit_read_back_from_json(moons):
    result = fit_density(
        small_flow(), moons, steps=6, batch_size=64, test_data=moons[:100], eval_every=2,
        progress=False,
    )  # fmt: skip
    history = json.loads(json.dumps(result.history))  # as metrics.json gives it back
    figure = loss_figure(history, title="moons: iresnet")
    (ax,) = figure.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "NLL (nats per sample)")
    assert ax.get_title() == "moons: iresnet"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "training loss",
        "held-out NLL",
    ]
    loss_line, eval_line = ax.get_lines()
    assert list(loss_line.get_xdata()) == list(range(1, 7))
    assert list(eval_line.get_xdata()) == [2, 4, 6]
    assert list(eval_line.get_ydata()) == history["eval_nll"]
    assert renders(figure)


def test_loss_figure_keeps_the_end_of_training_readable():
    steps = list(range(1, 201))
    loss = [50.0 if s < 3 else 2.0 + 1.0 / s for s in steps]
    loss[100] = float("nan")
    figure = loss_figure({"step": steps, "loss": loss})
    low, high = figure.axes[0].get_ylim()
    assert low < 2.005 and 2.15 < high < 3.0  # the first steps' 50 nats do not squash it
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == ["training loss"]


def test_loss_figure_refuses_a_malformed_history():
    with pytest.raises(ValueError, match="'step' and 'loss'"):
        loss_figure({"loss": [1.0]})
    with pytest.raises(ValueError, match="differ in length"):
        loss_figure({"step": [1, 2], "loss": [1.0]})
    with pytest.raises(ValueError, match="differ in length"):
        loss_figure({"step": [1], "loss": [1.0], "eval_step": [1], "eval_nll": []})
    with pytest.raises(ValueError, match="list of numbers"):
        loss_figure({"step": [1], "loss": ["high"]})
    assert math.isfinite(loss_figure({"step": [1], "loss": [2.0]}).axes[0].get_ylim()[1])
