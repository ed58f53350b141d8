"""Figures of a fitted flow: its density, its samples beside the data, a loss curve.

Each function returns a :class:`matplotlib.figure.Figure` drawn on the Agg canvas: no
``pyplot``, no window and no global state, so it works headless (servers, CI, tests) and
``figure.savefig("density.png")`` writes the file. matplotlib is imported only when a
figure is made (``pip install matplotlib``).

* :func:`density_figure`: a 2-D flow's density (or log-density) on a grid, scored with the
  exact log-determinant, beside a histogram of the data on the same colour scale;
* :func:`samples_figure`: 2-D model samples beside the data;
* :func:`pair_figure`: for ``D > 2``, a pair plot of samples over the data;
* :func:`loss_figure`: the training loss and the held-out NLL of
  :attr:`~pyro_invres.train.FitResult.history`.

Samples and data may be tensors or NumPy arrays; rows with a non-finite value cannot be
drawn and are left out, and the panel's title says how many.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor

if TYPE_CHECKING:  # matplotlib is imported when a figure is made, not with the package
    from matplotlib.figure import Figure

__all__ = ["LOG_DENSITY_RANGE", "density_figure", "loss_figure", "pair_figure", "samples_figure"]

#: Log-densities more than this many nats below the model's highest are drawn in the
#: colour of the lowest: far from the data a flow's log-density falls without bound.
LOG_DENSITY_RANGE = 12.0

Window = tuple[tuple[float, float], tuple[float, float]]


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install matplotlib") from err
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _points(values: Any, name: str, dim: int | None = None) -> tuple[np.ndarray, int]:
    """``values`` as a float64 ``(N, D)`` array of its finite rows, and how many were dropped."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns, got {array.shape[1]}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.any():
        raise ValueError(f"{name} has no row without nan or inf values")
    return array[finite], int((~finite).sum())


def _titled(name: str, dropped: int) -> str:
    return name if not dropped else f"{name} ({dropped} non-finite rows not shown)"


def _evenly(rows: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` evenly spaced rows: deterministic, and sorted data stay covered."""
    if len(rows) <= limit:
        return rows
    return rows[np.linspace(0, len(rows) - 1, limit).round().astype(int)]


def _ranges(points: np.ndarray) -> np.ndarray:
    """``(D, 2)`` plot ranges holding nearly all ``points``, with a margin."""
    lo, hi = np.quantile(points, [0.0005, 0.9995], axis=0)
    half = 0.55 * (hi - lo) + 1e-3 * (1.0 + np.abs(lo) + np.abs(hi))
    mid = 0.5 * (lo + hi)
    return np.stack([mid - half, mid + half], axis=1)


def _window(points: np.ndarray) -> Window:
    """A 2-D window around ``points``; square when both axes have a similar spread, so the
    shapes of the data are not distorted."""
    (x0, x1), (y0, y1) = _ranges(points)
    half_x, half_y = (x1 - x0) / 2, (y1 - y0) / 2
    if max(half_x, half_y) <= 3 * min(half_x, half_y):
        mid_x, mid_y, half = (x0 + x1) / 2, (y0 + y1) / 2, max(half_x, half_y)
        return (mid_x - half, mid_x + half), (mid_y - half, mid_y + half)
    return (float(x0), float(x1)), (float(y0), float(y1))


def _as_window(limit: float | Sequence[Sequence[float]]) -> Window:
    if isinstance(limit, int | float) and not isinstance(limit, bool):
        if not (math.isfinite(limit) and limit > 0):
            raise ValueError(f"limit must be a positive number, got {limit!r}")
        return (-float(limit), float(limit)), (-float(limit), float(limit))
    try:
        (x0, x1), (y0, y1) = ((float(a), float(b)) for a, b in limit)  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"limit must be a number L (the square [-L, L]^2) or ((x0, x1), (y0, y1)), "
            f"got {limit!r}"
        ) from err
    if not all(map(math.isfinite, (x0, x1, y0, y1))) or not (x0 < x1 and y0 < y1):
        raise ValueError(f"limit must give finite ranges with x0 < x1, y0 < y1, got {limit!r}")
    return (x0, x1), (y0, y1)


def _labels(labels: Sequence[str] | None, dim: int) -> list[str]:
    if labels is None:
        return [f"x{i + 1}" for i in range(dim)]
    labels = [str(label) for label in labels]
    if len(labels) != dim:
        raise ValueError(f"labels must name the {dim} dimensions, got {len(labels)}: {labels}")
    return labels


def _flow_place(flow: TransformModule) -> tuple[torch.device, torch.dtype]:
    for tensor in (*flow.parameters(), *flow.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _log_density_grid(flow: TransformModule, window: Window, grid: int) -> np.ndarray:
    """The flow's exact log-density at the centres of a ``grid x grid`` lattice over
    ``window``, as a ``(grid, grid)`` array indexed ``[y, x]``."""
    from .evaluation import _eval_mode, _logdet_method, make_density

    device, dtype = _flow_place(flow)
    (x0, x1), (y0, y1) = window
    xs = torch.linspace(x0, x1, grid, device=device, dtype=dtype)
    ys = torch.linspace(y0, y1, grid, device=device, dtype=dtype)
    points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
    density = make_density(flow, (2,), device, dtype)
    # a stochastic log-det would paint its noise into the picture: always the exact one
    with _eval_mode(flow), _logdet_method(flow, "exact"), torch.no_grad():
        logp = torch.cat([density.log_prob(chunk) for chunk in points.split(8192)])
    return logp.reshape(grid, grid).cpu().double().numpy()


def _check_2d_flow(flow: TransformModule) -> None:
    if not isinstance(flow, torch.nn.Module):
        raise ValueError(f"flow must be a flow module (TransformModule), got {type(flow).__name__}")
    dim = getattr(flow, "flow_config", {}).get("input_dim", 2)
    if dim != 2:
        raise ValueError(
            f"density_figure draws 2-D flows, got one of dimension {dim}; for D > 2 draw "
            "samples over the data with pair_figure"
        )


def density_figure(
    flow: TransformModule,
    data: Any = None,
    *,
    title: str | None = None,
    log_density: bool = False,
    grid: int = 200,
    limit: float | Sequence[Sequence[float]] | None = None,
    labels: Sequence[str] = ("x1", "x2"),
) -> Figure:
    """A 2-D flow's density on a grid, beside a histogram of the data on the same scale.

    The model panel shows :math:`p(x)` (or :math:`\\log p(x)` with ``log_density``) at the
    centres of a ``grid x grid`` lattice, scored in eval mode with the exact
    log-determinant whatever estimator the blocks train with, so the picture has no
    estimator noise. With ``data``, a second panel on its left shows the data's normalised
    2-D histogram in the same colours, so the two panels compare directly; one colour
    bar serves both. Log-densities more than :data:`LOG_DENSITY_RANGE` nats below the
    model's highest share the lowest colour.

    Arguments:
        flow: a flow on ``R^2`` (mapping base noise to data, as
            :func:`~pyro_invres.train.fit_density` fits); left in the mode it was in.
        data: ``(N, 2)`` tensor or array drawn beside the model, or ``None``.
        title: the figure's title (for instance the flow, the data and the test NLL).
        log_density: draw :math:`\\log p(x)` rather than :math:`p(x)`.
        grid: points per axis of the lattice (``grid**2`` are scored).
        limit: the window: a number ``L`` for ``[-L, L]^2``, or ``((x0, x1), (y0, y1))``;
            ``None`` takes it from ``data`` (square when both axes spread alike).
        labels: names of the two axes.

    Returns:
        The figure: one or two panels and a colour bar.

    Raises:
        ValueError: for a flow of another dimension, data that are not ``(N, 2)``,
            neither ``data`` nor ``limit``, or a bad ``limit`` or ``grid``.

    Example:
        >>> from pyro_invres.datasets import sample_toy
        >>> from pyro_invres.flows import build_flow
        >>> flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8])
        >>> fig = density_figure(flow, sample_toy("moons", 500, seed=0), grid=20,
        ...                      log_density=True, title="iresnet on moons")
        >>> [ax.get_title() for ax in fig.axes]
        ['data', 'model log-density', '']
        >>> fig.axes[2].get_ylabel()   # the colour bar
        'log density'
        >>> fig.savefig(__import__("io").BytesIO(), format="png")
    """
    _check_2d_flow(flow)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an integer >= 2, got {grid!r}")
    names = _labels(labels, 2)
    points, dropped = (None, 0) if data is None else _points(data, "data", 2)
    if limit is not None:
        window = _as_window(limit)
    elif points is not None:
        window = _window(points)
    else:
        raise ValueError("density_figure needs data or limit to choose the window it draws")

    logp = _log_density_grid(flow, window, grid)
    top = float(np.nanmax(logp)) if np.isfinite(logp).any() else 0.0
    if log_density:
        shown, low, label = logp, top - LOG_DENSITY_RANGE, "log density"
    else:
        shown, low, label = np.exp(logp), 0.0, "density"
        top = math.exp(top)
    extent = (*window[0], *window[1])
    panels = [] if points is None else ["data"]
    figure = _figure(4.6 * (len(panels) + 1) + 0.8, 4.6)
    axes = figure.subplots(1, len(panels) + 1, sharex=True, sharey=True, squeeze=False)[0]
    style = {"origin": "lower", "extent": extent, "vmin": low, "vmax": top, "aspect": "auto"}
    if points is not None:
        counts, _, _ = np.histogram2d(
            points[:, 0],
            points[:, 1],
            bins=int(min(grid, max(20, math.sqrt(len(points))))),
            range=window,
            density=True,
        )
        with np.errstate(divide="ignore"):  # an empty bin has log-density -inf: left blank
            empirical = np.log(counts.T) if log_density else counts.T
        axes[0].imshow(np.where(np.isfinite(empirical), empirical, np.nan), **style)
        axes[0].set_title(_titled("data", dropped))
    image = axes[-1].imshow(shown, **style)
    axes[-1].set_title("model log-density" if log_density else "model density")
    for ax in axes:
        ax.set_xlim(*window[0])
        ax.set_ylim(*window[1])
        ax.set_box_aspect(1)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    bar = figure.colorbar(image, ax=list(axes), extend="min" if log_density else "max")
    bar.set_label(label)
    if title is not None:
        figure.suptitle(title)
    return figure


def samples_figure(
    samples: Any,
    data: Any = None,
    *,
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> Figure:
    """2-D model samples as a scatter plot, beside the data in the same window.

    At most 5000 evenly spaced points of each are drawn.

    Arguments:
        samples: ``(N, 2)`` tensor or array of model samples.
        data: ``(M, 2)`` data drawn in a panel on the left, or ``None``.
        title: the figure's title.
        labels: names of the two axes (default ``x1``, ``x2``).

    Returns:
        The figure: one or two panels sharing their axes.

    Raises:
        ValueError: for points that are not ``(N, 2)`` (use :func:`pair_figure` for more
            dimensions), or no finite row.

    Example:
        >>> import torch
        >>> fig = samples_figure(torch.randn(300, 2), torch.randn(200, 2), title="samples")
        >>> [ax.get_title() for ax in fig.axes], fig.axes[0].get_xlabel()
        (['data', 'model samples'], 'x1')
    """
    names = _labels(labels, 2)
    drawn, dropped = _points(samples, "samples")
    if drawn.shape[1] != 2:
        raise ValueError(
            f"samples_figure draws 2-D points, got {drawn.shape[1]} columns: use pair_figure"
        )
    panels = [("model samples", drawn, dropped)]
    if data is not None:
        panels.insert(0, ("data", *_points(data, "data", 2)))
    window = _window(panels[0][1])
    figure = _figure(4.6 * len(panels), 4.6)
    axes = figure.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    for ax, (name, points, missing), colour in zip(axes, panels, ("C0", "C1")[-len(panels) :]):
        shown = _evenly(points, 5000)
        ax.scatter(shown[:, 0], shown[:, 1], s=2, alpha=0.4, linewidths=0, color=colour)
        ax.set_title(_titled(name, missing))
        ax.set_xlim(*window[0])
        ax.set_ylim(*window[1])
        ax.set_box_aspect(1)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    if title is not None:
        figure.suptitle(title)
    return figure


def pair_figure(
    samples: Any,
    data: Any = None,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    max_points: int = 2000,
    max_dims: int = 8,
) -> Figure:
    """A pair plot of model samples over the data: every pair of dimensions, and each one.

    Below the diagonal, panel ``(i, j)`` scatters dimension ``j`` against ``i`` (the data
    in grey, the samples over them in colour); on the diagonal, histograms of each
    dimension (as densities, so different numbers of points compare). Panels above the
    diagonal would repeat those below and are left out: a ``D``-dimensional plot has
    ``D (D + 1) / 2`` axes. Ranges come from the data (from the samples without data).

    Arguments:
        samples: ``(N, D)`` tensor or array of model samples, ``D >= 2``.
        data: ``(M, D)`` data, or ``None``.
        labels: names of the ``D`` dimensions (default ``x1, x2, ...``).
        title: the figure's title.
        max_points: at most this many evenly spaced rows of each are scattered (the
            histograms use every row).
        max_dims: draw at most the first ``max_dims`` dimensions (a pair plot of many
            more is unreadable and slow to draw); the title then says how many of how
            many are shown.

    Returns:
        The figure.

    Raises:
        ValueError: for fewer than two dimensions, data with another number of columns
            than the samples, or bad ``labels``, ``max_points`` or ``max_dims``.

    Example:
        >>> import torch
        >>> fig = pair_figure(torch.randn(500, 3), torch.randn(400, 3) * 2, title="3-D")
        >>> len(fig.axes), fig.axes[-1].get_xlabel()
        (6, 'x3')
    """
    for name, value in (("max_points", max_points), ("max_dims", max_dims)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
    drawn, dropped = _points(samples, "samples")
    dim = drawn.shape[1]
    if dim < 2:
        raise ValueError(f"a pair plot needs at least 2 dimensions, got {dim}")
    names = _labels(labels, dim)
    reference, missing = (None, 0) if data is None else _points(data, "data", dim)
    shown = min(dim, max_dims)
    ranges = _ranges(drawn if reference is None else reference)
    notes = [title] if title is not None else []
    if shown < dim:
        notes.append(f"dimensions 1-{shown} of {dim} shown")
    notes += [
        f"{what}: {n} non-finite rows not shown"
        for what, n in (("samples", dropped), ("data", missing))
        if n
    ]

    figure = _figure(1.9 * shown + 0.6, 1.9 * shown + 0.4)
    axes = figure.subplots(shown, shown, squeeze=False)
    few_samples = _evenly(drawn, max_points)
    few_data = None if reference is None else _evenly(reference, max_points)
    for i in range(shown):
        for j in range(shown):
            ax = axes[i, j]
            if j > i:
                ax.remove()
                continue
            if i == j:
                bins = np.linspace(*ranges[i], 41)
                if reference is not None:
                    ax.hist(reference[:, i], bins=bins, density=True, color="0.6", label="data")
                ax.hist(
                    drawn[:, i],
                    bins=bins,
                    density=True,
                    histtype="step",
                    color="C1",
                    linewidth=1.5,
                    label="model samples",
                )
                ax.set_yticks([])
            else:
                # samples underneath, the data over them in dark grey: drawn the other way
                # round, as many samples as data hide the data almost entirely
                ax.scatter(
                    few_samples[:, j], few_samples[:, i], s=1.5, color="C1", linewidths=0, alpha=0.4
                )
                if few_data is not None:
                    ax.scatter(
                        few_data[:, j], few_data[:, i], s=1.5, color="0.2", linewidths=0, alpha=0.5
                    )
                ax.set_ylim(*ranges[i])
            ax.set_xlim(*ranges[j])
            if i == shown - 1:
                ax.set_xlabel(names[j])
            else:
                ax.tick_params(labelbottom=False)
            if j == 0 and i > 0:
                ax.set_ylabel(names[i])
            elif j > 0:
                ax.tick_params(labelleft=False)
    if reference is not None:
        figure.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper right")
    if notes:
        figure.suptitle("; ".join(notes))
    return figure


def _series(history: Mapping[str, Any], key: str, name: str) -> np.ndarray:
    values = history.get(key, [])
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"history[{key!r}] must be a list of numbers ({name})") from err
    if array.ndim != 1:
        raise ValueError(f"history[{key!r}] must be a flat list of numbers, got {array.shape}")
    return array


def loss_figure(history: Mapping[str, Any], *, title: str | None = None) -> Figure:
    """The training loss of every step and the periodic held-out NLL, on the same axes.

    ``history`` is :attr:`~pyro_invres.train.FitResult.history` (or the same dict read
    back from JSON): ``"step"`` and ``"loss"``, and optionally ``"eval_step"`` and
    ``"eval_nll"``. Both curves are in nats per sample, so they compare directly: the
    loss is the NLL of one batch in training mode, the held-out NLL that of test data in
    eval mode. The first steps' loss is often far above the rest; the y axis stops at
    the 98th percentile of all values (plus a margin) so the end of training stays
    readable.

    Arguments:
        history: the curves, as described.
        title: the figure's title.

    Returns:
        The figure, with labelled axes and a legend.

    Raises:
        ValueError: when ``"step"`` and ``"loss"`` are missing, not numbers, or of
            different lengths (likewise ``"eval_step"`` and ``"eval_nll"``).

    Example:
        >>> history = {"step": [1, 2, 3, 4], "loss": [3.0, 2.5, 2.2, 2.1],
        ...            "eval_step": [2, 4], "eval_nll": [2.6, 2.15]}
        >>> fig = loss_figure(history, title="moons")
        >>> ax = fig.axes[0]
        >>> ax.get_xlabel(), [t.get_text() for t in ax.get_legend().get_texts()]
        ('step', ['training loss', 'held-out NLL'])
    """
    if not isinstance(history, Mapping) or "step" not in history or "loss" not in history:
        raise ValueError(
            "history must be a dict with 'step' and 'loss' lists (FitResult.history), got "
            f"{type(history).__name__}"
        )
    steps, loss = _series(history, "step", "steps"), _series(history, "loss", "losses")
    eval_steps = _series(history, "eval_step", "steps")
    eval_nll = _series(history, "eval_nll", "held-out NLL")
    if len(steps) != len(loss) or len(eval_steps) != len(eval_nll):
        raise ValueError(
            f"history lists differ in length: step {len(steps)}, loss {len(loss)}, "
            f"eval_step {len(eval_steps)}, eval_nll {len(eval_nll)}"
        )
    figure = _figure(6.4, 4.2)
    ax = figure.subplots()
    ax.plot(steps, loss, color="C0", linewidth=0.8, alpha=0.8, label="training loss")
    if len(eval_steps):
        ax.plot(eval_steps, eval_nll, "o-", color="C1", markersize=3, label="held-out NLL")
    values = np.concatenate([loss, eval_nll])
    values = values[np.isfinite(values)]
    if len(values):
        low, high = float(values.min()), float(np.quantile(values, 0.98))
        margin = 0.05 * (high - low) if high > low else 0.05 * (abs(low) + 1.0)
        ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats per sample)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title is not None:
        ax.set_title(title)
    return figure
