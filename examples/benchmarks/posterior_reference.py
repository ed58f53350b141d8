"""Reference posteriors for ``bench_posteriors.py``, stored small under ``results/posterior_refs/``.

One ``<model>.npz`` per model of :mod:`posterior_models`, in the unconstrained coordinates
the autoguides work in (``log tau`` for a positive ``tau``): ``names``, ``mean``, ``sd``
(float32, from every retained draw), ``draws`` (at most 2000, float32, evenly thinned over all
chains) and ``meta`` (a JSON string: how the draws were made, seeds, diagnostics, the exact
``log Z`` where known).

How each reference is made:

* ``funnel``: exact. Means and sds in closed form (``sd(v) = 3``, ``sd(x_i) = e^{9/4}``),
  draws sampled directly from ``v ~ N(0, 3)``, ``x_i | v ~ N(0, e^{v/2})``; ``log Z = 0``.
* ``eight_schools_noncentered`` and ``eight_schools_centered``: one long NUTS run on the
  non-centred model (whose geometry NUTS handles), ``theta = mu + tau eta`` mapping each draw
  to the centred parameterisation; ``log Z`` by quadrature over ``tau``
  (:func:`posterior_models.eight_schools_log_tau_density`), which also gives the exact mean
  and sd of ``log tau`` recorded next to NUTS's as a check.
* ``logistic``, ``horseshoe``: long NUTS runs.

NUTS: Pyro's, chains run one after the other (chain ``c`` seeded ``seed + c``), default
settings except where ``CONFIG`` says. The run is refused (nothing written) when any
R-hat exceeds 1.01 or the minimum bulk ESS is below 1000 (400 for the horseshoe).

Cost (one thread, on a loaded 2-core machine): the eight schools and the logistic regression
about 16 minutes each. The horseshoe's trajectories run to hundreds of gradients per draw
(step size about 0.03): 4 x (500 + 500) took 75 minutes and stopped at R-hat 1.012, so it
now asks for 4 x (1000 + 1000), a few hours; its reference is not committed yet.

Usage::

    python examples/benchmarks/posterior_reference.py                       # every model
    python examples/benchmarks/posterior_reference.py --models funnel logistic
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS

sys.path.insert(0, str(Path(__file__).resolve().parent))

import posterior_metrics as pm  # noqa: E402
import posterior_models as models  # noqa: E402

REF_DIR = Path(__file__).resolve().parent / "results" / "posterior_refs"
MAX_STORED_DRAWS = 2000
#: NUTS settings per model run (chains, warmup and draws per chain, seed, NUTS options)
CONFIG: dict[str, dict[str, Any]] = {
    "eight_schools_noncentered": {
        "chains": 4,
        "warmup": 1000,
        "draws": 5000,
        "seed": 100,
        "nuts": {"jit_compile": True, "ignore_jit_warnings": True, "target_accept_prob": 0.9},
    },
    "logistic": {"chains": 4, "warmup": 500, "draws": 1500, "seed": 200, "nuts": {}},
    # the horseshoe's NUTS trajectories are long (hundreds of gradients per draw): fewer
    # draws, and a lower bar on the ESS (still a Monte-Carlo error below 5% of an sd)
    "horseshoe": {
        "chains": 4,
        "warmup": 1000,
        "draws": 1000,
        "seed": 300,
        "nuts": {"target_accept_prob": 0.9},
        "min_ess": 400.0,
    },
}
MIN_ESS, MAX_RHAT = 1000.0, 1.01


@dataclass
class Reference:
    """A stored reference posterior (unconstrained coordinates)."""

    names: list[str]
    mean: np.ndarray
    sd: np.ndarray
    draws: np.ndarray
    meta: dict[str, Any]

    @property
    def log_z(self) -> float | None:
        """The exact log evidence, where known."""
        return self.meta.get("log_z")


def ref_path(name: str, ref_dir: Path = REF_DIR) -> Path:
    return Path(ref_dir) / f"{name}.npz"


def save_reference(name: str, ref: Reference, ref_dir: Path = REF_DIR) -> Path:
    """Write ``<name>.npz``: float32 moments and at most ``MAX_STORED_DRAWS`` draws."""
    draws = np.asarray(ref.draws)
    if len(draws) > MAX_STORED_DRAWS:
        draws = draws[np.linspace(0, len(draws) - 1, MAX_STORED_DRAWS).round().astype(int)]
    path = ref_path(name, ref_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        names=np.array(ref.names),
        mean=np.asarray(ref.mean, np.float32),
        sd=np.asarray(ref.sd, np.float32),
        draws=draws.astype(np.float32),
        meta=np.array(json.dumps(ref.meta)),
    )
    return path


def load_reference(name: str, ref_dir: Path = REF_DIR) -> Reference:
    """Read ``<name>.npz``, with a clear error naming the command that makes it."""
    path = ref_path(name, ref_dir)
    if not path.exists():
        maker = "eight_schools" if name.startswith("eight_schools") else name  # one run, both
        raise FileNotFoundError(
            f"no reference posterior for {name!r} at {path}; make it with "
            f"`python examples/benchmarks/posterior_reference.py --models {maker}`"
        )
    with np.load(path, allow_pickle=False) as f:
        return Reference(
            names=[str(n) for n in f["names"]],
            mean=f["mean"].astype(float),
            sd=f["sd"].astype(float),
            draws=f["draws"].astype(float),
            meta=json.loads(str(f["meta"])),
        )


# -- NUTS ---------------------------------------------------------------------------------------
def run_nuts(spec: models.PosteriorModel, cfg: dict[str, Any]) -> tuple[np.ndarray, dict]:
    """Chains one after the other; returns unconstrained draws ``(chains, draws, D)`` and meta."""
    chains, divergences, wall = [], 0, time.perf_counter()
    for c in range(cfg["chains"]):
        pyro.set_rng_seed(cfg["seed"] + c)
        kernel = NUTS(spec.model, max_plate_nesting=models.MAX_PLATE_NESTING, **cfg["nuts"])
        mcmc = MCMC(
            kernel, num_samples=cfg["draws"], warmup_steps=cfg["warmup"], disable_progbar=True
        )
        mcmc.run()
        divergences += sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
        samples = {k: v.double() for k, v in mcmc.get_samples().items()}
        chains.append(samples)
        print(f"  chain {c}: step size {kernel.step_size:.3g}", flush=True)
    meta = {
        "method": "nuts",
        "chains": cfg["chains"],
        "warmup_per_chain": cfg["warmup"],
        "draws_per_chain": cfg["draws"],
        "seeds": [cfg["seed"] + c for c in range(cfg["chains"])],
        "nuts_options": cfg["nuts"],
        "divergences": divergences,
        "wall_s": time.perf_counter() - wall,
        "pyro_version": pyro.__version__,
    }
    return chains, meta


def _diagnosed(
    spec: models.PosteriorModel, x: np.ndarray, meta: dict, min_ess: float = MIN_ESS
) -> dict:
    """Add min bulk ESS and max R-hat to ``meta``; refuse a run below the bar."""
    ess, rh = pm.bulk_ess(x), pm.rhat(x)
    meta = {
        **meta,
        "min_bulk_ess": float(ess.min()),
        "min_ess_param": spec.names[int(ess.argmin())],
        "max_rhat": float(rh.max()),
        "diagnostics_backend": pm.backend_name(),
    }
    if meta["max_rhat"] > MAX_RHAT or meta["min_bulk_ess"] < min_ess:
        raise RuntimeError(
            f"{spec.name}: NUTS reference not converged (max R-hat {meta['max_rhat']:.4f}, "
            f"min bulk ESS {meta['min_bulk_ess']:.0f} at {meta['min_ess_param']}; need "
            f"<= {MAX_RHAT} and >= {min_ess}); run longer chains"
        )
    return meta


def _from_chains(
    spec: models.PosteriorModel, x: np.ndarray, meta: dict, min_ess: float = MIN_ESS
) -> Reference:
    flat = x.reshape(-1, x.shape[-1])
    meta = _diagnosed(spec, x, meta, min_ess)
    return Reference(spec.names, flat.mean(0), flat.std(0, ddof=1), flat, meta)


def _stack(spec: models.PosteriorModel, chains: list[dict[str, torch.Tensor]]) -> np.ndarray:
    return np.stack([models.unconstrained(spec, s).numpy() for s in chains])


def reference_eight_schools() -> dict[str, Reference]:
    """Both parameterisations from one NUTS run on the non-centred model."""
    nc = models.eight_schools_noncentered()
    c = models.eight_schools_centered()
    chains, meta = run_nuts(nc, CONFIG[nc.name])
    centred = [
        {"mu": s["mu"], "tau": s["tau"], "theta": s["mu"][:, None] + s["tau"][:, None] * s["eta"]}
        for s in chains
    ]
    u, density, log_z = models.eight_schools_log_tau_density()
    m = float(np.trapezoid(u * density, u))
    exact = {"log_tau_mean": m, "log_tau_sd": float(np.trapezoid((u - m) ** 2 * density, u)) ** 0.5}
    meta = {**meta, "log_z": log_z, "log_z_method": "quadrature over tau", "exact": exact}
    refs = {}
    for spec, draws, how in ((nc, chains, "nuts"), (c, centred, "nuts on the non-centred model")):
        refs[spec.name] = _from_chains(spec, _stack(spec, draws), {**meta, "method": how})
        i = spec.names.index("log_tau")
        got = refs[spec.name]
        print(
            f"  {spec.name}: log tau {got.mean[i]:.3f} (sd {got.sd[i]:.3f}); exact "
            f"{exact['log_tau_mean']:.3f} (sd {exact['log_tau_sd']:.3f})"
        )
    return refs


def reference_nuts(name: str) -> dict[str, Reference]:
    spec = models.MODELS[name]()
    chains, meta = run_nuts(spec, CONFIG[name])
    min_ess = CONFIG[name].get("min_ess", MIN_ESS)
    return {name: _from_chains(spec, _stack(spec, chains), meta, min_ess)}


def reference_funnel(seed: int = 0) -> dict[str, Reference]:
    spec = models.funnel()
    draws = models.funnel_exact_draws(MAX_STORED_DRAWS, torch.Generator().manual_seed(seed))
    mean, sd = models.funnel_exact_moments()
    meta = {"method": "exact", "seed": seed, "log_z": 0.0}
    return {spec.name: Reference(spec.names, mean, sd, draws.numpy(), meta)}


#: which function makes which references
MAKERS = {
    "funnel": reference_funnel,
    "eight_schools": reference_eight_schools,
    "logistic": lambda: reference_nuts("logistic"),
    "horseshoe": lambda: reference_nuts("horseshoe"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MAKERS), choices=list(MAKERS))
    parser.add_argument("--out-dir", default=str(REF_DIR))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for key in args.models:
        start = time.perf_counter()
        print(f"{key} ...", flush=True)
        for name, ref in MAKERS[key]().items():
            ref.meta["made_by"] = "examples/benchmarks/posterior_reference.py"
            path = save_reference(name, ref, Path(args.out_dir))
            print(f"  wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
        print(f"{key}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
