"""Variational posteriors and NeuTra-HMC on recognised models: residual flows against Pyro's guides.

Models (:mod:`posterior_models`): eight schools centred and non-centred, Neal's funnel in
10-D, logistic regression on breast cancer, horseshoe regression on diabetes. Reference
posteriors (:mod:`posterior_reference`, stored under ``results/posterior_refs/``): exact for
the funnel, long NUTS runs otherwise; exact ``log Z`` for the funnel (0) and the eight
schools (quadrature).

Guides, each trained by the same SVI loop: Pyro's ``ClippedAdam`` (gradients clipped
elementwise at 10) with a learning rate decaying geometrically from ``--lr`` (1e-2) to
``--lr-final`` (1e-3) over ``--steps`` steps and held there after (the equal-time column
may run longer), ``Trace_ELBO(num_particles=8, vectorize_particles=True)``, the same seed,
one thread. A constant rate (``--lr-final`` equal to ``--lr``) leaves Adam's step noise in
the final guide, which the flows with many parameters feel most. ``--lr-grid 1e-2:1e-3
3e-3:3e-4`` trains every guide once per schedule and keeps, per column, the one with the
highest ELBO on ``--select-draws`` (2000) fresh guide draws, drawn apart from the draws
the metrics use: the choice never looks at the reference. The guides are:

================== ===========================================================================
``normal``         ``AutoNormal(model)`` (mean field)
``mvn``            ``AutoMultivariateNormal(model)`` (full-rank Gaussian)
``iaf``            ``AutoIAFNormal(model)``, Pyro's defaults (one IAF block, hidden ``3 D + 1``)
``spline``         ``AutoNormalizingFlow`` with 4 of Pyro's ``spline_coupling(D)`` (8 bins,
                   bound 3) and reversing ``Permute`` between them
``affine``         ``AutoNormalizingFlow`` with ``pyro_invres.flows.build_flow("affine", D)``
                   (4 affine couplings with ActNorm, the project's coupling flow)
``residual-plain`` ``AutoNormalizingFlow(model, lambda d: residual_flow(d, num_blocks=4))``:
                   4 i-ResNet blocks with ActNorm (the issue's baseline)
``residual``       ``pyro_invres.autoguide.AutoResidualFlow(model)`` (where it exists)
``residual-t``     ``AutoResidualFlow(model, base="student_t")``: a learned Student t base
``residual-i1``    ``AutoResidualFlow(model, init_scale=1.0)``: studied, not kept (only by name)
``residual-t-ls8`` the t base with ``log_scale_bound=8``: studied (only by name)
``residual-t-ar3`` the t base with 3 autoregressive layers and 3 blocks: studied (by name)
``residual-a1b1``  one autoregressive layer and one block (``num_autoregressive=1,
                   num_blocks=1``): the shallower NeuTra warp, studied (by name)
``residual-a1b0``  one autoregressive layer, no block: its ablation (by name)
``residual-b0``    the default's two autoregressive layers, no block (by name)
``residual-c05``   the default with ``lipschitz=0.5`` (by name)
================== ===========================================================================

Two columns per guide: **equal steps** (``--steps``, default 2000) and **equal time**:
every guide trains for the seconds the ``--time-ref`` guide (default ``residual``, else
``residual-plain``) needed for the steps (at most ``20 x --steps`` steps), in one run
scored at both points. Time is the process's CPU time: with one thread it is the wall
clock of an idle machine, and unlike the wall clock it does not count other people's load
on a shared one (both are in the JSON).

Metrics (:mod:`posterior_metrics`), from ``--draws`` (10,000) guide draws after training,
in ``eval()`` mode, no gradients: the ELBO, the importance-weighted ``log Z`` with its
Monte-Carlo standard error, the PSIS Pareto ``k`` of the importance weights, errors of the
posterior means (in reference sds) and sds (relative) in the unconstrained space, the neck
scales (funnel ``v``, eight schools ``log tau``), training time, steps and gradient
evaluations (steps x particles).

**log q is exact.** The guide scores its own draws: ``log q`` comes from Pyro's transform
cache (no inverse is run). Before scoring, every i-ResNet block in a guide is switched to
``logdet="exact"`` (``D`` vector-Jacobian products and ``slogdet``), whatever estimator it
trained with, and the guide's ``log q`` on a few draws is compared with ``log N(u) - log|det
J|`` from an autograd Jacobian of the whole flow; both are in the JSON (``log_q`` block).

Draws: the first ``--save-draws`` (2000) of each guide's metric draws at equal steps, in
the unconstrained coordinates the reference stores (float32), go to a side file next to the
JSON (``<out>_draws.npz``, keys ``<model>/<guide>`` plus ``<model>/names``) for figures
(``plot_posteriors.py``) without retraining.

NeuTra-HMC (``--neutra``): for each trained flow guide, ``NeuTraReparam(guide)`` and Pyro's
NUTS on the warped model (4 chains one after the other, 500 warmup + 500 draws each, chain
``c`` seeded ``seed + c``), against plain NUTS on the original model with the same
settings: bulk ESS (rank-normalised, minimum over the unconstrained parameters) per CPU second
and per gradient evaluation (model evaluations, counted), divergences, R-hat, and the neck
scale NUTS recovers. NeuTra runs on the models in ``--neutra-models`` (default the funnel
and centred eight schools).

Usage (from the repository root)::

    python examples/benchmarks/bench_posteriors.py --quick --out /tmp/posteriors.json
    python examples/benchmarks/bench_posteriors.py      # -> results/posteriors_cpu.json
    python examples/benchmarks/bench_posteriors.py --neutra --models funnel \
        eight_schools_centered --out examples/benchmarks/results/posteriors_neutra_cpu.json

A run split by guide (``--guides``, e.g. Pyro's guides while the project's own is still
changing; ``--no-nuts`` leaves plain NUTS to the other part) is joined by
``merge_posteriors.py``; ``plot_posteriors.py`` draws the figures from the saved draws and
``render_posteriors.py`` writes ``docs/posterior_results.md``.

``--quick`` (CI's smoke test): two models, 100 steps, 1000 draws, a 2 s equal-time budget
and, with ``--neutra``, 2 chains of 30 + 30; it writes JSON only where ``--out`` says.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions import TransformedDistribution
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.distributions.transforms import Permute, spline_coupling
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.infer.importance import vectorized_importance_weights
from pyro.infer.reparam import NeuTraReparam

sys.path.insert(0, str(Path(__file__).resolve().parent))

import posterior_metrics as pm  # noqa: E402
import posterior_models as models  # noqa: E402
from common import RESULTS_DIR, env_info, markdown_table, write_json  # noqa: E402
from posterior_reference import Reference, load_reference  # noqa: E402

from pyro_invres.flows import build_flow, residual_flow  # noqa: E402
from pyro_invres.transforms.iresnet import InvertibleResidual  # noqa: E402

try:
    from pyro_invres.autoguide import AutoResidualFlow
except ImportError:  # the guide lands on main separately; the harness runs without it
    AutoResidualFlow = None

PARTICLES = 8
LR, LR_FINAL, CLIP = 1e-2, 1e-3, 10.0


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A learning rate decaying geometrically from ``lr`` to ``lr_final`` over ``steps``.

    ``lr_t = lr * (lr_final / lr) ** (t / steps)`` for step ``t <= steps``, then
    ``lr_final``: Pyro's ``ClippedAdam`` with ``lrd = (lr_final / lr) ** (1 / steps)``,
    its decay switched off once ``steps`` steps are done.

    Example:
        >>> round(Schedule(1e-2, 1e-3).lrd(1000) ** 1000, 9)
        0.1
    """

    lr: float
    lr_final: float

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.lr_final > 0):
            raise ValueError(f"learning rates must be positive, got {self.lr}, {self.lr_final}")

    @property
    def label(self) -> str:
        if self.lr == self.lr_final:
            return f"{self.lr:g} constant"
        return f"{self.lr:g} -> {self.lr_final:g}"

    def lrd(self, steps: int) -> float:
        return (self.lr_final / self.lr) ** (1.0 / max(steps, 1))

    def optimizer(self, steps: int) -> pyro.optim.PyroOptim:
        return pyro.optim.ClippedAdam({"lr": self.lr, "lrd": self.lrd(steps), "clip_norm": CLIP})

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """``"1e-2:1e-3"`` (decaying) or ``"1e-2"`` (constant)."""
        try:
            parts = [float(x) for x in text.split(":")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2):
            raise ValueError(f"a schedule is LR or LR:LR_FINAL (e.g. 1e-2:1e-3), got {text!r}")
        return cls(parts[0], parts[-1])


def hold_learning_rate(optim: pyro.optim.PyroOptim) -> None:
    """Stop ``ClippedAdam``'s decay: every parameter's rate stays where it is."""
    for opt in optim.optim_objs.values():
        for group in opt.param_groups:
            group["lrd"] = 1.0


# -- guides -------------------------------------------------------------------------------------
def pyro_spline(dim: int, num_blocks: int = 4) -> ComposeTransformModule:
    """Pyro's spline couplings (8 bins, bound 3) with reversing permutations between them."""
    reverse = torch.arange(dim - 1, -1, -1)
    parts: list[Any] = []
    for k in range(num_blocks):
        if k:
            parts.append(Permute(reverse))
        parts.append(spline_coupling(dim, count_bins=8))
    return ComposeTransformModule(parts)


#: Guides only studied (``study_objectives.py --guide``), left out of a default run.
VARIANT_GUIDES = frozenset(
    {
        "residual-i1",
        "residual-t-ls8",
        "residual-t-ar3",
        "residual-a1b1",
        "residual-a1b0",
        "residual-b0",
        "residual-c05",
        "residual-a1b1-ls8",
        "residual-a1b1-lin",
        "residual-a1b1-lin-ls8",
        "residual-a1b0-lin-ls8",
    }
)


def guide_factories() -> dict[str, Callable[[Callable], Any]]:
    """The guides by name, each a function of the model (``residual`` where it exists)."""
    guides: dict[str, Callable[[Callable], Any]] = {
        "normal": AutoNormal,
        "mvn": AutoMultivariateNormal,
        "iaf": AutoIAFNormal,
        "spline": lambda m: AutoNormalizingFlow(m, pyro_spline),
        "affine": lambda m: AutoNormalizingFlow(m, lambda d: build_flow("affine", d)),
        "residual-plain": lambda m: AutoNormalizingFlow(
            m, lambda d: residual_flow(d, num_blocks=4)
        ),
    }
    if AutoResidualFlow is not None:
        guides["residual"] = AutoResidualFlow
        guides["residual-t"] = lambda m: AutoResidualFlow(m, base="student_t")
        # a variant studied and not kept (study_objectives.py; not in the default run)
        guides["residual-i1"] = lambda m: AutoResidualFlow(m, init_scale=1.0)
        guides["residual-t-ls8"] = lambda m: AutoResidualFlow(
            m, base="student_t", log_scale_bound=8.0
        )
        guides["residual-t-ar3"] = lambda m: AutoResidualFlow(
            m, base="student_t", num_autoregressive=3, num_blocks=3
        )
        # NeuTra warps of the study of where the funnel's divergences come from
        guides["residual-a1b1"] = lambda m: AutoResidualFlow(m, num_autoregressive=1, num_blocks=1)
        guides["residual-a1b0"] = lambda m: AutoResidualFlow(m, num_autoregressive=1, num_blocks=0)
        guides["residual-b0"] = lambda m: AutoResidualFlow(m, num_blocks=0)
        guides["residual-c05"] = lambda m: AutoResidualFlow(m, lipschitz=0.5)
        # the shallow warp with room for the neck's scale: a wider log-scale bound, and/or
        # a log-scale linear in the earlier coordinates (the funnel's exact form)
        shallow = {"num_autoregressive": 1, "num_blocks": 1}
        guides["residual-a1b1-ls8"] = lambda m: AutoResidualFlow(m, **shallow, log_scale_bound=8.0)
        guides["residual-a1b1-lin"] = lambda m: AutoResidualFlow(
            m, **shallow, autoregressive_hidden_dim=0
        )
        guides["residual-a1b1-lin-ls8"] = lambda m: AutoResidualFlow(
            m, **shallow, autoregressive_hidden_dim=0, log_scale_bound=8.0
        )
        guides["residual-a1b0-lin-ls8"] = lambda m: AutoResidualFlow(
            m, num_autoregressive=1, num_blocks=0, autoregressive_hidden_dim=0,
            log_scale_bound=8.0,
        )  # fmt: skip
    return guides


def is_flow(guide: Any) -> bool:
    """A guide NeuTra can warp with a learned nonlinear map (not the Gaussians)."""
    return isinstance(guide, AutoContinuous) and not isinstance(guide, AutoMultivariateNormal)


# -- training -----------------------------------------------------------------------------------
def _progress(losses: list[float], wall: float, cpu: float, error: str | None) -> dict[str, Any]:
    tail = losses[-100:] if losses else [float("nan")]
    return {
        "steps": len(losses),
        "grad_evals": len(losses) * PARTICLES,
        "wall_s": wall,
        "cpu_s": cpu,
        "ms_per_step": 1000 * cpu / max(len(losses), 1),
        "final_loss_mean100": float(np.mean(tail)),
        "error": error,
    }


def train(
    spec: models.PosteriorModel,
    factory: Callable,
    seed: int,
    steps: int,
    snapshot: Callable[[Any], dict],
    budget_s: float | None = None,
    max_steps: int | None = None,
    schedule: Schedule | None = None,
) -> tuple[Any, dict[str, dict]]:
    """One SVI run, scored at ``steps`` steps and, given a budget, at ``budget_s`` CPU seconds.

    The learning rate follows ``schedule`` (default ``LR -> LR_FINAL``) over ``steps``
    steps and stays at its final value after them.

    The run goes on until both points are passed (at most ``max_steps``), so a guide faster
    than the budget keeps training past ``steps`` and a slower one is scored at the budget
    first and at ``steps`` later. ``snapshot(guide)`` scores the guide; the clock stops
    while it runs and the guide is back in training mode afterwards.

    Returns:
        the guide and ``{"equal_steps": row, "equal_time": row}`` (the second only with a
        budget), each row ``{"train": progress, "metrics": snapshot's dict}``.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = factory(spec.model)
    elbo = Trace_ELBO(
        num_particles=PARTICLES,
        vectorize_particles=True,
        max_plate_nesting=models.MAX_PLATE_NESTING,
    )
    schedule = schedule or Schedule(LR, LR_FINAL)
    optim = schedule.optimizer(steps)
    svi = SVI(spec.model, guide, optim, elbo)
    max_steps = max(steps, max_steps or steps)
    wanted = ["equal_steps"] + (["equal_time"] if budget_s is not None else [])
    rows: dict[str, dict] = {}
    losses: list[float] = []
    wall, cpu, error = 0.0, 0.0, None

    def take(label: str, note: str | None = None) -> None:
        row: dict[str, Any] = {"train": _progress(losses, wall, cpu, error)}
        row["train"]["schedule"] = schedule.label
        if note:
            row["note"] = note
        if error is None:
            row["metrics"] = snapshot(guide)
            guide.train()
            if label == "equal_steps" and len(wanted) > 1:  # training goes on: keep this one
                row["guide"] = copy.deepcopy(guide)
        rows[label] = row

    while len(rows) < len(wanted) and error is None:
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            loss = svi.step()
            if not math.isfinite(loss):
                error = f"step {len(losses) + 1}: loss {loss}"
            losses.append(loss)
        except (ValueError, RuntimeError) as err:  # e.g. a distribution refusing a nan scale
            error = f"step {len(losses) + 1}: {type(err).__name__}: {str(err).splitlines()[0]}"
        wall += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        if "equal_steps" not in rows and len(losses) == steps:
            hold_learning_rate(optim)
            take("equal_steps")
        if "equal_time" in wanted and "equal_time" not in rows:
            if cpu >= budget_s:
                take("equal_time")
            elif len(losses) >= max_steps:
                take("equal_time", f"stopped at the step cap {max_steps} before the budget")
    for label in wanted:  # a failed run reports where it stopped
        if label not in rows:
            take(label)
    return guide, rows


# -- scoring ------------------------------------------------------------------------------------
def exact_scoring(guide: torch.nn.Module) -> list[tuple[str, InvertibleResidual, Any]]:
    """Switch every i-ResNet block to the exact log-det; returns ``(name, block, old logdet)``."""
    before = []
    for name, module in guide.named_modules():
        if isinstance(module, InvertibleResidual):
            before.append((name, module, module.logdet))
            module.logdet = "exact"
    return before


def restore_scoring(before: list[tuple[str, InvertibleResidual, Any]]) -> None:
    """Undo :func:`exact_scoring` (training goes on with the estimator it had)."""
    for _, module, logdet in before:
        module.logdet = logdet


def check_log_q(guide: Any, n: int = 4) -> dict[str, Any]:
    """Compare the guide's ``log q`` of its own draws with one from an autograd Jacobian.

    For a flow guide ``z = T(u)``, ``log q(z) = log N(u) - log|det dT/du|``; the Jacobian of
    the whole ``T`` is formed by ``torch.autograd.functional.jacobian`` on fresh inputs (no
    cache), independently of any estimator. Gaussian guides are exact in closed form.
    """
    if not isinstance(guide, AutoContinuous):
        return {"checked": False, "why": "mean-field Normal: closed-form log-density"}
    posterior = guide.get_posterior()
    if not isinstance(posterior, TransformedDistribution):
        return {"checked": False, "why": f"{type(posterior).__name__}: closed-form log-density"}
    transforms = posterior.transforms

    def apply(u: torch.Tensor) -> torch.Tensor:
        for t in transforms:
            u = t(u)
        return u

    diffs = []
    for _ in range(n):
        u = posterior.base_dist.sample()
        with torch.no_grad():
            z = apply(u)
            log_q = posterior.log_prob(z)  # the cached pair: what scoring the guide's draws uses
        jac = torch.autograd.functional.jacobian(apply, u.detach().clone())
        reference = posterior.base_dist.log_prob(u) - torch.linalg.slogdet(jac.double())[1]
        diffs.append(abs(float(log_q) - float(reference)))
    return {"checked": True, "draws": n, "max_abs_diff": max(diffs)}


def draw_and_weigh(
    spec: models.PosteriorModel, guide: Any, num_draws: int, chunk: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """``(log w, unconstrained draws)`` from ``num_draws`` guide draws, in chunks."""
    log_ws, draws = [], []
    with torch.no_grad():
        for start in range(0, num_draws, chunk):
            size = min(chunk, num_draws - start)
            log_w, _, guide_trace = vectorized_importance_weights(
                spec.model, guide, num_samples=size, max_plate_nesting=models.MAX_PLATE_NESTING
            )
            samples = {
                name: site["value"]
                for name, site in guide_trace.nodes.items()
                if site["type"] == "sample" and not site["infer"].get("is_auxiliary")
            }
            log_ws.append(log_w.double().numpy())
            draws.append(models.unconstrained(spec, samples).double().numpy())
    return np.concatenate(log_ws), np.concatenate(draws)


def neck_report(spec: models.PosteriorModel, sd: np.ndarray, ref: Reference) -> dict[str, Any]:
    out = {}
    for name in spec.neck:
        i = spec.names.index(name)
        out[name] = {
            "sd": float(sd[i]),
            "ref_sd": float(ref.sd[i]),
            "ratio": float(sd[i] / ref.sd[i]),
        }
    return out


def evaluate(spec: models.PosteriorModel, guide: Any, ref: Reference, num_draws: int) -> dict:
    """Every variational metric, with the guide in eval mode and exact log-dets."""
    guide.eval()
    switched = exact_scoring(guide)
    try:
        log_q = {"source": "the guide's own draws, scored through Pyro's transform cache"}
        log_q["iresnet_blocks_switched_to_exact"] = [
            f"{name}: {module.estimator.name} (trained with {old})"
            for name, module, old in switched
        ]
        log_q.update(check_log_q(guide))
        log_w, draws = draw_and_weigh(spec, guide, num_draws)
    finally:
        restore_scoring(switched)
    if not np.all(np.isfinite(log_w)):
        return {
            "error": f"{int((~np.isfinite(log_w)).sum())} non-finite log weights",
            "log_q": log_q,
        }
    elbo, elbo_se = pm.elbo(log_w)
    log_z, log_z_se = pm.iw_log_z(log_w)
    w = np.exp(log_w - log_w.max())
    errors = pm.moment_errors(draws, ref.mean, ref.sd)
    out = {
        "draws": num_draws,
        "elbo": elbo,
        "elbo_se": elbo_se,
        "iw_log_z": log_z,
        "iw_log_z_se": log_z_se,
        "log_z_ref": ref.log_z,
        "iw_log_z_gap": None if ref.log_z is None else log_z - ref.log_z,
        "khat": pm.psis_khat(log_w),
        "is_ess_fraction": float(w.sum() ** 2 / (w**2).sum() / len(w)),
        **pm.summarise_errors(errors),
        "mean_err": errors["mean_err"].tolist(),
        "sd_err": errors["sd_err"].tolist(),
        "neck": neck_report(spec, errors["sd"], ref),
        "log_q": log_q,
        "_draws": draws,  # taken out before the JSON is written (they go to the side file)
    }
    return out


def selection_elbo(spec: models.PosteriorModel, guide: Any, num_draws: int) -> float:
    """The ELBO on ``num_draws`` fresh guide draws: how ``--lr-grid`` picks a schedule.

    The draws are apart from the metric draws and nothing here looks at the reference, so
    the choice is one a user without a reference could make. Exact log-dets, eval mode.
    """
    guide.eval()
    switched = exact_scoring(guide)
    try:
        log_w, _ = draw_and_weigh(spec, guide, num_draws)
    finally:
        restore_scoring(switched)
    return pm.elbo(log_w)[0] if np.all(np.isfinite(log_w)) else -math.inf


# -- NeuTra-HMC ---------------------------------------------------------------------------------
class CountedModel:
    """The model with a call counter: one call per potential (and gradient) evaluation."""

    def __init__(self, model: Callable) -> None:
        self.model, self.calls = model, 0

    def __call__(self) -> None:
        self.calls += 1
        self.model()


def run_nuts(
    spec: models.PosteriorModel,
    guide: Any | None,
    chains: int,
    warmup: int,
    draws: int,
    seed: int,
    ref: Reference,
    max_tree_depth: int = 10,
    target_accept_prob: float = 0.8,
) -> dict[str, Any]:
    """NUTS on the model (``guide=None``) or on its NeuTra warp by ``guide``; diagnostics.

    ``target_accept_prob`` is the acceptance rate NUTS's step-size adaptation aims at
    (Pyro's default 0.8; higher means smaller steps, fewer divergences, more gradients).
    """
    counted = CountedModel(spec.model)
    neutra = None
    model: Callable = counted
    if guide is not None:
        guide.eval()
        exact_scoring(guide)  # NUTS needs the exact log-det (a noisy one breaks reversibility)
        guide.requires_grad_(False)
        neutra = NeuTraReparam(guide)
        model = poutine.reparam(counted, config=lambda msg: None if msg["is_observed"] else neutra)
    samples, divergences, steps_sizes = [], 0, []
    # where the divergent transitions' draws lie: the draw's row in the stacked chains, and
    # for NeuTra the norm of the warped chain's latent (far out in the base = the warp's tails)
    divergent_rows: list[int] = []
    latent_norms: list[np.ndarray] = []
    start, start_cpu = time.perf_counter(), time.process_time()
    for c in range(chains):
        pyro.set_rng_seed(seed + c)
        kernel = NUTS(
            model,
            max_plate_nesting=models.MAX_PLATE_NESTING,
            max_tree_depth=max_tree_depth,
            target_accept_prob=target_accept_prob,
        )
        mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, disable_progbar=True)
        mcmc.run()
        divergent = [i for v in mcmc.diagnostics()["divergences"].values() for i in v]
        divergences += len(divergent)
        divergent_rows += [c * draws + int(i) for i in divergent]
        steps_sizes.append(float(kernel.step_size))
        got = mcmc.get_samples()
        if neutra is not None:
            (latent,) = [v for k, v in got.items() if k.endswith("_shared_latent")]
            latent_norms.append(latent.reshape(draws, -1).norm(dim=-1).double().numpy())
            with torch.no_grad():
                got = neutra.transform_sample(latent.unsqueeze(-2))  # clear of the plate dim
        samples.append(models.unconstrained(spec, got).double().numpy())
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    x = np.stack(samples)
    ess, rh = pm.bulk_ess(x), pm.rhat(x)
    flat = x.reshape(-1, x.shape[-1])
    return {
        "chains": chains,
        "warmup": warmup,
        "max_tree_depth": max_tree_depth,
        "target_accept_prob": target_accept_prob,
        "draws": draws,
        "wall_s": wall,
        "cpu_s": cpu,
        "grad_evals": counted.calls,
        "divergences": divergences,
        "step_sizes": steps_sizes,
        "min_bulk_ess": float(ess.min()),
        "min_ess_param": spec.names[int(ess.argmin())],
        "max_rhat": float(rh.max()),
        "ess_per_s": float(ess.min() / cpu),
        "ess_per_grad": float(ess.min() / max(counted.calls, 1)),
        "neck": neck_report(spec, flat.std(0, ddof=1), ref),
        "divergent_at": divergence_report(spec, flat, divergent_rows, latent_norms),
        **pm.summarise_errors(pm.moment_errors(flat, ref.mean, ref.sd)),
    }


def divergence_report(
    spec: models.PosteriorModel,
    flat: np.ndarray,
    rows: list[int],
    latent_norms: list[np.ndarray],
) -> dict[str, Any]:
    """Where the divergent transitions' draws lie, against all draws.

    Per neck coordinate (unconstrained): its value at each divergent draw and its
    5/50/95% quantiles over all draws; for NeuTra, the norm of the base-space latent at
    each divergent draw against its median over all draws. The draws are listed in the
    same order everywhere (chain by chain), so a neck value pairs with its latent norm.
    """
    out: dict[str, Any] = {}
    for name in spec.neck:
        col = flat[:, spec.names.index(name)]
        out[name] = {
            "at_divergences": [float(col[r]) for r in rows],
            "quantiles_5_50_95": [float(q) for q in np.quantile(col, [0.05, 0.5, 0.95])],
        }
    if latent_norms:
        norms = np.concatenate(latent_norms)
        out["latent_norm"] = {
            "at_divergences": [float(norms[r]) for r in rows],
            "median": float(np.median(norms)),
        }
    return out


# -- tables -------------------------------------------------------------------------------------
def _f(v: Any, fmt: str = ".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def vi_table(model: str, rows: dict[str, dict]) -> str:
    headers = ["guide", "column", "steps", "CPU s", "ms/step", "ELBO", "IW log Z", "k-hat"]
    headers += ["mean err max", "sd err max", "neck sd (ref)"]
    lines = []
    for guide, by_col in rows.items():
        for col, r in by_col.items():
            t, m = r["train"], r.get("metrics", {})
            neck = "; ".join(
                f"{k} {v['sd']:.2f} ({v['ref_sd']:.2f})" for k, v in m.get("neck", {}).items()
            )
            if "elbo" not in m:
                why = t["error"] or m.get("error", "")
                fail = [guide, col, t["steps"], _f(t["cpu_s"], ".1f"), "", "failed", why]
                lines.append(fail + [""] * 4)
                continue
            lines.append(
                [
                    guide,
                    col,
                    t["steps"],
                    _f(t["cpu_s"], ".1f"),
                    _f(t["ms_per_step"], ".1f"),
                    _f(m["elbo"], ".2f"),
                    f"{m['iw_log_z']:.2f} ± {m['iw_log_z_se']:.2f}",
                    _f(m["khat"], ".2f"),
                    _f(m["mean_err_max"], ".2f"),
                    _f(m["sd_err_max"], ".2f"),
                    neck,
                ]
            )
    return f"### {model}\n\n" + markdown_table(headers, lines)


def neutra_table(model: str, rows: dict[str, dict]) -> str:
    headers = ["sampler", "CPU s", "grad evals", "min bulk ESS", "ESS/s", "ESS/1k grad"]
    headers += ["divergences", "max R-hat", "neck sd (ref)"]
    lines = []
    for name, r in rows.items():
        if "error" in r:
            lines.append([name, "failed: " + r["error"]] + [""] * 7)
            continue
        neck = "; ".join(f"{k} {v['sd']:.2f} ({v['ref_sd']:.2f})" for k, v in r["neck"].items())
        lines.append(
            [
                name,
                _f(r["cpu_s"], ".0f"),
                r["grad_evals"],
                _f(r["min_bulk_ess"], ".0f"),
                _f(r["ess_per_s"], ".2f"),
                _f(1000 * r["ess_per_grad"], ".2f"),
                r["divergences"],
                _f(r["max_rhat"], ".3f"),
                neck,
            ]
        )
    return f"### NeuTra-HMC: {model}\n\n" + markdown_table(headers, lines)


# -- driver -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    guides = list(guide_factories())
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: small everything (< 60 s)")
    p.add_argument("--models", nargs="+", choices=list(models.MODELS), default=None)
    p.add_argument("--guides", nargs="+", default=None, help=f"from {', '.join(guides)}")
    p.add_argument("--steps", type=int, default=None, help="SVI steps (default 2000; quick 100)")
    p.add_argument("--draws", type=int, default=None, help="guide draws for the metrics")
    p.add_argument("--time-ref", default=None, help="guide whose CPU time sets the budget")
    p.add_argument("--no-equal-time", action="store_true", help="skip the equal-time column")
    p.add_argument("--neutra", action="store_true", help="NeuTra-HMC and plain NUTS too")
    p.add_argument("--neutra-models", nargs="+", default=["funnel", "eight_schools_centered"])
    p.add_argument("--neutra-guides", nargs="+", default=None, help="default: every flow guide")
    p.add_argument(
        "--no-nuts",
        action="store_true",
        help="NeuTra only, no plain NUTS (another run with the same settings has it; "
        "merge_posteriors.py joins them)",
    )
    p.add_argument("--chains", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--nuts-draws", type=int, default=None)
    p.add_argument("--max-tree-depth", type=int, default=None, help="NUTS (default 10; quick 6)")
    p.add_argument(
        "--target-accept",
        type=float,
        default=0.8,
        help="NUTS's target acceptance rate for every sampler (Pyro's default 0.8)",
    )
    p.add_argument("--lr", type=float, default=LR, help=f"initial learning rate ({LR:g})")
    p.add_argument(
        "--lr-final",
        type=float,
        default=None,
        help=f"learning rate reached at --steps, geometric decay (default {LR_FINAL:g} "
        "for the default --lr, else --lr / 10; equal to --lr: constant)",
    )
    p.add_argument(
        "--lr-grid",
        nargs="+",
        default=None,
        metavar="LR[:LR_FINAL]",
        help="train each guide once per schedule and keep the one with the best ELBO on "
        "fresh draws (replaces --lr/--lr-final)",
    )
    p.add_argument("--select-draws", type=int, default=2000, help="draws for --lr-grid's ELBO")
    p.add_argument(
        "--save-draws", type=int, default=2000, help="draws per guide kept in <out>_draws.npz"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (full run default: results/)")
    args = p.parse_args(argv)
    try:
        if args.lr_grid:
            args.schedules = [Schedule.parse(text) for text in args.lr_grid]
        else:
            final = args.lr_final
            if final is None:
                final = LR_FINAL if args.lr == LR else args.lr / 10
            args.schedules = [Schedule(args.lr, final)]
    except ValueError as err:
        p.error(str(err))
    if len(set(args.schedules)) != len(args.schedules):
        p.error(f"--lr-grid repeats a schedule: {args.lr_grid}")
    if args.save_draws < 0 or args.select_draws < 2:
        p.error("--save-draws must be >= 0 and --select-draws >= 2")
    if not 0.0 < args.target_accept < 1.0:
        p.error(f"--target-accept must be in (0, 1), got {args.target_accept}")
    quick = args.quick
    args.models = args.models or (
        ["funnel", "eight_schools_centered"] if quick else list(models.MODELS)
    )
    args.guides = args.guides or [g for g in guides if g not in VARIANT_GUIDES]
    unknown = sorted(set(args.guides) - set(guides))
    if unknown:
        hint = " (pyro_invres.autoguide is not on this branch yet)" if "residual" in unknown else ""
        p.error(f"unknown guide(s) {unknown}{hint}; available: {', '.join(guides)}")
    defaults = {"steps": (40, 2000), "draws": (500, 10000), "chains": (2, 4)}
    defaults |= {"warmup": (30, 500), "nuts_draws": (30, 500), "max_tree_depth": (6, 10)}
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    if args.time_ref is None:
        args.time_ref = "residual" if "residual" in args.guides else "residual-plain"
    if args.time_ref not in args.guides:
        args.time_ref = args.guides[0]
    if args.out is None and not quick:
        name = (
            "posteriors_neutra_cpu.json"
            if args.neutra and args.no_equal_time
            else "posteriors_cpu.json"
        )
        args.out = str(RESULTS_DIR / name)
    return args


def train_best(
    spec: models.PosteriorModel,
    factory: Callable,
    args: argparse.Namespace,
    snapshot: Callable[[Any], dict],
    budget_s: float | None,
    max_steps: int | None,
) -> tuple[Any, dict[str, dict]]:
    """:func:`train` once per schedule of ``args.schedules``; per column, the best run.

    "Best" is the highest ``selection_elbo`` (fresh draws, no reference). Each column's row
    lists every schedule's selection ELBO under ``"grid"``.
    """
    if len(args.schedules) == 1:
        return train(spec, factory, args.seed, args.steps, snapshot, budget_s, max_steps)
    runs = []
    for schedule in args.schedules:
        guide, rows = train(
            spec, factory, args.seed, args.steps, snapshot, budget_s, max_steps, schedule
        )
        rows["equal_steps"].setdefault("guide", guide)
        runs.append(rows)

    def score(row: dict) -> float:
        got = row.get("metrics", {}).get("selection_elbo")
        return -math.inf if got is None else got

    best: dict[str, dict] = {}
    for col in runs[0]:
        grid = [
            {
                "schedule": r[col]["train"]["schedule"],
                "selection_elbo": r[col].get("metrics", {}).get("selection_elbo"),
                "final_loss_mean100": r[col]["train"]["final_loss_mean100"],
            }
            for r in runs
        ]
        best[col] = {**max((r[col] for r in runs), key=score), "grid": grid}
    return best["equal_steps"]["guide"], best


def run_model(spec: models.PosteriorModel, ref: Reference, args: argparse.Namespace) -> dict:
    """Every guide on one model, both columns (NeuTra-HMC is :func:`run_neutra`'s).

    The result's ``"_draws"`` (taken out before the JSON is written) holds each guide's
    first ``args.save_draws`` metric draws at equal steps.
    """
    factories = guide_factories()
    out: dict[str, dict] = {}
    at_steps: dict[str, Any] = {}  # each guide as it was after --steps steps (for NeuTra)
    kept_draws: dict[str, np.ndarray] = {}
    order = [args.time_ref] + [g for g in args.guides if g != args.time_ref]
    budget = None

    def snapshot(guide: Any) -> dict:
        got = evaluate(spec, guide, ref, args.draws)
        if len(args.schedules) > 1:
            got["selection_elbo"] = selection_elbo(spec, guide, args.select_draws)
        return got

    for name in order:
        cap = None if budget is None else 20 * args.steps
        guide, rows = train_best(spec, factories[name], args, snapshot, budget, cap)
        for col, row in rows.items():  # the metric draws leave the JSON here
            draws = row.get("metrics", {}).pop("_draws", None)
            if col == "equal_steps" and draws is not None and args.save_draws:
                kept_draws[name] = draws[: args.save_draws].astype(np.float32)
        kept = rows["equal_steps"].pop("guide", guide)
        if name == args.time_ref and not args.no_equal_time:
            budget = rows["equal_steps"]["train"]["cpu_s"]
            rows["equal_time"] = {**rows["equal_steps"], "note": "the time reference itself"}
        if "equal_time" in rows:
            rows["equal_time"]["budget_s"] = budget
        if rows["equal_steps"]["train"]["error"] is None:
            at_steps[name] = kept
        out[name] = rows
        t = rows["equal_steps"]["train"]
        print(f"  {name}: {t['steps']} steps, {t['cpu_s']:.1f} s", flush=True)
    result = {"guides": out, "time_budget_s": budget, "time_ref": args.time_ref}
    result["_draws"] = kept_draws
    result["_trained"] = at_steps  # NeuTra warps these (main runs it after writing the VI part)
    return result


def run_neutra(
    spec: models.PosteriorModel, ref: Reference, trained: dict, args: argparse.Namespace
) -> dict:
    wanted = args.neutra_guides or [n for n, g in trained.items() if is_flow(g)]
    nuts_args = (args.chains, args.warmup, args.nuts_draws, args.seed, ref, args.max_tree_depth)
    nuts_args += (args.target_accept,)
    rows = {}
    if not args.no_nuts:
        rows["nuts"] = run_nuts(spec, None, *nuts_args)
        print(f"  nuts: {rows['nuts']['cpu_s']:.0f} s", flush=True)
    for name in wanted:
        if name not in trained:
            rows[f"neutra-{name}"] = {"error": "guide not trained (failed or not selected)"}
            continue
        rows[f"neutra-{name}"] = run_nuts(spec, trained[name], *nuts_args)
        print(f"  neutra-{name}: {rows[f'neutra-{name}']['cpu_s']:.0f} s", flush=True)
    return rows


def git_state() -> dict[str, Any]:
    """The commit the run used, and whether the package differed from it (results say so)."""
    root = Path(__file__).resolve().parents[2]

    def git(*cmd: str) -> str:
        try:
            done = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True)
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "pyro_invres_modified": bool(git("status", "--porcelain", "--", "pyro_invres")),
    }


def draws_path(out: str | Path) -> Path:
    """The side file of a result JSON: ``posteriors_cpu.json -> posteriors_cpu_draws.npz``."""
    out = Path(out)
    return out.with_name(out.stem + "_draws.npz")


def write_draws(saved: dict[str, np.ndarray], out: str | Path) -> Path | None:
    """Write the kept guide draws next to ``out`` (float32, compressed); nothing if none."""
    if not saved:
        return None
    path = draws_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **saved)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "bench_posteriors",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python examples/benchmarks/bench_posteriors.py", *(argv or sys.argv[1:])]
        ),
        "settings": {
            "optimizer": f"ClippedAdam(clip_norm={CLIP:g}, elementwise)",
            "lr_schedule": [s.label for s in args.schedules],
            "lr_schedule_rule": "geometric decay from lr to lr_final over the steps, then "
            "held at lr_final"
            + (
                "; per guide and column, the schedule with the highest ELBO on "
                f"{args.select_draws} fresh draws (not the reference)"
                if len(args.schedules) > 1
                else ""
            ),
            "particles": PARTICLES,
            "vectorize_particles": True,
            "steps": args.steps,
            "draws": args.draws,
            "seed": args.seed,
            "quick": args.quick,
            "time_ref": args.time_ref,
            "equal_time": not args.no_equal_time,
            "metric_backend": pm.backend_name(),
            "eval_mode": True,
            "draws_file": draws_path(args.out).name if args.out and args.save_draws else None,
            "saved_draws": args.save_draws,
            "log_q": "exact: guide draws scored via the transform cache, i-ResNet blocks "
            "switched to logdet='exact', checked against an autograd Jacobian",
            "neutra": {
                "chains": args.chains,
                "warmup": args.warmup,
                "draws": args.nuts_draws,
                "max_tree_depth": args.max_tree_depth,
                "target_accept_prob": args.target_accept,
                "plain_nuts": not args.no_nuts,
            }
            if args.neutra
            else None,
        },
        "env": env_info(torch.device("cpu")),
        "git": git_state(),
        "models": {},
    }
    tables = []
    saved_draws: dict[str, np.ndarray] = {}
    for name in args.models:
        spec = models.MODELS[name]()
        try:
            ref = load_reference(name)
        except FileNotFoundError as err:  # the other models still run; the JSON says why
            print(f"{name}: skipped: {err}", flush=True)
            results["models"][name] = {"error": str(err)}
            continue
        print(f"{name} ({spec.description})", flush=True)
        res = run_model(spec, ref, args)
        trained = res.pop("_trained")
        kept = res.pop("_draws")
        if kept:
            saved_draws[f"{name}/names"] = np.array(spec.names)
            saved_draws.update({f"{name}/{guide}": x for guide, x in kept.items()})
        res["description"] = spec.description
        res["reference"] = {
            k: ref.meta.get(k) for k in ("method", "log_z", "min_bulk_ess", "max_rhat")
        }
        results["models"][name] = res
        mine = [vi_table(name, res["guides"])]
        print("\n" + mine[0] + "\n", flush=True)
        if args.out:  # a long run keeps what it has measured so far
            write_json({**results, "partial": True}, args.out)
            write_draws(saved_draws, args.out)
        if args.neutra and name in args.neutra_models:
            res["neutra"] = run_neutra(spec, ref, trained, args)
            mine.append(neutra_table(name, res["neutra"]))
            print("\n" + mine[-1] + "\n", flush=True)
            if args.out:
                write_json({**results, "partial": True}, args.out)
        tables += mine
    results["wall_s"] = time.perf_counter() - started
    if len(args.models) > 1:
        print("\n\n".join(tables))
    if args.out:
        print(f"wrote {write_json(results, args.out)}")
    return results


if __name__ == "__main__":
    main()
