"""Train a conditional flow on simulated pairs ``(theta, x)`` the Pyro way, with early stopping.

:func:`fit_conditional` maximises the conditional likelihood

.. math::

    \\frac{1}{|b|} \\sum_{i \\in b} \\log q(\\theta_i \\mid x_i)

over shuffled mini-batches ``b``, one epoch at a time, with :class:`~pyro.infer.SVI` on a
model that observes ``theta`` under ``flow.condition(x)`` and an empty guide (with no latent
variable the ELBO is the log-likelihood), as :func:`~pyro_invres.train.fit_density` does for
unconditional densities; it reuses that function's optimiser
(:func:`~pyro_invres.optim.joint_adam`), checkpoint format and error types.

Early stopping follows ``sbi`` (Greenberg et al. 2019; Tejero-Cantero et al. 2020): a
fraction of the pairs (default 10%) is held out, its loss is scored after every epoch in
eval mode, training stops when it has not improved for ``stop_after_epochs`` epochs
(default 20), and the flow is given the parameters of its best epoch.

References:
    [1] Greenberg, Nonnenmacher & Macke, *Automatic Posterior Transformation for
        Likelihood-Free Inference*, ICML 2019. arXiv:1905.07488
    [2] Tejero-Cantero et al., *sbi: A toolkit for simulation-based inference*, JOSS 2020.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor
from torch.distributions import constraints

from ..checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    _rng_state,
    _set_rng_state,
    load_checkpoint,
    save_checkpoint,
)
from ..optim import joint_adam
from ..train import NonFiniteLossError
from ..transforms.actnorm import ActNorm, initialize_actnorm
from .flow import ConditionalFlow

__all__ = ["ConditionalFitResult", "fit_conditional"]


@dataclass
class ConditionalFitResult:
    """What :func:`fit_conditional` returns.

    Attributes:
        train_losses: the mean training loss of every epoch (negative log-likelihood of
            ``theta`` given ``x``, nats per pair, in training mode).
        validation_losses: the validation loss after every epoch (eval mode).
        best_epoch: the epoch (1-based) whose parameters the flow holds now.
        best_validation_loss: its validation loss.
        epochs: epochs run in all (resumed ones included).
        stopped_early: whether training stopped because the validation loss had not
            improved for ``stop_after_epochs`` epochs (otherwise it reached ``max_epochs``).
        wall_time: seconds spent in this call (training and validation).
        n_train: training pairs.
        n_validation: validation pairs.
        checkpoint_path: where the checkpoint was written, if anywhere.

    Example:
        >>> result = ConditionalFitResult([1.0, 0.5], [1.1, 0.7], 2, 0.7, 2, False, 0.1, 90, 10)
        >>> result.summary()["best_validation_loss"], "train_losses" in result.summary()
        (0.7, False)
    """

    train_losses: list[float]
    validation_losses: list[float]
    best_epoch: int
    best_validation_loss: float
    epochs: int
    stopped_early: bool
    wall_time: float
    n_train: int
    n_validation: int
    checkpoint_path: str | None = None
    config: dict = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-epoch curves, as plain JSON-able types."""
        out = asdict(self)
        out.pop("train_losses")
        out.pop("validation_losses")
        return out


def _check_pairs(flow: ConditionalFlow, theta: Tensor, x: Tensor) -> None:
    if not isinstance(flow, ConditionalFlow):
        raise TypeError(
            f"flow must be a pyro_invres.npe.ConditionalFlow, got {type(flow).__name__}"
        )
    for name, value, dim in (("theta", theta, flow.input_dim), ("x", x, flow.context_dim)):
        if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[1] != dim:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor (N, {dim}), got {shape}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).any(1).sum())
            raise ValueError(f"{name} has {bad} row(s) with non-finite values (nan or inf)")
    if len(theta) != len(x):
        raise ValueError(
            f"theta and x must pair up: {len(theta)} parameters, {len(x)} observations"
        )
    if flow.support is not None:
        inside = flow.support.check(theta.to(flow.parameter_norm.loc))
        outside = int((~inside).reshape(len(theta), -1).any(-1).sum())
        if outside:
            raise ValueError(
                f"{outside} of {len(theta)} parameter rows lie outside the flow's support "
                f"{flow.support}: the flow gives them no density"
            )
        edge = _on_boundary(flow.support, theta)
        if edge.any():
            rows = edge.reshape(len(theta), -1).any(-1)
            raise ValueError(
                f"{int(rows.sum())} of {len(theta)} parameter rows lie on the boundary of the "
                f"flow's support {flow.support} (first: row {int(rows.nonzero()[0])}), where its "
                "map from R^D is infinite: they would be clamped to huge unconstrained values "
                "and distort the z-scoring and training. Leave them out, e.g. "
                "keep = ~(theta == lower).any(-1) & ~(theta == upper).any(-1)"
            )


def _on_boundary(support: Any, theta: Tensor) -> Tensor:
    """Where ``theta`` equals a finite bound of an interval-like support (elementwise)."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    edge = torch.zeros_like(theta, dtype=torch.bool)
    for name in ("lower_bound", "upper_bound"):
        bound = getattr(support, name, None)
        if bound is not None:
            bound = torch.as_tensor(bound, dtype=theta.dtype, device=theta.device)
            edge |= (theta == bound) & torch.isfinite(bound)
    return edge


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(train, validation)`` indices from a seeded permutation (sbi's split)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {fraction!r}")
    n_val = int(fraction * n)
    if n_val < 1 or n - n_val < 2:
        raise ValueError(
            f"{n} pairs with validation_fraction={fraction} leave {n_val} for validation and "
            f"{n - n_val} for training; need at least 1 and 2"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n - n_val].sort().values, perm[n - n_val :].sort().values


def _data_digest(theta: Tensor, x: Tensor) -> list[float]:
    """A cheap fingerprint of the training pairs, so a resume on other data is refused."""
    with torch.no_grad():  # on the CPU in float64: the same numbers on any device
        t, v = theta.detach().cpu().double(), x.detach().cpu().double()
        weights = torch.linspace(1.0, 2.0, len(t), dtype=torch.float64)
        return [
            float(t.sum()),
            float(v.sum()),
            float(weights @ t.sum(1)),
            float(weights @ v.sum(1)),
        ]


@torch.no_grad()
def _validation_loss(flow: ConditionalFlow, theta: Tensor, x: Tensor, chunk: int) -> float:
    """Mean ``-log q(theta | x)`` in eval mode, every random generator left as it was."""
    saved, was_training = _rng_state(), flow.training
    flow.eval()
    try:
        total = 0.0
        for t, c in zip(theta.split(chunk), x.split(chunk)):
            total += float(flow.condition(c).log_prob(t).sum())
    finally:
        flow.train(was_training)
        _set_rng_state(saved)
    return -total / len(theta)


def _initialize_actnorm(flow: ConditionalFlow, theta: Tensor, x: Tensor) -> None:
    """ActNorm layers initialise from the (standardised) training parameters, given their x."""
    pending = [m for m in flow.transform.modules() if isinstance(m, ActNorm)]
    if not any(not m.is_initialized for m in pending):
        return  # none (Pyro's own conditional flows), or all initialised already
    rows = torch.linspace(0, len(theta) - 1, min(len(theta), 4096), device=theta.device)
    rows = rows.round().long()
    with torch.no_grad():
        z = flow.parameter_norm.standardize(flow.unconstrain(theta[rows]))
        parts = flow.conditioned(x[rows])
    if not isinstance(parts, torch.nn.Module):
        raise TypeError(
            f"the flow holds ActNorm layers, but conditioning it gives a "
            f"{type(parts).__name__}, not a module through which they can be initialised; "
            "build it from pyro_invres blocks and Pyro's ConditionalComposeTransformModule"
        )
    initialize_actnorm(parts, z)


def fit_conditional(
    flow: ConditionalFlow,
    theta: Tensor,
    x: Tensor,
    *,
    batch_size: int = 200,
    lr: float = 5e-4,
    validation_fraction: float = 0.1,
    stop_after_epochs: int = 20,
    max_epochs: int = 1000,
    clip_norm: float | None = 5.0,
    z_score_theta: bool = True,
    z_score_x: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ConditionalFitResult:
    """Fit ``q(theta | x)`` to simulated pairs by maximum likelihood, with early stopping.

    Each epoch visits the training pairs once in a new random order, in mini-batches of
    ``batch_size`` (the last one smaller), each a step of :class:`~pyro.infer.SVI` on::

        def model(theta, x):
            pyro.module("npe", flow)
            with pyro.plate("batch", len(theta)), poutine.scale(scale=1 / len(theta)):
                pyro.sample("theta", flow.condition(x), obs=theta)

    with an empty guide and Adam at a constant ``lr``, each parameter tensor's gradient
    norm clipped at ``clip_norm`` (``sbi`` clips the norm of all gradients together). The
    defaults are ``sbi``'s: batches of 200, ``lr = 5e-4``, 10% validation, 20 epochs of
    patience. After each epoch the validation loss is scored in eval mode; the flow ends
    with the parameters of the epoch that scored best (also when ``max_epochs`` stops
    training first).

    Before the first epoch (not on resume), the z-scoring of ``theta`` (on the
    unconstrained side) and of ``x`` is fitted to the training pairs
    (:meth:`ConditionalFlow.standardize`), and uninitialised ActNorm layers initialise
    from them (:func:`~pyro_invres.initialize_actnorm`, through the scoring side).

    Arguments:
        flow: the :class:`~pyro_invres.npe.ConditionalFlow` to train (in place).
        theta: parameters ``(N, D)``, inside the flow's support.
        x: observations ``(N, C)``; row ``i`` was simulated from ``theta[i]``.
        batch_size: pairs per step.
        lr: Adam's learning rate.
        validation_fraction: the share of pairs held out (a seeded permutation).
        stop_after_epochs: stop after this many epochs without a better validation loss.
        max_epochs: the most epochs in all (counting resumed ones).
        clip_norm: the largest gradient norm of each parameter tensor (``None``: no clip).
        z_score_theta: fit the parameters' z-scoring (else it stays as it is).
        z_score_x: fit the observations' z-scoring.
        seed: seeds the split and every generator (``pyro.set_rng_seed``); on resume the
            checkpoint's generator states are restored instead.
        device: where to train (default: where the flow is); flow and data go there, the
            data in the flow's dtype.
        checkpoint_path: write a checkpoint there (atomically) every ``checkpoint_every``
            epochs and at the end: flow, optimiser, generators, split, curves, the best
            parameters so far and the patience counter.
        checkpoint_every: epochs between checkpoints.
        resume: continue from ``checkpoint_path`` if it exists, exactly as an uninterrupted
            run would (a run that had stopped returns at once). A new ``lr``,
            ``batch_size``, ``clip_norm``, ``stop_after_epochs`` or ``max_epochs`` applies
            from there on (the data, split and seed must be the checkpoint's).
        overwrite: start afresh even though ``checkpoint_path`` holds a checkpoint,
            replacing it (without ``resume`` or ``overwrite``, an existing checkpoint is
            refused rather than lost).
        progress: show a tqdm progress bar over epochs on stderr.

    Returns:
        A :class:`ConditionalFitResult`; the flow holds its best parameters, in eval mode.

    Raises:
        ValueError: for data that do not fit the flow (shapes, non-finite values,
            parameters outside the support) or a split that leaves no validation pair.
        NonFiniteLossError: when a step's loss or the parameters after it are not finite.
        CheckpointError: when ``resume`` finds an unreadable checkpoint, or one written
            for other data or another flow.
        FileExistsError: when ``checkpoint_path`` exists and neither ``resume`` nor
            ``overwrite`` is given.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> from pyro_invres.flows import conditional_residual_flow
        >>> from pyro_invres.npe import ConditionalFlow
        >>> prior = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)
        >>> theta = prior.sample((500,))
        >>> x = theta + 0.1 * torch.randn(500, 2)
        >>> flow = ConditionalFlow(conditional_residual_flow(2, 2, num_blocks=2, hidden_dims=[32]),
        ...                        2, 2, support=prior.support)
        >>> result = fit_conditional(flow, theta, x, max_epochs=3, progress=False)
        >>> result.epochs, result.n_train, result.n_validation, len(result.validation_losses)
        (3, 450, 50, 3)
        >>> flow.condition(torch.zeros(2)).sample((4,)).shape
        torch.Size([4, 2])
    """
    _check_pairs(flow, theta, x)
    batch_size = _positive_int("batch_size", batch_size)
    stop_after_epochs = _positive_int("stop_after_epochs", stop_after_epochs)
    max_epochs = _positive_int("max_epochs", max_epochs)
    checkpoint_every = _positive_int("checkpoint_every", checkpoint_every)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path")
    if checkpoint_path is not None and not (resume or overwrite) and Path(checkpoint_path).exists():
        raise FileExistsError(
            f"{checkpoint_path} already holds a checkpoint: pass resume=True to continue that "
            "run, overwrite=True to replace it, or another checkpoint_path"
        )
    started = time.perf_counter()
    reference = flow.parameter_norm.loc
    device = reference.device if device is None else torch.device(device)
    flow.to(device)
    theta = theta.to(device, reference.dtype)
    x = x.to(device, reference.dtype)
    train_idx, val_idx = _split(len(theta), float(validation_fraction), seed)
    train_idx, val_idx = train_idx.to(device), val_idx.to(device)
    theta_tr, x_tr = theta[train_idx], x[train_idx]
    theta_val, x_val = theta[val_idx], x[val_idx]
    n_train = len(theta_tr)
    config = {
        "fit": {
            "batch_size": batch_size,
            "lr": float(lr),
            "validation_fraction": float(validation_fraction),
            "stop_after_epochs": stop_after_epochs,
            "max_epochs": max_epochs,
            "clip_norm": clip_norm,
            "seed": seed,
            "n_pairs": len(theta),
            "input_dim": flow.input_dim,
            "context_dim": flow.context_dim,
            "data_digest": _data_digest(theta, x),
        },
        "flow": None,
        "metadata": {},
    }
    optim = joint_adam(lr, clip_norm=clip_norm)
    pyro.set_rng_seed(seed)
    run = _Run()
    if resume and Path(checkpoint_path).is_file():  # type: ignore[arg-type]
        saved = load_checkpoint(checkpoint_path)  # type: ignore[arg-type]
        run = _Run.restore(flow, optim, saved, config)
    else:
        if z_score_theta or z_score_x:
            flow.standardize(theta_tr if z_score_theta else None, x_tr if z_score_x else None)
        _initialize_actnorm(flow, theta_tr, x_tr)
    flow.train()

    def model(theta_b: Tensor, x_b: Tensor) -> None:
        pyro.module("npe", flow)
        with pyro.plate("batch", len(theta_b), device=device):
            with poutine.scale(scale=1.0 / len(theta_b)):
                pyro.sample("theta", flow.condition(x_b), obs=theta_b)

    def guide(theta_b: Tensor, x_b: Tensor) -> None:
        """No latent variables: the ELBO is the log-likelihood of the batch."""

    where = f"; {checkpoint_path} holds the last good state" if checkpoint_path else ""
    with pyro.get_param_store().scope():
        svi = SVI(model, guide, optim, Trace_ELBO(max_plate_nesting=1))
        params = list(flow.parameters())
        bar = _progress(run.epoch, max_epochs, progress)
        while not run.stopped and run.epoch < max_epochs:
            order = torch.randperm(n_train, device=device)
            total = 0.0
            for batch in order.split(batch_size):
                loss = svi.step(theta_tr[batch], x_tr[batch])
                run.steps += 1
                if not math.isfinite(loss) or not _all_finite(params):
                    raise NonFiniteLossError(run.steps, loss, where)
                total += float(loss) * len(batch)
            val_loss = _validation_loss(flow, theta_val, x_val, 4096)
            run.record(flow, total / n_train, val_loss, stop_after_epochs)
            if bar is not None:
                bar.update(1)
                shown = {"train": f"{run.train[-1]:.3f}", "val": f"{run.val[-1]:.3f}"}
                bar.set_postfix(shown, best=run.best_epoch, refresh=False)
            last = run.stopped or run.epoch == max_epochs
            if checkpoint_path is not None and (run.epoch % checkpoint_every == 0 or last):
                save_checkpoint(checkpoint_path, run.state(flow, svi.optim.get_state(), config))
        if bar is not None:
            bar.close()
    if run.best_state is not None:
        flow.load_state_dict(run.best_state)
    flow.eval()
    return ConditionalFitResult(
        train_losses=list(run.train),
        validation_losses=list(run.val),
        best_epoch=run.best_epoch,
        best_validation_loss=run.best_loss,
        epochs=run.epoch,
        stopped_early=run.stopped,
        wall_time=time.perf_counter() - started,
        n_train=n_train,
        n_validation=len(theta_val),
        checkpoint_path=None if checkpoint_path is None else str(checkpoint_path),
        config=config,
    )


def _all_finite(params: list[Tensor]) -> bool:
    return not params or bool(torch.stack([p.detach().isfinite().all() for p in params]).all())


def _progress(start: int, total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        initial=start,
        total=total,
        desc="fit_conditional",
        unit="epoch",
        file=sys.stderr,
        leave=False,
    )


@dataclass
class _Run:
    """The state of early stopping: curves, the best epoch and its parameters, patience."""

    epoch: int = 0
    steps: int = 0
    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, Tensor] | None = None
    since_best: int = 0
    stopped: bool = False

    def record(
        self, flow: ConditionalFlow, train_loss: float, val_loss: float, patience: int
    ) -> None:
        self.epoch += 1
        self.train.append(float(train_loss))
        self.val.append(float(val_loss))
        if val_loss < self.best_loss:  # a nan never improves
            self.best_loss, self.best_epoch, self.since_best = float(val_loss), self.epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in flow.state_dict().items()}
        else:
            self.since_best += 1
        self.stopped = self.since_best >= patience

    def state(self, flow: ConditionalFlow, optim_state: Mapping[str, Any], config: dict) -> dict:
        cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.epoch,
            "flow_state": cpu(flow.state_dict()),
            "optim_state": optim_state,
            "rng": _rng_state(),
            "config": copy.deepcopy(config),
            "losses": list(self.train),
            "npe": {
                "steps": self.steps,
                "validation_losses": list(self.val),
                "best_loss": self.best_loss,
                "best_epoch": self.best_epoch,
                "best_state": None if self.best_state is None else cpu(self.best_state),
                "since_best": self.since_best,
                "stopped": self.stopped,
            },
        }

    @classmethod
    def restore(
        cls, flow: ConditionalFlow, optim: Any, state: Mapping[str, Any], config: dict
    ) -> _Run:
        saved = state["config"].get("fit") or {}
        keys = ("n_pairs", "input_dim", "context_dim", "data_digest", "seed", "validation_fraction")
        for key in keys:
            if saved.get(key) != config["fit"][key]:
                raise CheckpointError(
                    f"the checkpoint was written for other data or another split ({key}: "
                    f"{saved.get(key)!r} there, {config['fit'][key]!r} now)"
                )
        npe = state.get("npe")
        if not isinstance(npe, Mapping):
            raise CheckpointError(
                "the checkpoint was not written by fit_conditional (no 'npe' entry)"
            )
        try:
            flow.load_state_dict(state["flow_state"])
        except RuntimeError as err:
            raise CheckpointError(f"the checkpoint does not fit this flow: {err}") from err
        optim_state = dict(state["optim_state"])
        if optim_state.get("groups"):  # this call's learning rate, as fit_density honours it
            lr = float(config["fit"]["lr"])
            optim_state["groups"] = [{**g, "lr": lr} for g in optim_state["groups"]]
        optim.set_state(optim_state)
        _set_rng_state(state["rng"])
        device = flow.parameter_norm.loc.device
        best = npe.get("best_state")
        return cls(
            epoch=int(state["step"]),
            steps=int(npe["steps"]),
            train=[float(v) for v in state["losses"]],
            val=[float(v) for v in npe["validation_losses"]],
            best_loss=float(npe["best_loss"]),
            best_epoch=int(npe["best_epoch"]),
            best_state=None if best is None else {k: v.to(device) for k, v in best.items()},
            since_best=int(npe["since_best"]),
            stopped=bool(npe["stopped"]),
        )
