"""What each part of AutoResidualFlow earns: the default against ablations and AutoIAFNormal.

Each guide trains as ``bench_posteriors.py`` trains it (``Trace_ELBO(num_particles=8,
vectorize_particles=True)``, Pyro's ``ClippedAdam`` with the learning rate decaying from
``1e-2`` to ``1e-3`` over ``--steps`` steps, gradients clipped elementwise at 10, one
thread), then draws ``--draws`` samples whose exact importance weights give the ELBO, the
importance-weighted ``log Z`` and the PSIS Pareto k-hat (:mod:`posterior_metrics`).

Guides (``AutoResidualFlow`` options in brackets):

=============== ======================================================================
``default``     ``AutoResidualFlow(model)``: ``T F T F A`` (autoregressive layer ``T``,
                residual block ``F``, affine map ``A``)
``no-blocks``   ``[num_blocks=0]``: ``T T A``, the ablation without the residual blocks
``one-round``   ``[num_blocks=1, num_autoregressive=1]``: ``T F A``
``blocks-only`` ``[num_autoregressive=0]``: ``F F A``
``iaf``         ``AutoIAFNormal(model)``, Pyro's defaults
``iaf2``        ``AutoIAFNormal(model, num_transforms=2)``
=============== ======================================================================

Run ``python study_guide_ablation.py --help``; results go to
``results/guide_ablation_cpu.json`` (rewritten after every run, so a stopped study keeps
what it finished).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal
from pyro.infer.importance import vectorized_importance_weights

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import posterior_metrics as metrics  # noqa: E402
import posterior_models as models  # noqa: E402
from common import env_info, write_json  # noqa: E402

from pyro_invres.autoguide import AutoResidualFlow  # noqa: E402

GUIDES: dict[str, Callable[[Callable], Any]] = {
    "default": lambda m: AutoResidualFlow(m),
    "no-blocks": lambda m: AutoResidualFlow(m, num_blocks=0),
    "one-round": lambda m: AutoResidualFlow(m, num_blocks=1, num_autoregressive=1),
    "blocks-only": lambda m: AutoResidualFlow(m, num_autoregressive=0),
    "iaf": AutoIAFNormal,
    "iaf2": lambda m: AutoIAFNormal(m, num_transforms=2),
}


def run(spec: models.PosteriorModel, label: str, steps: int, seed: int, draws: int) -> dict:
    """Train one guide and score it; returns the metrics and the training cost."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = GUIDES[label](spec.model)
    elbo = Trace_ELBO(
        num_particles=8, vectorize_particles=True, max_plate_nesting=models.MAX_PLATE_NESTING
    )
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / steps), "clip_norm": 10.0})
    svi = SVI(spec.model, guide, optim, elbo)
    start = time.process_time()
    for _ in range(steps):
        svi.step()
    cpu = time.process_time() - start
    with torch.no_grad():
        log_w, _, _ = vectorized_importance_weights(
            spec.model, guide, num_samples=draws, max_plate_nesting=models.MAX_PLATE_NESTING
        )
    log_w = log_w.detach()
    iw, iw_se = metrics.iw_log_z(log_w)
    return {
        "model": spec.name,
        "guide": label,
        "seed": seed,
        "khat": metrics.psis_khat(log_w),
        "iw_log_z": iw,
        "iw_log_z_se": iw_se,
        "elbo": metrics.elbo(log_w)[0],
        "cpu_ms_per_step": 1e3 * cpu / steps,
        "parameters": sum(p.numel() for p in guide.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="eight_schools_centered,funnel")
    parser.add_argument("--guides", default=",".join(GUIDES))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--draws", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="20 steps, 200 draws: a smoke test")
    parser.add_argument("--out", default=str(HERE / "results" / "guide_ablation_cpu.json"))
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="write --out as the runs of these result files together (runs made in parallel)",
    )
    args = parser.parse_args()
    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        runs = [r for p in parts for r in p["runs"]]
        combined = {**parts[0], "runs": runs, "combined": args.combine}
        write_json(combined, args.out)
        print(f"wrote {args.out} ({len(combined['runs'])} runs)")
        return
    if args.quick:
        args.steps, args.draws = 20, 200
    torch.set_num_threads(1)
    labels = [g for g in args.guides.split(",") if g]
    unknown = sorted(set(labels) - set(GUIDES))
    if unknown:
        raise SystemExit(f"unknown guides {unknown}; choose from {sorted(GUIDES)}")
    result: dict[str, Any] = {
        "study": "guide_ablation",
        "env": env_info(torch.device("cpu")),
        "steps": args.steps,
        "draws": args.draws,
        "optimizer": "ClippedAdam(lr 1e-2 -> 1e-3 geometric, clip 10), 8 vectorised particles",
        "runs": [],
    }
    for name in (m for m in args.models.split(",") if m):
        spec = models.MODELS[name]()
        for seed in (int(s) for s in args.seeds.split(",") if s):
            for label in labels:
                row = run(spec, label, args.steps, seed, args.draws)
                result["runs"].append(row)
                write_json(result, args.out)
                print(
                    f"{name:26s} seed {seed} {label:12s} k-hat {row['khat']:.2f}  "
                    f"IW log Z {row['iw_log_z']:.3f}  ELBO {row['elbo']:.3f}  "
                    f"{row['cpu_ms_per_step']:.1f} ms/step",
                    flush=True,
                )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
