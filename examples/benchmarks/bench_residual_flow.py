"""Residual flows: pyro_invres against normflows, training step, memory and inversion.

Training (density estimation, scoring data is the explicit pass on both sides):

* ours: ``pyro_invres.flows.residual_flow(D, K, hidden, explicit="inverse")`` (i-ResNet
  blocks interleaved with ActNorm) in a ``TransformedDistribution`` over ``N(0, I)``; a step
  is ``-log_prob(x).mean()``, backward, Adam. Spectral normalisation refreshes inside the
  forward pass.
* normflows: ``NormalizingFlow`` over ``[Residual(LipschitzMLP), ActNorm] * K`` with a fixed
  ``DiagGaussian``; ``Residual(reverse=True)`` applies ``x + g(x)`` to data in
  ``log_prob``/``forward_kld``, the same explicit side. A step is ``forward_kld``, backward,
  Adam, then ``update_lipschitz(model, n)`` (users must call it; the official example uses
  ``n=50``, users most often 5): ``--lipschitz-iters 5,1,50`` times ``n = 5`` as the
  headline (``nf_reduce_memory``, ``nf_plain``) and the others as ``nf_*@n`` in the same
  interleaved rounds. Measured with ``reduce_memory=True`` (Neumann-series gradient + backward in
  forward, its default) and ``reduce_memory=False`` (plain estimator, like ours).

Same estimator on both sides: one Gaussian Hutchinson probe, unbiased Russian roulette with
geometric ``p = 0.5``. normflows draws ``N >= 1`` (numpy's geometric) on top of
``n_exact_terms=2``; ours draws ``N >= 0`` on top of ``n_exact_terms``: ours with
``n_exact_terms=3`` has exactly the same law of the number of terms and the same weights
(mean 4 vector-Jacobian products per block). ``ours_nexact2`` (same nominal setting, one
term fewer on average) is timed too.

Peak training memory: the most memory a training step's own tensors hold at once, the
largest over ``--mem-steps`` steps after one warm-up step (so that one-time work, Adam's
state, ActNorm's data-dependent initialisation, the first power iterations, is not
counted). CPU: replaying the allocations the torch profiler records
(``common.peak_allocated_cpu``; resident-set sizes measure the C allocator's reuse, not
the tensors); CUDA: ``max_memory_allocated``. Both sides draw their roulette terms from
seeded generators (torch for ours, numpy for normflows) with the same law.

Same network: ``D -> hidden -> D`` with LipSwish-type activations, every layer spectrally
normalised to ``c ** (1/L)`` so that ``Lip(g) <= c = 0.9``; normflows' ``LipschitzMLP``
takes the per-layer coefficient and also puts an activation on the input.

Inversion: evaluations of ``g`` (and wall time in units of one forward pass of ``g``) to
invert a ``c = 0.9`` block to 1e-6 relative error with ``solver="fixed_point"`` and
``solver="anderson"`` (float64; counts from ``solve_stats``), on a random block scaled so
that the largest sampled ``||J_g||`` is ``c``, and per sample on the flow ``pyro-invres fit``
trains by default (its defaults, moons; sampling inverts every block).

Run ``python bench_residual_flow.py --help``; results go to
``results/residual_flow_<device>.json``.
"""

from __future__ import annotations

import cProfile
import io
import math
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    PhaseTimer,
    base_parser,
    env_info,
    interleaved_timing,
    markdown_table,
    memory_summary,
    mib,
    paired_ratio,
    peak_allocated_cpu,
    peak_memory,
    setup_device,
    sync,
    write_json,
)

LIPSCHITZ = 0.9
SOLVERS = ("fixed_point", "anderson", "newton")
CONFIGS: dict[str, dict[str, Any]] = {
    "A": {"dim": 2, "num_blocks": 8, "hidden": [64, 64], "batch": 256},
    "B": {"dim": 64, "num_blocks": 4, "hidden": [256, 256], "batch": 128},
}
ROULETTE_P = 0.5
NF_EXACT_TERMS = 2
OURS_EXACT_TERMS = 3  # same law of terms as normflows' n_exact_terms=2 (see module docstring)
LR = 1e-3
PRELOAD = ("torch", "numpy", "pyro", "pyro_invres", "normflows", "bench_residual_flow")


# -- data -----------------------------------------------------------------------------------
def data_pool(dim: int, n: int, seed: int = 0) -> torch.Tensor:
    """A mixture of 8 Gaussians in ``R^dim`` (8gaussians for ``dim = 2``), float32."""
    g = torch.Generator().manual_seed(seed)
    if dim == 2:
        angles = torch.arange(8) * (2 * math.pi / 8)
        centers = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    else:
        centers = torch.randn(8, dim, generator=g)
        centers = 2.0 * centers / centers.norm(dim=1, keepdim=True)
    labels = torch.randint(0, 8, (n,), generator=g)
    return centers[labels] + 0.2 * torch.randn(n, dim, generator=g)


# -- models ---------------------------------------------------------------------------------
def build_ours(
    cfg: dict[str, Any], device: torch.device, n_exact_terms: int, gradient: str | None = None
) -> tuple:
    import pyro.distributions as dist

    from pyro_invres.flows import residual_flow

    flow = residual_flow(
        cfg["dim"],
        cfg["num_blocks"],
        cfg["hidden"],
        explicit="inverse",
        lipschitz=LIPSCHITZ,
        activation="lipswish",
        logdet="roulette",
        n_exact_terms=n_exact_terms,
        roulette="geometric",
        roulette_param=ROULETTE_P,
        n_probes=1,
        probe="gaussian",
        **({} if gradient is None else {"gradient": gradient}),
    ).to(device)
    zeros = torch.zeros(cfg["dim"], device=device)
    base = dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)
    model = dist.TransformedDistribution(base, [flow])
    return flow, (lambda x: -model.log_prob(x).mean())


def build_normflows(cfg: dict[str, Any], device: torch.device, reduce_memory: bool) -> tuple:
    import normflows as nf

    per_layer = LIPSCHITZ ** (1.0 / (len(cfg["hidden"]) + 1))
    flows: list[nn.Module] = []
    for _ in range(cfg["num_blocks"]):
        net = nf.nets.LipschitzMLP(
            [cfg["dim"], *cfg["hidden"], cfg["dim"]],
            lipschitz_const=per_layer,
            init_zeros=False,  # ours starts from PyTorch's default init too
        )
        flows.append(
            nf.flows.Residual(
                net,
                reduce_memory=reduce_memory,
                n_exact_terms=NF_EXACT_TERMS,
                n_dist="geometric",
                geom_p=ROULETTE_P,
                n_samples=1,
                brute_force=False,
                exact_trace=False,
            )
        )
        flows.append(nf.flows.ActNorm(cfg["dim"]))
    q0 = nf.distributions.DiagGaussian(cfg["dim"], trainable=False)
    model = nf.NormalizingFlow(q0=q0, flows=flows).to(device)
    return model, model.forward_kld


# ours (default gradient), then each of our gradient modes next to its normflows analogue:
# "backprop" ~ nf_plain, "forward" (Neumann gradient computed in the forward) ~ nf_reduce_memory
IMPLS = {
    "ours": {"kind": "ours", "n_exact_terms": OURS_EXACT_TERMS, "gradient": None},
    "ours_backprop": {"kind": "ours", "n_exact_terms": OURS_EXACT_TERMS, "gradient": "backprop"},
    "ours_forward": {"kind": "ours", "n_exact_terms": OURS_EXACT_TERMS, "gradient": "forward"},
    "ours_nexact2": {"kind": "ours", "n_exact_terms": NF_EXACT_TERMS, "gradient": None},
    "nf_reduce_memory": {"kind": "normflows", "reduce_memory": True},
    "nf_plain": {"kind": "normflows", "reduce_memory": False},
}
MEMORY_IMPLS = ["ours", "ours_backprop", "ours_forward", "nf_reduce_memory", "nf_plain"]
RATIOS = [  # (ours, normflows): time and memory ratios reported
    ("ours", "nf_reduce_memory"),
    ("ours", "nf_plain"),
    ("ours_forward", "nf_reduce_memory"),
    ("ours_backprop", "nf_plain"),
    ("ours_nexact2", "nf_reduce_memory"),
]


def build_step(
    impl: str,
    config: str,
    device: str = "cpu",
    seed: int = 0,
    lipschitz_iters: int = 50,
    n_batches: int = 64,
    warm: bool = False,
) -> Any:
    """Model, data and optimizer of ``impl`` on ``config``; returns ``step(timer)``.

    The i-th call of every implementation's step sees the same batch. ``warm`` runs one
    step before returning, so that one-time work (optimizer state, data-dependent
    initialisation, first power iterations) is not counted as training memory.
    """
    dev = torch.device(device)
    cfg = CONFIGS[config]
    spec = IMPLS[impl]
    torch.manual_seed(seed)
    np.random.seed(seed)  # normflows draws its roulette terms with numpy
    pool = data_pool(cfg["dim"], n_batches * cfg["batch"], seed).to(dev)
    batches = pool.split(cfg["batch"])
    if spec["kind"] == "ours":
        module, loss_fn = build_ours(cfg, dev, spec["n_exact_terms"], spec["gradient"])
    else:
        module, loss_fn = build_normflows(cfg, dev, spec["reduce_memory"])
    opt = torch.optim.Adam(module.parameters(), lr=LR)
    counter = [0]

    def step(timer: PhaseTimer) -> None:
        x = batches[counter[0] % len(batches)]
        counter[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        timer.mark("forward")
        loss.backward()
        timer.mark("backward")
        opt.step()
        timer.mark("optimizer")
        if spec["kind"] == "normflows":
            from normflows.utils import update_lipschitz

            update_lipschitz(module, lipschitz_iters)
            timer.mark("update_lipschitz")

    if warm:
        step(PhaseTimer(dev))
        counter[0] = 0
    return step


def ours_block_settings() -> dict[str, Any]:
    """The options our blocks actually run with, read back from a built block."""
    from pyro_invres.nn.spectral import SpectralNormScale

    flow, _ = build_ours(CONFIGS["A"], torch.device("cpu"), OURS_EXACT_TERMS)
    block = next(p for p in flow if hasattr(p, "solve_stats"))
    keys = [
        "logdet",
        "n_exact_terms",
        "roulette",
        "roulette_param",
        "n_probes",
        "probe",
        "gradient",
        "lipschitz",
        "explicit",
        "warm_start",
    ]
    # estimator options live on the block's estimator object (LEGACY_OPTIONS maps the names)
    from pyro_invres.transforms.iresnet import LEGACY_OPTIONS

    def read(key: str) -> Any:
        where, name = LEGACY_OPTIONS.get(key, ("block", key))
        return getattr(block.estimator if where == "estimator" else block, name)

    out = {"logdet": block.logdet_method, **{k: read(k) for k in keys[1:]}}
    sn = next(m for m in block.modules() if isinstance(m, SpectralNormScale))
    out["spectral_norm"] = {
        "n_power_iterations_cap": sn.n_power_iterations,
        "tol": sn.tol,
        "where": "inside the forward pass, when the weight changed",
    }
    return out


def estimator_description(lipschitz_iters: list[int]) -> dict[str, Any]:
    return {
        "ours_block_settings_read_back": ours_block_settings(),
        "family": "unbiased Russian-roulette power series, Hutchinson trace, 1 Gaussian probe",
        "ours": {
            "logdet": "roulette",
            "roulette": "geometric",
            "roulette_param": ROULETTE_P,
            "n_exact_terms": OURS_EXACT_TERMS,
            "extra_terms_law": "N ~ Geometric(p) on {0, 1, ...}",
            "n_probes": 1,
            "probe": "gaussian",
            "gradient_modes": {
                "ours": "package default (see ours_block_settings_read_back.gradient)",
                "ours_backprop": "gradient='backprop': through every term",
                "ours_forward": "gradient='forward': Neumann gradient computed in the forward",
            },
            "value_returned": "the estimate of log|det| itself (all modes)",
            "mean_terms_per_block": OURS_EXACT_TERMS + (1 - ROULETTE_P) / ROULETTE_P,
        },
        "ours_nexact2": {
            "n_exact_terms": NF_EXACT_TERMS,
            "otherwise": "as ours",
            "mean_terms_per_block": NF_EXACT_TERMS + (1 - ROULETTE_P) / ROULETTE_P,
        },
        "normflows": {
            "n_dist": "geometric",
            "geom_p": ROULETTE_P,
            "n_exact_terms": NF_EXACT_TERMS,
            "extra_terms_law": "N ~ numpy Geometric(p) on {1, 2, ...}",
            "n_samples": 1,
            "probe": "1 Gaussian (torch.randn_like)",
            "brute_force": False,
            "exact_trace": False,
            "mean_terms_per_block": NF_EXACT_TERMS + 1 / ROULETTE_P,
            "nf_reduce_memory": "reduce_memory=True: neumann_grad=True and "
            "grad_in_forward=True (value returned is the Neumann surrogate, not log|det|)",
            "nf_plain": "reduce_memory=False: basic estimator, backprop through every term",
            "update_lipschitz_iterations_per_step": lipschitz_iters[0],
            "update_lipschitz_iterations_also_timed": lipschitz_iters[1:],
        },
        "equivalence": "normflows (n_exact_terms=2, N>=1) and ours (n_exact_terms=3, N>=0) "
        "compute the same number of terms with the same weights, in law",
        "rng": "each round reseeds torch and numpy with the same seed for every impl; "
        "ours draws N with torch, normflows with numpy, so the draws differ step to step",
    }


def architecture_description(cfg: dict[str, Any]) -> dict[str, Any]:
    n_layers = len(cfg["hidden"]) + 1
    return {
        "layers": [cfg["dim"], *cfg["hidden"], cfg["dim"]],
        "lipschitz_total": LIPSCHITZ,
        "per_layer_coefficient": LIPSCHITZ ** (1 / n_layers),
        "ours_activation": "LipSwish x*sigmoid(beta x)/1.1, beta=softplus(b) init 1.0, "
        "between layers only",
        "normflows_activation": "Swish x*sigmoid(softplus(b) x)/1.1, softplus(b) init 0.97, "
        "also before the first layer (one more elementwise op on D values)",
        "actnorm": "after every residual block on both sides, data-initialised",
        "base": "standard normal, fixed",
        "init": "PyTorch default Linear init on both (normflows init_zeros=False)",
        "optimizer": f"Adam lr={LR}",
        "validation": "Pyro distribution validation on (Pyro's default)",
    }


# -- training benchmark ---------------------------------------------------------------------
def bench_training(args: Any, device: torch.device, config: str) -> dict[str, Any]:
    impls = list(IMPLS)
    primary, *others = args.lipschitz_iters
    steps = {name: build_step(name, config, str(device), args.seed, primary) for name in impls}
    # normflows again at the other update_lipschitz settings, in the same interleaved rounds
    pairs = list(RATIOS)
    for n in others:
        for name, spec in IMPLS.items():
            if spec["kind"] == "normflows":
                steps[f"{name}@{n}"] = build_step(name, config, str(device), args.seed, n)
        pairs += [(a, f"{b}@{n}") for a, b in RATIOS]

    def reseed(r: int) -> None:
        torch.manual_seed(10_000 + r)
        np.random.seed(10_000 + r)

    timing = interleaved_timing(
        steps, device, reps=args.reps, warmup=args.warmup, seed=args.seed, before_round=reseed
    )
    ratios = {f"{a}/{b}": paired_ratio(timing, a, b) for a, b in pairs}
    # without normflows' update_lipschitz, for reference (not what a user runs)
    excl = {}
    for a, b in pairs:
        ph = timing["impls"][b]["phases"]
        no_update = timing["impls"][b]["total"]["median"] - ph["update_lipschitz"]["median"]
        excl[f"{a}/{b}"] = timing["impls"][a]["total"]["median"] / no_update
    ratios["excluding_update_lipschitz_of_medians"] = excl
    del steps

    memory: dict[str, Any] = {}
    if args.mem_reps > 0:
        mem_impls = MEMORY_IMPLS
        runs: dict[str, list] = {n: [] for n in mem_impls}
        for r in range(args.mem_reps):
            order = mem_impls[r % len(mem_impls) :] + mem_impls[: r % len(mem_impls)]
            for name in order:
                kwargs = {
                    "impl": name,
                    "config": config,
                    "seed": args.seed,
                    "lipschitz_iters": primary,
                    "warm": True,
                }
                if device.type == "cpu":
                    step = build_step(**kwargs, device="cpu")
                    runs[name].append(peak_allocated_cpu(step, steps=args.mem_steps))
                    del step
                    continue
                runs[name].append(
                    peak_memory(
                        "bench_residual_flow:build_step",
                        kwargs,
                        device,
                        steps=args.mem_steps,
                        threads=args.threads,
                        preload=PRELOAD,
                    )
                )
        memory = {n: memory_summary(v) for n, v in runs.items()}
        memory["steps_per_run"] = args.mem_steps
        memory["ratios"] = {
            f"{a}/{b}": memory[a]["median_bytes"] / memory[b]["median_bytes"]
            for a, b in RATIOS
            if "median_bytes" in memory.get(a, {}) and "median_bytes" in memory.get(b, {})
        }
    for entry in timing["impls"].values():
        entry["samples"] = [round(s, 6) for s in entry["samples"]]
    by_iters = {
        str(n): {
            f"ours/{b}": ratios[f"ours/{b}" + ("" if n == primary else f"@{n}")]["of_medians"]
            for b in ("nf_reduce_memory", "nf_plain")
        }
        for n in args.lipschitz_iters
    }
    return {
        "config": CONFIGS[config],
        "architecture": architecture_description(CONFIGS[config]),
        "lipschitz_iters": {"primary": primary, "all": args.lipschitz_iters},
        "timing_seconds": timing,
        "time_ratios": ratios,
        "time_ratios_by_lipschitz_iters": by_iters,
        "peak_memory": memory,
    }


# -- inversion benchmark --------------------------------------------------------------------
class ScaledNet(nn.Module):
    """``x -> scale * net(x)``, counting evaluations and (optionally) the error of each iterate."""

    def __init__(self, net: nn.Module, scale: float) -> None:
        super().__init__()
        self.net = net
        self.scale = float(scale)
        self.calls = 0
        self.track: tuple[torch.Tensor, torch.Tensor] | None = None  # (y, x_true)
        self.errors: list[float] = []

    def _count(self, out: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.track is not None:
            y, x_true = self.track
            with torch.no_grad():  # the solver's next iterate is y - g(x)
                err = ((y - out) - x_true).norm(dim=-1) / x_true.norm(dim=-1)
            self.errors.append(float(err.max()))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._count(self.scale * self.net(x))

    def forward_with_jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g(x), J_g(x))`` for Newton's method: one evaluation, counted and tracked."""
        gx, jac = self.net.forward_with_jacobian(x)
        return self._count(self.scale * gx), self.scale * jac


def jacobian_norms(g: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``||J_g(x_i)||_2`` for every row of ``x`` (exact: one backward pass per output)."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        gx = g(xr)
        rows = [
            torch.autograd.grad(gx[:, k].sum(), xr, retain_graph=True)[0]
            for k in range(gx.shape[-1])
        ]
    jac = torch.stack(rows, dim=1)  # (batch, out, in)
    return torch.linalg.matrix_norm(jac.detach(), ord=2)


def cold_start() -> dict[str, Any]:
    """``warm_start=False`` (a solver option): every solve starts from its input."""
    return {"warm_start": False}


def settle_spectral(model: nn.Module, run: Any, max_calls: int = 50) -> dict[str, Any]:
    """Call ``run()`` until no spectral-norm vector moves any more; return the calls needed.

    In evaluation mode a refresh that stopped at its iteration cap is topped up on the next
    call, so two consecutive calls can see slightly different weights (after ``.to(float64)``
    for instance). Inverting with other weights than the forward used would show up as an
    error that has nothing to do with the solver.
    """
    from pyro_invres.nn.spectral import SpectralNormScale

    norms = [m for m in model.modules() if isinstance(m, SpectralNormScale)]

    def snapshot() -> list[torch.Tensor]:
        return [t.clone() for m in norms for t in (m.u, m.v)]

    before = snapshot()
    for calls in range(1, max_calls + 1):
        with torch.no_grad():
            run()
        after = snapshot()
        if all(torch.equal(a, b) for a, b in zip(before, after)):
            return {"calls": calls, "settled": True}
        before = after
    return {"calls": max_calls, "settled": False}


def _median(v: list[float]) -> float:
    return float(statistics.median(v)) if v else float("nan")


def _first_below(errors: list[float], target: float) -> int | None:
    return next((i + 1 for i, e in enumerate(errors) if e <= target), None)


def stopping_rules(
    g: nn.Module,
    w: torch.Tensor,
    x_true: torch.Tensor,
    method: str,
    contraction: float,
    rtol: float,
) -> dict[str, Any]:
    """Replay one block solve ``x = w - g(x)`` and ask when each stopping rule would stop.

    The solve runs with zero tolerance (to the noise floor) and records every iterate.
    ``oracle`` is the first evaluation whose true relative error is ``<= rtol``; ``banach``
    the first at which ``c / (1 - c) * step <= rtol * ||x||`` (the library's rule; it must
    equal the count the transform reports); ``observed_rate`` the first at which the same
    test with ``c`` replaced by the observed contraction ``q = max(s_k / s_{k-1},
    s_{k-1} / s_{k-2})`` passes: an a-posteriori estimate without a guarantee, shown for
    what it would save and what error it would let through.
    """
    from pyro_invres.ops.fixed_point import solve_fixed_point

    inputs: list[torch.Tensor] = []
    iterates: list[torch.Tensor] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        out = w - g(x)
        inputs.append(x)  # Anderson and Newton evaluate at their own points
        iterates.append(out)
        return out

    def f_and_jacobian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gx, jac = g.forward_with_jacobian(x)
        inputs.append(x)
        iterates.append(w - gx)
        return w - gx, -jac

    with torch.no_grad():
        solve_fixed_point(
            f,
            w,
            contraction=contraction,
            atol=0.0,
            rtol=0.0,
            max_iter=500,
            method=method,
            jacobian=f_and_jacobian if method == "newton" else None,
        )
    scale = float(x_true.norm())
    errors = [float((t - x_true).norm()) / scale for t in iterates]
    steps = [float((t - p).norm()) for t, p in zip(iterates, inputs)]
    sizes = [float(t.norm()) for t in iterates]
    factor = contraction / (1 - contraction)
    banach = next((k + 1 for k in range(len(steps)) if factor * steps[k] <= rtol * sizes[k]), None)
    rate = None
    for k in range(1, len(steps)):
        q = steps[k] / max(steps[k - 1], 1e-300)
        if k >= 2:
            q = max(q, steps[k - 1] / max(steps[k - 2], 1e-300))
        q = min(q, contraction)
        if q / (1 - q) * steps[k] <= rtol * sizes[k]:
            rate = k + 1
            break
    return {
        "oracle": _first_below(errors, rtol),
        "banach": banach,
        "observed_rate": rate,
        "observed_rate_error": errors[rate - 1] if rate else None,
    }


def nf_fixed_point_rule(net: ScaledNet, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """normflows' own inverse (``iResBlock._inverse_fixed_point``: atol = rtol = 1e-5 on the
    *squared* step), on our network; returns the solution and evaluations of ``g``."""
    from normflows.flows.residual import iResBlock

    block = iResBlock(net)
    net.calls = 0
    with torch.no_grad():
        x = block._inverse_fixed_point(y)
    return x, net.calls


def wall_times_against(
    reference: Any, runs: dict[str, Any], device: torch.device, reps: int
) -> tuple[float, dict[str, float]]:
    """Median seconds of ``reference`` and of each of ``runs``, timed in interleaved rounds."""
    timing = interleaved_timing({"reference": reference, **runs}, device, reps=reps, warmup=1)
    median = {name: t["total"]["median"] for name, t in timing["impls"].items()}
    return median.pop("reference"), median


def bench_random_block(args: Any, device: torch.device, config: str) -> dict[str, Any]:
    from pyro_invres.nn import LipschitzMLP
    from pyro_invres.transforms.iresnet import InvertibleResidual

    cfg = CONFIGS[config]
    dim = cfg["dim"]
    dtype = torch.float64
    torch.manual_seed(args.seed + 1)
    raw = LipschitzMLP(dim, cfg["hidden"], lipschitz=LIPSCHITZ).to(device, dtype).eval()
    probe_x = torch.randn(4096 if dim <= 8 else 512, dim, device=device, dtype=dtype)
    lip_raw = float(jacobian_norms(raw, probe_x).max())
    net = ScaledNet(raw, LIPSCHITZ / lip_raw)
    check = jacobian_norms(net, torch.randn(512, dim, device=device, dtype=dtype))
    net.calls = 0
    opts = {"atol": 0.0, "rtol": args.inverse_rtol, "max_iter": 10_000, **cold_start()}
    # every solve gets a fresh tensor (y.clone()), so the identity cache never answers
    blocks = {
        m: InvertibleResidual(net, dim, lipschitz=LIPSCHITZ, solver=m, **opts) for m in SOLVERS
    }
    x_true = torch.randn(args.inverse_batch, dim, device=device, dtype=dtype)
    settle = settle_spectral(net, lambda: net(x_true))
    with torch.no_grad():
        y = x_true + net(x_true)

    out: dict[str, Any] = {
        "dim": dim,
        "hidden": cfg["hidden"],
        "dtype": "float64",
        "target": {"atol": 0.0, "rtol": args.inverse_rtol},
        "solver_start": "cold (warm_start=False): every solve starts at its input",
        "spectral_norm_settle": settle,
        "lipschitz_bound_declared": LIPSCHITZ,
        "construction": "LipschitzMLP (lipswish) output scaled so max ||J_g|| over sampled "
        "N(0, I) points equals c",
        "jacobian_norm_on_fresh_points": {
            "max": float(check.max()),
            "median": float(check.median()),
        },
        "worst_case_iterations_ln(rtol)/ln(c)": math.log(args.inverse_rtol) / math.log(LIPSCHITZ),
    }

    # whole batch in one solve (every sample must converge) + wall time in forward passes
    def solve(method: str) -> Any:
        def run(timer: PhaseTimer) -> None:
            with torch.no_grad():
                blocks[method].inv(y.clone())
            timer.mark("solve")

        return run

    def forward_g(timer: PhaseTimer) -> None:
        with torch.no_grad():
            net(y)
        timer.mark("solve")

    batch: dict[str, Any] = {"batch_size": args.inverse_batch}
    for m, block in blocks.items():
        block.solve_stats.reset()
        with torch.no_grad():
            x_hat = block.inv(y.clone())
        err = (x_hat - x_true).norm(dim=-1) / x_true.norm(dim=-1)
        batch[m] = {
            "iterations": block.solve_stats.iterations,
            "converged": bool(block.solve_stats.last.converged),
            "max_rel_error": float(err.max()),
            "median_rel_error": float(err.median()),
        }
    x_nf, nf_calls = nf_fixed_point_rule(net, y)
    err = (x_nf - x_true).norm(dim=-1) / x_true.norm(dim=-1)
    batch["normflows_rule"] = {
        "evaluations": nf_calls,
        "max_rel_error": float(err.max()),
        "median_rel_error": float(err.median()),
        "note": "normflows' stopping rule, for reference; not asked to reach the target",
    }
    t_g, times = wall_times_against(
        forward_g, {m: solve(m) for m in SOLVERS}, device, args.inverse_time_reps
    )
    for m, t in times.items():
        batch[m]["wall_seconds_median"] = t
        batch[m]["forward_pass_equivalents"] = t / t_g
    batch["g_forward_seconds_median"] = t_g
    out["batch_solve"] = batch

    # per sample: a solve of each sample alone
    per: dict[str, Any] = {"n_samples": args.inverse_samples}
    for m, block in blocks.items():
        iters, oracle, errs, rates = [], [], [], []
        for i in range(args.inverse_samples):
            xi, yi = x_true[i : i + 1], y[i : i + 1]
            net.errors, net.track = [], (yi, xi)
            block.solve_stats.reset()
            with torch.no_grad():
                x_hat = block.inv(yi.clone())
            net.track = None
            iters.append(block.solve_stats.iterations)
            oracle.append(_first_below(net.errors, args.inverse_rtol))
            e = [v for v in net.errors if v > 0]
            if len(e) > 1:  # geometric-mean error reduction per evaluation of g
                rates.append((e[-1] / e[0]) ** (1.0 / (len(e) - 1)))
            errs.append(float((x_hat - xi).norm() / xi.norm()))
        per[m] = {
            "iterations_median": _median(iters),
            "iterations_max": max(iters),
            "oracle_iterations_median": _median([o for o in oracle if o is not None]),
            "oracle_note": "first iterate whose true relative error is <= rtol",
            "observed_rate_median": _median(rates),
            "rate_note": "(final error / first error) ** (1 / (iterations - 1)): the "
            "contraction actually seen, versus the bound c",
            "rel_error_median": _median(errs),
            "rel_error_max": max(errs),
        }
    nf_iters, nf_errs = [], []
    for i in range(args.inverse_samples):
        xi, yi = x_true[i : i + 1], y[i : i + 1]
        x_nf, calls = nf_fixed_point_rule(net, yi)
        nf_iters.append(calls)
        nf_errs.append(float((x_nf - xi).norm() / xi.norm()))
    per["normflows_rule"] = {
        "evaluations_median": _median(nf_iters),
        "rel_error_median": _median(nf_errs),
        "rel_error_max": max(nf_errs),
    }
    out["per_sample"] = per
    return out


def bench_trained_flow(args: Any, device: torch.device) -> dict[str, Any]:
    """Solver iterations when sampling from the flow ``pyro-invres fit`` trains by default."""
    from pyro_invres.cli import DEFAULTS, flow_options
    from pyro_invres.datasets import sample_toy
    from pyro_invres.train import build_flow, evaluate_nll, fit_density

    dim, dataset = 2, DEFAULTS["dataset"]
    steps = DEFAULTS["steps"] if args.toy_steps is None else args.toy_steps
    config = flow_options("iresnet")
    generator = torch.Generator().manual_seed(args.seed)
    train = sample_toy(dataset, DEFAULTS["n_train"], generator)
    held_out = sample_toy(dataset, DEFAULTS["n_test"], generator)
    flow = build_flow("iresnet", dim, **config)
    t0 = time.perf_counter()
    fit = fit_density(
        flow,
        train,
        steps=steps,
        batch_size=DEFAULTS["batch_size"],
        lr=DEFAULTS["lr"],
        lr_final=DEFAULTS["lr_final"],
        seed=args.seed,
        device=device,
        progress=False,
    )
    train_seconds = time.perf_counter() - t0
    state = flow.state_dict()
    lipschitz = config["lipschitz"]

    opts = {"atol": 0.0, "rtol": args.inverse_rtol, "max_iter": 10_000, **cold_start()}
    flows = {}
    for m in SOLVERS:
        f = build_flow("iresnet", dim, **{**config, "solver": m}, **opts)
        f.load_state_dict(state)
        flows[m] = f.to(device, torch.float64).eval()
    blocks = {m: [p for p in f if hasattr(p, "solve_stats")] for m, f in flows.items()}

    x_data = held_out[: args.inverse_samples].to(device, torch.float64)
    settle = {m: settle_spectral(f, lambda f=f: f.inv(x_data.clone())) for m, f in flows.items()}
    lips = []
    with torch.no_grad():
        z = flows["fixed_point"].inv(x_data)  # explicit side: data -> latent
        h = x_data
        for part in reversed(list(flows["fixed_point"])):
            if hasattr(part, "solve_stats"):
                lips.append(float(jacobian_norms(part.nn, h).max()))
            h = part.inv(h)
    out: dict[str, Any] = {
        "flow": f"build_flow('iresnet', 2, **{config}): the `pyro-invres fit` default",
        "lipschitz_bound_declared": lipschitz,
        "training": {
            "steps": steps,
            "batch": DEFAULTS["batch_size"],
            "lr": DEFAULTS["lr"],
            "lr_final": DEFAULTS["lr_final"],
            "data": dataset,
            "test_nll": evaluate_nll(flow, held_out.to(device)),
            "final_loss_mean_last_20": float(np.mean(fit.losses[-20:])),
            "seconds": train_seconds,
        },
        "dtype": "float64",
        "target": {"atol": 0.0, "rtol": args.inverse_rtol},
        "max_jacobian_norm_per_block_at_data_path": lips[::-1],
        "spectral_norm_settle": settle,
        "n_samples": args.inverse_samples,
        "what": "sampling direction x = f(z), z = f^{-1}(x_data): every block solve per sample",
    }
    # the pair every block solve of the sampling pass sees: its input and the exact answer
    # (blocks in stack order; both flows hold the same weights)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        h = x_data
        for part in reversed(list(flows["anderson"].parts)):
            below = part.inv(h)
            if hasattr(part, "solve_stats"):
                pairs.insert(0, (below, h))  # (w: latent side, x*: data side)
            h = below

    # wall time of sampling the whole held-out batch, in explicit passes of the flow
    def sample_with(m: str) -> Any:
        def run(timer: PhaseTimer) -> None:
            with torch.no_grad():
                flows[m](z.clone())
            timer.mark("sample")

        return run

    def explicit_pass(timer: PhaseTimer) -> None:
        with torch.no_grad():
            flows["fixed_point"].inv(x_data.clone())
        timer.mark("sample")

    t_explicit, times = wall_times_against(
        explicit_pass, {m: sample_with(m) for m in flows}, device, args.inverse_time_reps
    )
    out["batch_sampling"] = {
        "batch_size": int(z.shape[0]),
        "explicit_pass_seconds_median": t_explicit,
        **{
            m: {"seconds_median": t, "explicit_pass_equivalents": t / t_explicit}
            for m, t in times.items()
        },
    }
    for m, f in flows.items():
        rules = [
            stopping_rules(b.nn, w[i : i + 1], x[i : i + 1], m, lipschitz, args.inverse_rtol)
            for b, (w, x) in zip(blocks[m], pairs)
            for i in range(w.shape[0])
        ]
        per_sample, per_block, errs = [], [], []
        for i in range(args.inverse_samples):
            for b in blocks[m]:
                b.solve_stats.reset()
            with torch.no_grad():
                x_hat = f(z[i : i + 1].clone())
            counts = [b.solve_stats.iterations for b in blocks[m]]
            per_sample.append(sum(counts))
            per_block.extend(counts)
            xi = x_data[i : i + 1]
            errs.append(float((x_hat - xi).norm() / xi.norm()))
        out[m] = {
            "iterations_per_sample_median": _median(per_sample),
            "iterations_per_sample_max": max(per_sample),
            "iterations_per_block_solve_median": _median(per_block),
            "reconstruction_rel_error_median": _median(errs),
            "reconstruction_rel_error_max": max(errs),
            "stopping_rules_per_block_solve": {
                "what": "replayed solves (see stopping_rules): evaluations until each rule "
                "stops; oracle = first iterate within rtol of the exact answer",
                "n_solves": len(rules),
                "oracle_median": _median([r["oracle"] for r in rules if r["oracle"]]),
                "oracle_mean": float(np.mean([r["oracle"] for r in rules if r["oracle"]])),
                "banach_median": _median([r["banach"] for r in rules if r["banach"]]),
                "banach_mean": float(np.mean([r["banach"] for r in rules if r["banach"]])),
                "observed_rate_median": _median(
                    [r["observed_rate"] for r in rules if r["observed_rate"]]
                ),
                "observed_rate_violations": sum(
                    1
                    for r in rules
                    if r["observed_rate_error"] is not None
                    and r["observed_rate_error"] > args.inverse_rtol
                ),
                "observed_rate_worst_rel_error": max(
                    (r["observed_rate_error"] for r in rules if r["observed_rate_error"]),
                    default=None,
                ),
            },
        }
    return out


# -- profile --------------------------------------------------------------------------------
def profile_step(args: Any, device: torch.device, config: str, impl: str) -> dict[str, Any]:
    step = build_step(impl, config, str(device), args.seed, args.lipschitz_iters[0])
    timer = PhaseTimer(device)
    for _ in range(args.warmup):
        timer.start()
        step(timer)
    prof = cProfile.Profile()
    torch.manual_seed(0)
    np.random.seed(0)
    prof.enable()
    for _ in range(args.profile_steps):
        timer.start()
        step(timer)
    prof.disable()
    sync(device)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    rows = []
    total = max(v[3] for v in stats.stats.values())  # the outermost cumulative time
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({func})",
                "ncalls_per_step": ncalls / args.profile_steps,
                "tottime_ms_per_step": 1e3 * tottime / args.profile_steps,
                "cumtime_ms_per_step": 1e3 * cumtime / args.profile_steps,
            }
        )
    by_cum = sorted(rows, key=lambda r: -r["cumtime_ms_per_step"])[: args.profile_top]
    by_tot = sorted(rows, key=lambda r: -r["tottime_ms_per_step"])[: args.profile_top]
    return {
        "impl": impl,
        "config": config,
        "steps": args.profile_steps,
        "total_ms_per_step": 1e3 * total / args.profile_steps,
        "top_cumulative": by_cum,
        "top_self": by_tot,
    }


# -- main -----------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise ValueError(f"expected distinct non-negative integers, got {text!r}")
    return values


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--configs", default="A,B")
    parser.add_argument(
        "--lipschitz-iters",
        type=_int_list,
        default=[5, 1, 50],
        help="normflows update_lipschitz iterations per step, a comma list: the first is "
        "the headline setting (nf_reduce_memory, nf_plain), the others are timed in the "
        "same interleaved rounds as nf_*@n (default 5,1,50: 5 is what users most often "
        "call, the official example uses 50)",
    )
    parser.add_argument("--mem-steps", type=int, default=5)
    parser.add_argument("--skip-inverse", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--inverse-rtol", type=float, default=1e-6)
    parser.add_argument("--inverse-batch", type=int, default=256)
    parser.add_argument("--inverse-samples", type=int, default=32)
    parser.add_argument("--inverse-time-reps", type=int, default=None)
    parser.add_argument(
        "--toy-steps", type=int, default=None, help="default: the `pyro-invres fit` default"
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="comma list of impls to cProfile on each config instead of "
        "benchmarking (e.g. ours,nf_plain)",
    )
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--profile-top", type=int, default=20)
    args = parser.parse_args()
    quick = args.quick
    args.reps = args.reps if args.reps is not None else (3 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.mem_reps = args.mem_reps if args.mem_reps is not None else 1
    args.inverse_time_reps = args.inverse_time_reps or (3 if quick else 7)
    args.toy_steps = args.toy_steps if args.toy_steps is not None else (20 if quick else None)
    if quick:
        args.inverse_samples = min(args.inverse_samples, 8)
        args.mem_steps = min(args.mem_steps, 2)
    device = setup_device(args)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]

    if args.profile:
        result = {
            "benchmark": "residual_flow_profile",
            "env": env_info(device),
            "profiles": [
                profile_step(args, device, c, impl)
                for c in configs
                for impl in args.profile.split(",")
            ],
        }
        for p in result["profiles"]:
            print(
                f"\n## cProfile {p['impl']} config {p['config']}: "
                f"{p['total_ms_per_step']:.1f} ms/step (profiled)"
            )
            print(
                markdown_table(
                    ["function (by self time)", "calls/step", "self ms/step", "cum ms/step"],
                    [
                        [
                            r["function"],
                            r["ncalls_per_step"],
                            r["tottime_ms_per_step"],
                            r["cumtime_ms_per_step"],
                        ]
                        for r in p["top_self"]
                    ],
                )
            )
        out = args.out or RESULTS_DIR / f"residual_flow_profile_{device.type}.json"
        print(f"\nwrote {write_json(result, out)}")
        return

    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "residual_flow",
        "command": " ".join(sys.argv),
        "env": env_info(device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "estimator": estimator_description(args.lipschitz_iters),
        "training": {},
        "inverse": {},
    }
    sections: dict[str, float] = {}

    def section(name: str, fn: Any, *a: Any) -> Any:
        print(f"{name} ...", flush=True)
        t0 = time.perf_counter()
        value = fn(*a)
        sections[name] = time.perf_counter() - t0
        return value

    if not args.skip_training:
        for c in configs:
            result["training"][c] = section(f"training {c}", bench_training, args, device, c)
    if not args.skip_inverse:
        for c in configs:
            result["inverse"][f"random_block_{c}"] = section(
                f"inverse random block {c}", bench_random_block, args, device, c
            )
        result["inverse"]["trained_toy_flow"] = section(
            "inverse trained toy flow", bench_trained_flow, args, device
        )
    result["section_seconds"] = sections
    result["wall_seconds"] = time.perf_counter() - t_start
    out = args.out or RESULTS_DIR / f"residual_flow_{device.type}.json"
    path = write_json(result, out)
    print_tables(result)
    print(f"\nwrote {path} ({result['wall_seconds']:.0f} s)")


def print_tables(result: dict[str, Any]) -> None:
    env = result["env"]
    print(
        f"\n# Residual flow benchmark ({env['device']}, torch {env['torch']}, "
        f"{env['torch_threads']} thread(s), {env['cpu']})"
    )
    if result["training"]:
        rows = []
        for c, r in result["training"].items():
            cfg = r["config"]
            t = r["timing_seconds"]["impls"]
            mem = r["peak_memory"]
            for name in t:
                ms = 1e3 * t[name]["total"]["median"]
                upd = t[name]["phases"].get("update_lipschitz", {}).get("median", 0.0)
                m = mem.get(name, {}).get("median_bytes")
                rows.append(
                    [
                        f"{c}: D={cfg['dim']}, K={cfg['num_blocks']}, h={cfg['hidden']}, "
                        f"B={cfg['batch']}",
                        name,
                        ms,
                        1e3 * upd,
                        mib(m) if m is not None else "-",
                    ]
                )
        print("\n## Training step (median over interleaved rounds)\n")
        print(
            markdown_table(
                ["config", "impl", "step ms", "of which update_lipschitz ms", "peak train MiB"],
                rows,
            )
        )
        rows = []
        for c, r in result["training"].items():
            tr = r["time_ratios"]
            mr = r["peak_memory"].get("ratios", {})
            for key in tr:
                if key == "excluding_update_lipschitz_of_medians":
                    continue
                rows.append(
                    [
                        c,
                        key,
                        tr[key]["of_medians"],
                        tr[key]["median_of_paired"],
                        tr["excluding_update_lipschitz_of_medians"][key],
                        mr.get(key, "-"),
                    ]
                )
        by_iters = [
            [c, f"n = {n}", v["ours/nf_reduce_memory"], v["ours/nf_plain"]]
            for c, r in result["training"].items()
            for n, v in r.get("time_ratios_by_lipschitz_iters", {}).items()
        ]
        if by_iters:
            print("\n## ours / normflows by normflows' update_lipschitz(model, n) (medians)\n")
            header = ["config", "normflows n", "/ nf_reduce_memory", "/ nf_plain"]
            print(markdown_table(header, by_iters))
        print("\n## Ratios (ours / normflows; < 1: ours is faster / smaller)\n")
        print(
            markdown_table(
                [
                    "config",
                    "ratio",
                    "time (medians)",
                    "time (paired rounds)",
                    "time w/o nf update_lipschitz",
                    "peak memory",
                ],
                rows,
            )
        )
    if result["inverse"]:
        rows = []
        for key, r in result["inverse"].items():
            if not key.startswith("random_block"):
                continue
            b, p = r["batch_solve"], r["per_sample"]
            for m in SOLVERS:
                rows.append(
                    [
                        f"D={r['dim']} h={r['hidden']}",
                        m,
                        b[m]["iterations"],
                        b[m]["forward_pass_equivalents"],
                        b[m]["max_rel_error"],
                        p[m]["iterations_median"],
                        p[m]["oracle_iterations_median"],
                        p[m]["observed_rate_median"],
                        p[m]["rel_error_max"],
                    ]
                )
            rows.append(
                [
                    f"D={r['dim']} h={r['hidden']}",
                    "normflows rule",
                    b["normflows_rule"]["evaluations"],
                    "-",
                    b["normflows_rule"]["max_rel_error"],
                    p["normflows_rule"]["evaluations_median"],
                    "-",
                    "-",
                    p["normflows_rule"]["rel_error_max"],
                ]
            )
        print(
            f"\n## Inverting a random c=0.9 block to rtol "
            f"{result['settings']['inverse_rtol']:g} (float64)\n"
        )
        print(
            markdown_table(
                [
                    "block",
                    "solver",
                    "batch iters",
                    "batch fwd-pass equiv.",
                    "batch max rel err",
                    "per-sample median iters",
                    "per-sample oracle iters",
                    "observed rate",
                    "per-sample max rel err",
                ],
                rows,
            )
        )
        toy = result["inverse"].get("trained_toy_flow")
        if toy:
            rows = [
                [
                    m,
                    toy[m]["iterations_per_sample_median"],
                    toy[m]["iterations_per_block_solve_median"],
                    toy[m]["reconstruction_rel_error_max"],
                    toy.get("batch_sampling", {}).get(m, {}).get("explicit_pass_equivalents", "-"),
                    *(
                        [
                            toy[m]["stopping_rules_per_block_solve"]["oracle_median"],
                            toy[m]["stopping_rules_per_block_solve"]["observed_rate_median"],
                            toy[m]["stopping_rules_per_block_solve"]["observed_rate_violations"],
                            toy[m]["stopping_rules_per_block_solve"]["n_solves"],
                        ]
                        if "stopping_rules_per_block_solve" in toy[m]
                        else ["-"] * 4
                    ),
                ]
                for m in SOLVERS
                if m in toy
            ]
            lips = ", ".join(f"{v:.2f}" for v in toy["max_jacobian_norm_per_block_at_data_path"])
            print(
                f"\n## Trained toy flow ({toy['training']['steps']} steps; max ||J_g|| per "
                f"block on the data path: {lips})\n"
            )
            print(
                markdown_table(
                    [
                        "solver",
                        "iters per sample (median, all blocks)",
                        "iters per block solve (median)",
                        "max reconstruction rel err",
                        "batch sampling / explicit pass (wall)",
                        "oracle (median)",
                        "observed-rate stop (median)",
                        "its solves above rtol",
                        "solves",
                    ],
                    rows,
                )
            )


if __name__ == "__main__":
    main()
