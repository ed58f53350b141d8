"""SVI step time of AutoResidualFlow against Pyro's AutoIAFNormal on the posterior models.

One SVI step as the posterior benchmark (``bench_posteriors.py``) takes it:
``Trace_ELBO(num_particles=8, vectorize_particles=True)``, Pyro's ``ClippedAdam``, one
thread. Guides (each built under its own name, so that none shares another's parameters
in Pyro's global parameter store):

=================== =====================================================================
``iaf``             ``AutoIAFNormal(model)``: Pyro's defaults (one IAF layer, hidden
                    ``3 D + 1``), as the posterior benchmark uses it
``iaf2``            ``AutoIAFNormal(model, num_transforms=2)``
``mvn``             ``AutoMultivariateNormal(model)`` (the floor: no network at all)
``residual``        ``AutoResidualFlow(model)``: the project's default
``residual-no-res`` ``AutoResidualFlow(model, num_blocks=0)``: the ablation without the
                    residual blocks
``residual-t``      ``AutoResidualFlow(model, base="student_t")``: a learned Student t base
``residual-a1b1``   ``AutoResidualFlow(model, num_autoregressive=1, num_blocks=1)``: the
                    shallower guide recommended as a NeuTra warp
=================== =====================================================================

Timing interleaves the guides step by step in one process (``common.interleaved_timing``),
so a load spike on a shared machine hits all of them alike; the reported ratios are the
median over rounds of ``guide / iaf`` step times measured back to back.

Run ``python bench_guide_step.py --help``; results go to ``results/guide_step_<device>.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import posterior_models as models  # noqa: E402
from common import (  # noqa: E402
    PhaseTimer,
    base_parser,
    env_info,
    interleaved_timing,
    markdown_table,
    paired_ratio,
    setup_device,
    write_json,
)

from pyro_invres.autoguide import AutoResidualFlow  # noqa: E402

PARTICLES = 8


def _named(cls: type, label: str, **kwargs: Any) -> Callable[[Callable], Any]:
    """A factory of ``cls(model, **kwargs)`` whose parameters live under ``label``."""
    sub = type("guide_" + label.replace("-", "_"), (cls,), {})
    return lambda model: sub(model, **kwargs)


GUIDES: dict[str, Callable[[Callable], Any]] = {
    "iaf": _named(AutoIAFNormal, "iaf"),
    "iaf2": _named(AutoIAFNormal, "iaf2", num_transforms=2),
    "mvn": _named(AutoMultivariateNormal, "mvn"),
    "residual": _named(AutoResidualFlow, "residual"),
    "residual-no-res": _named(AutoResidualFlow, "residual-no-res", num_blocks=0),
    "residual-t": _named(AutoResidualFlow, "residual-t", base="student_t"),
    "residual-a1b1": _named(AutoResidualFlow, "residual-a1b1", num_autoregressive=1, num_blocks=1),
}


def make_step(spec: models.PosteriorModel, label: str) -> Callable[[PhaseTimer], None]:
    """A built guide's SVI step (after one untimed step that sets the guide up)."""
    guide = GUIDES[label](spec.model)
    elbo = Trace_ELBO(
        num_particles=PARTICLES,
        vectorize_particles=True,
        max_plate_nesting=models.MAX_PLATE_NESTING,
    )
    svi = SVI(spec.model, guide, pyro.optim.ClippedAdam({"lr": 1e-3, "clip_norm": 10.0}), elbo)
    svi.step()

    def step(timer: PhaseTimer) -> None:
        svi.step()
        timer.mark("step")

    return step


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(models.MODELS), help="comma-separated")
    parser.add_argument("--guides", default=",".join(GUIDES), help="comma-separated; iaf first")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this thread's CPU time (one thread: the step's work, however "
        "loaded the machine)",
    )
    args = parser.parse_args()
    args.reps = args.reps if args.reps is not None else (5 if args.quick else 100)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    device = setup_device(args)
    if device.type != "cpu":
        raise SystemExit("the guides are timed on CPU (the posterior benchmark's setting)")
    labels = [g for g in args.guides.split(",") if g]
    unknown = sorted(set(labels) - set(GUIDES))
    if unknown or "iaf" not in labels:
        raise SystemExit(f"--guides must include iaf and name only {sorted(GUIDES)}: {unknown}")
    result: dict[str, Any] = {
        "benchmark": "guide_step",
        "env": env_info(device),
        "particles": PARTICLES,
        "reps": args.reps,
        "warmup": args.warmup,
        "clock": args.clock,
        "models": {},
    }
    rows = []
    for name in (m for m in args.models.split(",") if m):
        spec = models.MODELS[name]()
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        steps = {label: make_step(spec, label) for label in labels}
        timing = interleaved_timing(
            steps, device, reps=args.reps, warmup=args.warmup, clock=args.clock
        )
        entry = {"dim": spec.dim, "ms_median": {}, "ratio_to_iaf": {}}
        for label in labels:
            entry["ms_median"][label] = 1e3 * timing["impls"][label]["total"]["median"]
            entry["ratio_to_iaf"][label] = paired_ratio(timing, label, "iaf")
        result["models"][name] = entry
        rows.append(
            [name, spec.dim]
            + [f"{entry['ms_median'][g]:.1f}" for g in labels]
            + [f"{entry['ratio_to_iaf'][g]['median_of_paired']:.2f}" for g in labels if g != "iaf"]
        )
    out = args.out or HERE / "results" / f"guide_step_{device.type}.json"
    write_json(result, out)
    others = [g for g in labels if g != "iaf"]
    headers = ["model", "D"] + [f"{g} (ms)" for g in labels] + [f"{g} / iaf" for g in others]
    print(markdown_table(headers, rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
