"""Fit a flow to data by maximum likelihood, the Pyro way, with safe checkpoints.

:func:`fit_density` turns a flow into the density

.. math::

    p(x) = \\mathcal{N}(f^{-1}(x); 0, I)\\,\\left|\\det J_{f^{-1}}(x)\\right|

(a :class:`~pyro.distributions.TransformedDistribution` of a standard normal), writes a
Pyro model that observes mini-batches of the data under a subsampled ``pyro.plate``,
pairs it with an empty guide, and runs :class:`~pyro.infer.SVI` with ``Trace_ELBO``.
With no latent variables the ELBO *is* the log-likelihood, so each step maximises

.. math::

    \\frac{1}{B} \\sum_{i \\in \\text{batch}} \\log p(x_i)

(the model is scaled by ``1/N``: losses read directly as nats per sample).

For residual flows, build the flow with ``explicit="inverse"`` (as
:func:`~pyro_invres.flows.build_flow` does) so that scoring data is one explicit pass per
block and only sampling iterates.

A non-finite loss stops training *before* anything is written. Checkpoints hold the
flow's ``state_dict``, the optimiser state (``svi.optim.get_state()``), the step, the RNG
states and the config that rebuilds the flow; :mod:`pyro_invres.checkpoint` writes them
atomically, reads them safely and rebuilds the flow. This module only trains: flows by
name live in :mod:`pyro_invres.flows`, scoring in :mod:`pyro_invres.evaluation`.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.torch_transform import TransformModule
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor

# The `X as X` imports are re-exports: these names lived here before the registry,
# checkpoints and evaluation got modules of their own, and code still imports them here.
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    _rng_state,
    _set_rng_state,
    load_checkpoint,
    save_checkpoint,
)
from .checkpoint import MAX_CONFIG_INT as MAX_CONFIG_INT
from .checkpoint import atomic_write as atomic_write
from .checkpoint import load_flow as load_flow
from .evaluation import evaluate_nll, inverse_iterations, make_density
from .flows import FLOWS as FLOWS
from .flows import build_flow as build_flow
from .optim import JointOptim, joint_adam

__all__ = [
    "FIT_DEFAULTS",
    "DegenerateDataError",
    "FitResult",
    "NonFiniteLossError",
    "fit_density",
]

#: The training schedule :func:`fit_density` and ``pyro-invres fit`` both default to: 1200
#: Adam steps on batches of 256, the learning rate decaying geometrically from ``1e-2`` to
#: ``1e-3`` (``lr_final`` is a fraction of ``lr``), gradient norms clipped at 10, and the
#: held-out NLL scored every 100 steps. With ``build_flow("iresnet-2d", 2)`` it trains on
#: ``moons`` in about a minute of one CPU thread; how the flow and the schedule were chosen
#: is in the docs (``docs/tradeoffs.md``, "How the pyro-invres fit flow was tuned").
FIT_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "steps": 1200,
        "batch_size": 256,
        "lr": 1e-2,
        "lr_final": 0.1,
        "clip_norm": 10.0,
        "eval_every": 100,
    }
)

_NON_FINITE = re.compile(r"non-finite|\b(nan|inf)\b", re.IGNORECASE)


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or parameter; ``step`` says when.

    Attributes:
        step: the 1-based optimisation step at which it happened.
        loss: the loss of that step.

    Example:
        >>> flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8])
        >>> data = torch.full((8, 2), float("nan"))
        >>> fit_density(flow, data, steps=5, progress=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pyro_invres.train.NonFiniteLossError: non-finite loss (nan) at step 1; training stopped ...
    """

    def __init__(self, step: int, loss: float, detail: str = "") -> None:
        self.step = int(step)
        self.loss = float(loss)
        what = f"non-finite loss ({loss})" if not math.isfinite(loss) else "non-finite parameters"
        super().__init__(
            f"{what} at step {step}; training stopped and no checkpoint was written for it"
            f"{detail} (try a lower lr or a smaller clip_norm)"
        )


class DegenerateDataError(ValueError):
    """The data have no density to fit, or training reached a loss no density of them has.

    :func:`fit_density` raises it before training for columns with no spread (constant,
    or varying only in the last bits of the float) and for columns that are exact linear
    functions of one another; and during training, before that step's checkpoint, when
    the loss runs absurdly far from a Gaussian fit to the data or an ActNorm scale
    explodes (the flow squeezing a direction of the data to nothing: the data lie on a
    lower-dimensional set, or are discrete values that need dequantisation noise).

    Attributes:
        columns: the event indices involved (ints for vectors, tuples for images).
        step: the 1-based step at which training stopped; None before training.

    Example:
        >>> data = torch.cat([torch.randn(64, 2), torch.full((64, 1), 3.0)], 1)
        >>> flow = build_flow("iresnet", 3, num_blocks=1, hidden_dims=[8])
        >>> fit_density(flow, data, steps=5, progress=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pyro_invres.train.DegenerateDataError: data column 2 has no spread ...
    """

    def __init__(self, message: str, columns: Sequence[Any] = (), step: int | None = None) -> None:
        self.columns = list(columns)
        self.step = step
        super().__init__(message)


# -- training -------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """What :func:`fit_density` returns.

    Attributes:
        losses: the loss of every step (mean NLL of the batch, nats per sample).
        train_nll: NLL of the training data (up to ``eval_max`` samples) in eval mode.
        test_nll: NLL of ``test_data`` in eval mode, or ``None``.
        wall_time: seconds spent in the optimisation steps of this call.
        eval_time: seconds spent scoring held-out data during training (``eval_every``)
            and on the final evaluation.
        inverse_iterations: fixed-point iterations the blocks ran during this call.
        steps: the step reached (the total, counting resumed steps).
        start_step: the step training started (or resumed) from.
        checkpoint_path: where the checkpoint was written, if anywhere.
        config: the run's configuration, as stored in the checkpoint.
        history: the whole run's curves as plain lists (JSON-able), resumed steps
            included: ``"step"`` (1, 2, ...) and ``"loss"`` (the training loss of each),
            ``"eval_step"`` and ``"eval_nll"`` (the held-out NLL scored every
            ``eval_every`` steps and at the last one; empty without ``test_data``).

    Example:
        >>> from pyro_invres.datasets import sample_toy
        >>> flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8])
        >>> result = fit_density(flow, sample_toy("moons", 256, seed=0), steps=3,
        ...                      batch_size=64, progress=False)
        >>> len(result.losses), result.steps, result.test_nll is None
        (3, 3, True)
        >>> result.history["step"], result.history["eval_step"]
        ([1, 2, 3], [])
        >>> summary = result.summary()   # JSON-able: the last loss, not every one
        >>> "losses" in summary, "history" in summary, summary["final_loss"] == result.losses[-1]
        (False, False, True)
    """

    losses: list[float]
    train_nll: float
    test_nll: float | None
    wall_time: float
    eval_time: float
    inverse_iterations: int
    steps: int
    start_step: int = 0
    checkpoint_path: str | None = None
    config: dict = field(default_factory=dict)
    history: dict[str, list] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-step losses and the history, as plain JSON-able types."""
        out = asdict(self)
        out.pop("losses")
        out.pop("history")
        out["final_loss"] = self.losses[-1] if self.losses else None
        return out


def _all_finite(params: Sequence[Tensor]) -> bool:
    if not params:
        return True
    return bool(torch.stack([p.detach().isfinite().all() for p in params]).all())


def _as_plain(value: Any) -> Any:
    """Config values as the types ``weights_only`` loading and JSON accept."""
    if isinstance(value, Mapping):
        return {str(k): _as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def fit_density(
    flow: TransformModule,
    data: Tensor,
    *,
    steps: int = FIT_DEFAULTS["steps"],
    batch_size: int = FIT_DEFAULTS["batch_size"],
    lr: float = FIT_DEFAULTS["lr"],
    seed: int = 0,
    test_data: Tensor | None = None,
    device: str | torch.device = "cpu",
    clip_norm: float | None = FIT_DEFAULTS["clip_norm"],
    lr_final: float = FIT_DEFAULTS["lr_final"],
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: bool = False,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    logdet_eval: str | None = None,
    eval_max: int = 10_000,
    eval_every: int | None = FIT_DEFAULTS["eval_every"],
    progress: bool = True,
) -> FitResult:
    """Fit ``flow`` to ``data`` by maximum likelihood with Pyro's SVI.

    The model observes a random batch of ``batch_size`` rows each step::

        def model(data):
            pyro.module("flow", flow)
            with pyro.plate("data", N, subsample_size=batch_size) as idx:
                with poutine.scale(scale=1 / N):
                    pyro.sample("x", density, obs=data[idx])

    with an empty guide, ``Trace_ELBO`` and Adam (:func:`~pyro_invres.optim.joint_adam`:
    one ``torch.optim.Adam`` over all parameters, which ``SVI`` drives like any
    :class:`pyro.optim.PyroOptim`; each parameter's gradient norm is clipped at
    ``clip_norm`` and the learning rate decays geometrically from ``lr`` to
    ``lr * lr_final`` over ``steps``). The defaults (:data:`FIT_DEFAULTS`) are the schedule
    ``pyro-invres fit`` trains with, so its fit is, from Python::

        flow = build_flow("iresnet-2d", 2)     # the command line's tuned flow
        result = fit_density(flow, data, test_data=test)

    and ``pyro-invres fit --seed 0`` itself, bit for bit (same losses, same test NLL)::

        torch.set_num_threads(1)
        pyro.set_rng_seed(0)                    # before the flow's initial weights
        g = torch.Generator().manual_seed(0)
        data, test = sample_toy("moons", 20_000, g), sample_toy("moons", 5_000, g)
        result = fit_density(build_flow("iresnet-2d", 2), data, test_data=test)

    With ``test_data``, the held-out NLL is scored every ``eval_every`` steps and at the
    last one (:attr:`FitResult.history`), on at most ``eval_max`` evenly spaced rows of
    it, exactly as the final ``test_nll`` is (eval mode, ``logdet_eval``). It draws no
    random number that training sees: every generator's state is put back after it, so a
    fixed-seed fit is bit for bit the same with or without it.

    Parameters live in a private scope of Pyro's param store, so the global store is
    left as it was and a second fit in the same process never picks up the first one's
    parameters. Seeds torch, ``random`` and numpy with ``seed`` (``pyro.set_rng_seed``).

    A non-finite loss or parameter raises :class:`NonFiniteLossError` naming the step,
    before any checkpoint of that step is written: the last good checkpoint stays.

    Before the first step, every :class:`~pyro_invres.ActNorm` of the flow that is not
    initialised yet is initialised from the data (at most 4096 evenly spaced rows, pushed
    through the scoring side: :func:`~pyro_invres.initialize_actnorm`), so neither the
    first batch's size nor a resumed run changes it. Data without a density are refused
    before training with :class:`DegenerateDataError` naming the columns (no spread, or
    linear functions of one another; nearly constant ones get a warning), and a run whose
    loss runs away or whose ActNorm scale explodes stops with the same error.

    Arguments:
        flow: a flow mapping base noise to data; build residual flows with
            ``explicit="inverse"`` (:func:`build_flow` does) so scoring is explicit.
        data: training data ``(N, *event_shape)``.
        steps: the total number of optimisation steps (counting resumed ones).
        batch_size: rows per step (at most ``N``).
        lr: the initial learning rate.
        seed: seeds every RNG before training (ignored on resume: the checkpoint's RNG
            states are restored instead).
        test_data: held-out data scored at the end, in eval mode under ``no_grad``.
        device: where to train; the flow and the data are moved there.
        clip_norm: the largest gradient norm of each parameter tensor (``None``: no clipping).
        lr_final: the final learning rate as a fraction of ``lr``.
        checkpoint_path: write checkpoints there (atomically), every ``checkpoint_every``
            steps and at the end.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint_path`` if it exists; the run then continues
            exactly as an uninterrupted one would (parameters, optimiser and RNG states).
            New ``steps``, ``lr`` or ``lr_final`` are honoured: from the checkpoint's step
            on, the learning rate is the one a run started with them would use there;
            the checkpoint's ``config["fit"]["segments"]`` records each stretch's settings.
        config: how to rebuild the flow, stored in the checkpoint under ``"flow"``
            (default: ``flow.flow_config``, set by :func:`build_flow`).
        metadata: anything else to store with it under ``"metadata"`` (plain types), such
            as the name of the data set.
        logdet_eval: log-det estimator for the final evaluation (``None``: the blocks' own).
        eval_max: at most this many training rows are scored for ``train_nll``, and at
            most this many held-out rows at each ``eval_every`` step.
        eval_every: score ``test_data`` every this many steps and at the last one
            (``None``: never during training; without ``test_data`` there is nothing to
            score). Either way the history's held-out lists then stay empty.
        progress: show a tqdm progress bar on stderr.

    Returns:
        A :class:`FitResult`; the flow is trained in place and left in training mode.

    Raises:
        NonFiniteLossError: when a step's loss or the parameters after it are not finite.
        DegenerateDataError: for degenerate data, before or during training.
        CheckpointError: when ``resume`` finds an unreadable or mismatched checkpoint.

    Example:
        >>> from pyro_invres.datasets import sample_toy
        >>> flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[16])
        >>> result = fit_density(flow, sample_toy("moons", 512, seed=0), steps=20,
        ...                      batch_size=128, progress=False)
        >>> len(result.losses), result.losses[-1] < result.losses[0]
        (20, True)

        The command line's flow and schedule (here cut to 6 steps), scored every 3:

        >>> data, test = sample_toy("moons", 2048, seed=0), sample_toy("moons", 512, seed=1)
        >>> flow = build_flow("iresnet-2d", 2)
        >>> result = fit_density(flow, data, test_data=test, steps=6, eval_every=3,
        ...                      progress=False)
        >>> result.history["eval_step"], result.history["eval_nll"][-1] == result.test_nll
        ([3, 6], True)
    """
    _check_fit_args(data, steps, batch_size, lr, checkpoint_every, resume, checkpoint_path)
    _check_eval_every(eval_every)
    gaussian_nll, narrow = _check_not_degenerate(data)
    device = torch.device(device)
    flow.to(device)
    flow.train()
    data = data.to(device)
    n_data, event_shape = len(data), tuple(data.shape[1:])
    batch_size = min(int(batch_size), n_data)
    flow_config = dict(config) if config is not None else getattr(flow, "flow_config", None)
    run_config = {
        "flow": _as_plain(flow_config),
        "fit": _as_plain(
            {
                "steps": steps,
                "batch_size": batch_size,
                "lr": lr,
                "lr_final": lr_final,
                "clip_norm": clip_norm,
                "seed": seed,
                "event_shape": list(event_shape),
            }
        ),
        "metadata": _as_plain(dict(metadata or {})),
    }
    density = make_density(flow, event_shape, device, data.dtype)

    def model(batch_source: Tensor) -> None:
        pyro.module("flow", flow)
        with pyro.plate("data", n_data, subsample_size=batch_size, device=device) as idx:
            with poutine.scale(scale=1.0 / n_data):
                pyro.sample("x", density, obs=batch_source[idx])

    def guide(batch_source: Tensor) -> None:
        """No latent variables: the ELBO is the log-likelihood of the batch."""

    optim = joint_adam(lr, clip_norm=clip_norm, gamma=float(lr_final) ** (1.0 / steps))
    pyro.set_rng_seed(seed)
    start, losses, evals = 0, [], _EvalHistory()
    if resume and Path(checkpoint_path).is_file():  # type: ignore[arg-type]
        state = load_checkpoint(checkpoint_path)  # type: ignore[arg-type]
        start, losses = _restore(flow, optim, state, steps, run_config)
        evals = _EvalHistory.from_checkpoint(state, start, str(checkpoint_path))
    held_out = None
    if test_data is not None and eval_every is not None:
        held_out = _spread_rows(test_data.to(device, data.dtype), int(eval_max))

    # ActNorm initialises here, from the data and before the first step (a restored one
    # is initialised already and stays as it is), never from whatever the first call sees
    from .transforms.actnorm import initialize_actnorm

    if not math.isnan(gaussian_nll):  # non-finite data: step 1 says so (NonFiniteLossError)
        initialize_actnorm(flow, _spread_rows(data, 4096))
    watch = _DegeneracyWatch(flow, gaussian_nll, event_shape, narrow)
    iterations_before = inverse_iterations(flow)
    with pyro.get_param_store().scope():
        svi = SVI(model, guide, optim, Trace_ELBO(max_plate_nesting=1))
        params = list(flow.parameters())
        wall = time.perf_counter()
        bar = _progress(range(start, steps), progress, start, steps)
        where = f"; {checkpoint_path} holds the last good state" if checkpoint_path else ""
        for step in bar:
            try:
                loss = svi.step(data)
            except ValueError as err:
                # with Pyro's validation on, a nan or inf inside the flow is caught by a
                # support or input check before it reaches the loss
                if _all_finite(params) and not _NON_FINITE.search(str(err)):
                    raise
                raise NonFiniteLossError(step + 1, math.nan, where) from err
            optim.step()  # the learning-rate schedule
            if not math.isfinite(loss) or not _all_finite(params):
                raise NonFiniteLossError(step + 1, loss, where)
            watch.check(step + 1, float(loss), where)
            losses.append(float(loss))
            if held_out is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
                evals.score(step + 1, flow, held_out, logdet_eval)
            if progress and (step % 10 == 0 or step + 1 == steps):
                shown = {"nll": f"{loss:.3f}"}
                if evals.nll:
                    shown["test"] = f"{evals.nll[-1]:.3f}"
                bar.set_postfix(shown, refresh=False)
            if checkpoint_path is not None and (
                (step + 1) % checkpoint_every == 0 or step + 1 == steps
            ):
                state = {
                    "format": CHECKPOINT_FORMAT,
                    "step": step + 1,
                    "flow_state": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
                    "optim_state": svi.optim.get_state(),
                    "rng": _rng_state(),
                    "config": run_config,
                    "losses": list(losses),
                    "history": evals.as_dict(),
                }
                save_checkpoint(checkpoint_path, state)
        wall = time.perf_counter() - wall - evals.seconds
        iterations = inverse_iterations(flow) - iterations_before

    evaluation = time.perf_counter()
    train_rows = data[: int(eval_max)]
    train_nll = evaluate_nll(flow, train_rows, logdet=logdet_eval)
    test_nll = None
    if test_data is not None:
        test_nll = evaluate_nll(flow, test_data.to(device, data.dtype), logdet=logdet_eval)
    return FitResult(
        losses=losses,
        train_nll=train_nll,
        test_nll=test_nll,
        wall_time=wall,
        eval_time=time.perf_counter() - evaluation + evals.seconds,
        inverse_iterations=iterations,
        steps=steps,
        start_step=start,
        checkpoint_path=None if checkpoint_path is None else str(checkpoint_path),
        config=run_config,
        history={
            # the losses end at the last step; a checkpoint may hold fewer than its step
            "step": list(range(steps - len(losses) + 1, steps + 1)),
            "loss": list(losses),
            **evals.as_dict(),
        },
    )


#: Rows of the data that statistics and ActNorm's initialisation look at (evenly spaced,
#: so no random numbers are drawn and sorted data are still covered).
_STAT_ROWS = 20_000


def _spread_rows(data: Tensor, limit: int = _STAT_ROWS) -> Tensor:
    if len(data) <= limit:
        return data
    return data[torch.linspace(0, len(data) - 1, limit, device=data.device).round().long()]


def _name_columns(flat_indices: Sequence[int], event_shape: tuple[int, ...]) -> list[Any]:
    if len(event_shape) == 1:
        return [int(i) for i in flat_indices]
    return [tuple(int(j) for j in np.unravel_index(int(i), event_shape)) for i in flat_indices]


def _columns_text(columns: Sequence[Any], event_shape: tuple[int, ...]) -> str:
    word = "column" if len(event_shape) == 1 else "element"
    shown = ", ".join(str(c) for c in columns[:10])
    more = f", ... ({len(columns)} in all)" if len(columns) > 10 else ""
    return f"{word}{'s' if len(columns) > 1 else ''} {shown}{more}"


def _check_not_degenerate(data: Tensor) -> tuple[float, list[Any]]:
    """Refuse data that have no density; return a diagonal Gaussian's NLL of them (nats)
    and the nearly constant columns (warned about).

    A constant column makes the maximum likelihood infinite: the flow squeezes it without
    end and the losses run to 1e6-1e21 while nothing fails. So does a column that is a
    linear function of others. Both are named here, before any step is taken.
    """
    event_shape = tuple(data.shape[1:])
    with torch.no_grad():
        flat = data.detach().reshape(len(data), -1)
        if not bool(torch.isfinite(flat).all()):
            return math.nan, []  # training reports non-finite values itself, at step 1
        # a spread within a few float spacings of the values is no spread: exact min and
        # max over every row, in the data's own dtype
        hi, lo = flat.amax(0), flat.amin(0)
        eps = torch.finfo(flat.dtype).eps
        flat_const = (hi - lo) <= 4 * eps * torch.maximum(hi.abs(), lo.abs())
        if bool(flat_const.any()):
            columns = _name_columns(flat_const.nonzero().flatten().tolist(), event_shape)
            values = hi[flat_const][:3].tolist()
            raise DegenerateDataError(
                f"data {_columns_text(columns, event_shape)} "
                f"{'have' if len(columns) > 1 else 'has'} no spread (constant at "
                f"{', '.join(f'{v:.6g}' for v in values)}{'...' if len(columns) > 3 else ''}): "
                "a density of such data is infinite and a fit only diverges; drop the "
                "column(s), or add noise of the size of their measurement precision",
                columns,
            )
        rows = _spread_rows(flat).cpu().double()
        mean = rows.mean(0)
        std = (rows - mean).square().mean(0).sqrt()
        gaussian = float((0.5 * math.log(2 * math.pi * math.e) + std.log()).sum())
        # a spread of only a few float spacings per standard deviation: all but constant
        steps_per_sd = std / (eps * rows.abs().amax(0))
        narrow = _name_columns((steps_per_sd < 64).nonzero().flatten().tolist(), event_shape)
        if narrow:
            import warnings

            warnings.warn(
                f"data {_columns_text(narrow, event_shape)} "
                f"{'vary' if len(narrow) > 1 else 'varies'} by fewer than 64 float "
                f"spacings ({data.dtype}) per standard deviation: nearly constant, so a fit "
                "may diverge; drop them, or give them centred or in float64",
                stacklevel=3,
            )
        n, dim = rows.shape
        if 2 <= dim <= 256 and n > 2 * dim:
            standard = (rows - mean) / std
            corr = standard.T @ standard / n
            values, vectors = torch.linalg.eigh(corr)
            # the smallest eigenvalue rounding alone leaves, with room; below it the
            # columns are functions of each other up to the float spacing of the data
            reach = float((rows.abs().amax(0) / std).max())
            tol = min(max((10 * eps * reach) ** 2, 1e-12), 1e-6)
            null = vectors[:, values <= tol]
            if null.shape[1]:
                involved = null.abs().amax(1) > 1e-2
                columns = _name_columns(involved.nonzero().flatten().tolist(), event_shape)
                raise DegenerateDataError(
                    f"data {_columns_text(columns, event_shape)} are linear functions of "
                    f"one another (the smallest eigenvalue of their correlation matrix is "
                    f"{float(values[0]):.2g}): the data lie on a lower-dimensional subspace, "
                    "where a density is infinite and a fit only diverges; drop the "
                    "redundant column(s)",
                    columns,
                )
    return gaussian, narrow


class _DegeneracyWatch:
    """Stops a fit whose loss or ActNorm scales show the data have no density.

    Three signs, each far outside what a fit to data with a density can show:

    * the loss more than 1000 nats per dimension above both the first loss and a
      Gaussian fit to the data (a constant-like column blown up by a tiny scale);
    * the loss below a Gaussian fit by ``-log(eps)`` nats per dimension: a density that
      resolves every dimension finer than the float spacing of the data;
    * an ActNorm scale that moved by more than a factor ``1 / eps`` since this run began.
    """

    def __init__(
        self,
        flow: torch.nn.Module,
        gaussian_nll: float,
        event_shape: tuple,
        suspects: Sequence[Any] = (),
    ) -> None:
        from .transforms.actnorm import ActNorm

        self.norms = [(n, m) for n, m in flow.named_modules() if isinstance(m, ActNorm)]
        self.start = [m.log_scale.detach().clone() for _, m in self.norms]
        self.dims = math.prod(event_shape)
        params = list(flow.parameters())
        dtype = params[0].dtype if params else torch.float32
        self.resolution = -math.log(torch.finfo(dtype).eps)
        self.gaussian = gaussian_nll
        self.suspects = list(suspects)
        self.event_shape = tuple(event_shape)
        self.first: float | None = None
        parts = list(flow) if isinstance(flow, torch.nn.ModuleList) else []
        # the outermost ActNorm standardises the data themselves: its channels are columns
        self.data_side = (
            parts[-1]
            if parts and isinstance(parts[-1], ActNorm) and len(event_shape) == 1
            else None
        )

    def check(self, step: int, loss: float, where: str) -> None:
        if self.first is None:
            self.first = loss
        ceiling = self.first if math.isnan(self.gaussian) else max(self.first, self.gaussian)
        ceiling += 1e3 * self.dims
        advice = (
            "; the data may be degenerate (a nearly constant column, columns that are "
            "functions of one another, discrete values that need dequantisation noise)"
        )
        if self.suspects:
            advice += f"; nearly constant: data {_columns_text(self.suspects, self.event_shape)}"
        reference = ceiling - 1e3 * self.dims
        if loss > ceiling:
            raise DegenerateDataError(
                f"loss {loss:.4g} at step {step} is more than 1000 nats per dimension above "
                f"the first loss and a Gaussian fit to the data ({reference:.4g}): training "
                f"diverged{advice}, or lr is too high{where}",
                self.suspects,
                step,
            )
        floor = self.gaussian - self.dims * self.resolution
        if loss < floor:
            raise DegenerateDataError(
                f"loss {loss:.4g} at step {step} is below {floor:.4g}, what a density that "
                "resolves every dimension to the float spacing of the data would score: the "
                f"flow is collapsing the data onto a lower-dimensional set{advice}{where}",
                self.suspects,
                step,
            )
        if not self.norms:
            return
        with torch.no_grad():
            moved = [(m.log_scale - s).abs() for (_, m), s in zip(self.norms, self.start)]
            if float(torch.stack([d.max() for d in moved]).max()) <= self.resolution:
                return
        for (name, module), drift in zip(self.norms, moved):
            channels = (drift > self.resolution).nonzero().flatten().tolist()
            if not channels:
                continue
            columns = channels if module is self.data_side else []
            what = (
                f"data {_columns_text(columns, (self.dims,))}"
                if columns
                else f"channel(s) {channels[:10]} of ActNorm '{name}'"
            )
            raise DegenerateDataError(
                f"the scale of {what} changed by more than a factor "
                f"{math.exp(self.resolution):.2g} since training began (at step {step}): the "
                f"flow is squeezing a direction of the data to nothing{advice}{where}",
                columns,
                step,
            )


def _check_fit_args(
    data: Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    checkpoint_every: int,
    resume: bool,
    checkpoint_path: object,
) -> None:
    if not isinstance(data, Tensor) or data.dim() < 2 or len(data) < 2:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be a tensor (N >= 2, *event_shape), got {shape}")
    if not data.is_floating_point():
        raise ValueError(f"data must be floating point, got {data.dtype}")
    for name, value in [("steps", steps), ("batch_size", batch_size)]:
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(checkpoint_every, bool) or int(checkpoint_every) != checkpoint_every:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path")


def _check_eval_every(eval_every: int | None) -> None:
    if eval_every is None:
        return
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(
            f"eval_every must be a positive integer (steps) or None, got {eval_every!r}"
        )


@dataclass
class _EvalHistory:
    """The held-out NLL scored during training: at which steps, its values, the seconds spent."""

    step: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def score(self, step: int, flow: TransformModule, rows: Tensor, logdet: str | None) -> None:
        """Score ``rows`` as the final evaluation does, leaving every RNG as it was.

        A stochastic log-det (or anything else in eval mode) may draw random numbers;
        restoring the generators keeps training bit for bit what it is without scoring.
        """
        started = time.perf_counter()
        saved = _rng_state()
        try:
            nll = evaluate_nll(flow, rows, logdet=logdet)
        finally:
            _set_rng_state(saved)
        self.step.append(int(step))
        self.nll.append(float(nll))
        self.seconds += time.perf_counter() - started

    def as_dict(self) -> dict[str, list]:
        return {"eval_step": list(self.step), "eval_nll": list(self.nll)}

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any], step: int, where: str) -> _EvalHistory:
        """The scores a checkpoint holds (none in checkpoints written before they were kept)."""
        history = state.get("history")
        if history is None:
            return cls()
        steps = history.get("eval_step") if isinstance(history, Mapping) else None
        values = history.get("eval_nll") if isinstance(history, Mapping) else None
        ints = isinstance(steps, list) and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= step for s in steps
        )
        numbers = isinstance(values, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        )
        if not (ints and numbers and len(steps) == len(values)):  # type: ignore[arg-type]
            raise CheckpointError(
                f"checkpoint {where}: 'history' must hold equally long lists 'eval_step' "
                f"(steps 1..{step}) and 'eval_nll' (numbers), got {history!r:.120}"
            )
        return cls([int(s) for s in steps], [float(v) for v in values])  # type: ignore[union-attr]


def _restore(
    flow: TransformModule,
    optim: JointOptim,
    state: Mapping[str, Any],
    steps: int,
    run_config: dict[str, Any] | None = None,
) -> tuple[int, list[float]]:
    """Load a checkpoint to resume from, honouring this call's schedule.

    The parameters, optimiser moments and RNG states continue exactly. The learning-rate
    schedule is this call's (``lr``, ``lr_final``, ``steps`` in ``run_config["fit"]``): from
    the checkpoint's step on, each step uses the rate a run started with these settings
    would use there. Unchanged settings keep the saved state bit for bit (an interrupted
    run continues exactly). ``run_config["fit"]`` is updated to say what really ran:
    ``seed`` becomes the seed whose RNG states were restored, and ``segments`` lists each
    stretch of steps with the settings it used.
    """
    step = int(state["step"])
    if step > steps:
        raise CheckpointError(
            f"the checkpoint is at step {step}, past steps={steps}: pass steps >= {step} to "
            "continue it"
        )
    try:
        flow.load_state_dict(state["flow_state"])
    except RuntimeError as err:
        raise CheckpointError(f"the checkpoint does not fit this flow: {err}") from err
    optim_state = state["optim_state"]
    if run_config is not None:
        fit = run_config["fit"]
        optim_state = _replan_schedule(optim_state, step, steps, fit["lr"], fit["lr_final"])
        saved = dict(state["config"].get("fit") or {})
        segments = list(saved.get("segments") or [_segment(saved, 0)])
        fit["segments"] = [*segments, _segment(fit, step)]
        if "seed" in saved:  # the RNG states restored come from that seed's run
            fit["seed"] = saved["seed"]
    optim.set_state(optim_state)
    _set_rng_state(state["rng"])
    return step, [float(v) for v in state.get("losses", [])]


def _segment(fit: Mapping[str, Any], start: int) -> dict[str, Any]:
    keys = ("steps", "lr", "lr_final", "batch_size", "clip_norm")
    return {"from_step": start, **{k: fit.get(k) for k in keys}}


def _replan_schedule(
    optim_state: Mapping[str, Any], step: int, steps: int, lr: float, lr_final: float
) -> Mapping[str, Any]:
    """The saved optimiser state with the learning-rate schedule of ``lr, lr_final, steps``.

    :func:`fit_density`'s schedule is ``lr * gamma**k`` after ``k`` steps with
    ``gamma = lr_final ** (1 / steps)``; the saved scheduler holds the gamma and rates of
    the run that wrote it.
    """
    groups, scheduler = optim_state.get("groups"), optim_state.get("scheduler")
    gamma = float(lr_final) ** (1.0 / steps)  # as fit_density computes it
    if not groups or not isinstance(scheduler, Mapping):
        raise CheckpointError(
            "the checkpoint's optimiser state has no learning-rate schedule to resume"
        )
    if scheduler.get("gamma") == gamma and groups[0].get("initial_lr") == float(lr):
        return optim_state  # the same schedule: continue it exactly
    now = float(lr) * gamma**step
    state = dict(optim_state)
    state["groups"] = [{**group, "lr": now, "initial_lr": float(lr)} for group in groups]
    rates = len(scheduler.get("base_lrs") or [0])
    state["scheduler"] = {
        **scheduler,
        "gamma": gamma,
        "base_lrs": [float(lr)] * rates,
        "_last_lr": [now] * rates,
    }
    return state


def _progress(steps: range, enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, initial=start, total=total, desc="fit", file=sys.stderr, leave=False)
