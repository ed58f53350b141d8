"""Toy densities: the test NLL `pyro-invres fit` reaches, next to Pyro's flows and the floor.

On each of the eight toy densities of :mod:`pyro_invres.datasets`, four models train on
the same 20000 points (the generator and seed of ``pyro-invres fit``) with the same
training helper, steps, batch size and learning-rate schedule (geometric decay to a tenth
of the initial rate):

* ``ours``: the flow ``pyro-invres fit`` trains (the ``iresnet-2d`` preset, built from
  ``pyro_invres.cli.flow_options()`` exactly as the command builds it);
* ``pyro-affine x8``: 8 ``pyro.distributions.transforms.affine_coupling`` blocks with
  reversing permutations;
* ``pyro-spline x4``: 4 ``spline_coupling`` blocks (8 bins) with reversing permutations,
  at Pyro's default ``bound=3`` (outside ``[-3, 3]`` a spline is the identity);
* ``pyro-spline x4 b5``: the same with ``bound=5``, which covers every toy set.

Every model gets every initial learning rate of one grid (``--lrs``; by default 2.5e-3,
5e-3, 1e-2 and 2e-2: Pyro's normalizing-flow tutorial trains its spline coupling at 5e-3,
``pyro-invres fit`` starts at 1e-2). The rate is chosen on 5000 validation points drawn
after the test points, and the test NLL of the chosen run is reported, with its gap to
the density's entropy (the lowest NLL any model can reach; ``toy_entropy.py``). The run
at ``pyro-invres fit``'s own learning rate is reported too: it is what the command gives.
``--ours-option KEY=VALUE`` trains our flow with another option (how it was tuned).

Writes ``examples/benchmarks/results/toy_nll_cpu.json`` and ``docs/toy_nll.md`` after a
full run (all sets, default steps and grid). A run with ``--quick``, ``--sets``,
``--steps``, ``--lrs`` or ``--models`` writes into a new temporary directory unless
``--out``/``--doc`` say where, or ``--merge`` updates the tracked results for the sets
and models it ran. One thread, one training at a time: 128 trainings, 72 minutes of wall
time on a shared 2-core machine (load 4-9).

Usage::

    python examples/benchmarks/bench_toy_nll.py                  # all eight sets, the grid
    python examples/benchmarks/bench_toy_nll.py --quick          # a smoke run (about a minute)
    python examples/benchmarks/bench_toy_nll.py --sets rings,moons --models ours --merge
    python examples/benchmarks/bench_toy_nll.py --render-only    # rewrite the doc from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.distributions.transforms import Permute, spline_coupling

from pyro_invres.cli import DEFAULTS, flow_options
from pyro_invres.datasets import TOY_DATASETS, sample_toy
from pyro_invres.train import (
    DegenerateDataError,
    NonFiniteLossError,
    build_flow,
    fit_density,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = HERE / "results" / "toy_nll_cpu.json"
DOC = ROOT / "docs" / "toy_nll.md"

OURS = "ours"
MODELS: tuple[str, ...] = (OURS, "pyro-affine x8", "pyro-spline x4", "pyro-spline x4 b5")
PEERS = MODELS[1:]
LR_GRID: tuple[float, ...] = (2.5e-3, 5e-3, 1e-2, 2e-2)
QUICK = {"steps": 60, "lrs": (5e-3, 1e-2)}
N_VAL = 5000
GOAL = 0.03  # nats above the floor: the target for `pyro-invres fit` on every set
SCHEMA = 2


def pyro_spline(num_blocks: int = 4, bound: float = 3.0) -> ComposeTransformModule:
    """Pyro's spline coupling flow: ``num_blocks`` couplings (8 bins) with reversals.

    Outside ``[-bound, bound]`` a spline is the identity; Pyro's default bound is 3.
    """
    reverse = torch.arange(1, -1, -1)
    parts: list = []
    for _ in range(num_blocks):
        parts += [spline_coupling(2, count_bins=8, bound=bound), Permute(reverse)]
    return ComposeTransformModule(parts[:-1])


#: ``--ours-option`` keys: overrides of the fit flow's options (``flow_options``), typed
OUR_OPTIONS: dict[str, type] = {
    "num_blocks": int,
    "hidden": str,
    "activation": str,
    "omega": float,
    "beta": float,
    "lipschitz": float,
}

BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    OURS: lambda: build_flow(DEFAULTS["flow"], 2, **flow_options()),
    "pyro-affine x8": lambda: build_flow("pyro-affine", 2, num_blocks=8),
    "pyro-spline x4": pyro_spline,
    "pyro-spline x4 b5": lambda: pyro_spline(bound=5.0),
}


def split(dataset: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test points exactly as ``pyro-invres fit`` draws them, then validation."""
    generator = torch.Generator().manual_seed(seed)
    train = sample_toy(dataset, DEFAULTS["n_train"], generator)
    test = sample_toy(dataset, DEFAULTS["n_test"], generator)
    return train, test, sample_toy(dataset, N_VAL, generator)


def train_one(
    model: str,
    dataset: str,
    lr: float,
    steps: int,
    seed: int,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One training run; a diverged run is recorded as failed, never chosen.

    ``options`` override the fit flow's options (``ours`` only): how it was tuned.
    """
    if options and model != OURS:
        raise ValueError(f"options apply to {OURS!r} only, got {options} for {model!r}")
    from pyro_invres.evaluation import evaluate_nll

    # seeded as `pyro-invres fit` seeds: ours at its lr is that command's run, bit for bit
    pyro.set_rng_seed(seed)
    train, test, val = split(dataset, seed)
    flow = build_flow(DEFAULTS["flow"], 2, **flow_options(**options)) if options else None
    flow = flow or BUILDERS[model]()
    run: dict[str, Any] = {"lr": lr}
    cpu_started = time.process_time()
    try:
        result = fit_density(
            flow,
            train,
            steps=steps,
            batch_size=DEFAULTS["batch_size"],
            lr=lr,
            lr_final=DEFAULTS["lr_final"],
            seed=seed,
            test_data=test,
            progress=False,
        )
    except (NonFiniteLossError, DegenerateDataError) as err:
        return {**run, "status": "failed", "why": str(err).split(";")[0]}
    val_nll = evaluate_nll(flow, val)
    return {
        **run,
        "status": "ok" if math.isfinite(val_nll) else "failed",
        "val_nll": val_nll,
        "test_nll": result.test_nll,
        "train_nll": result.train_nll,
        "wall_time": result.wall_time,
        # one thread: CPU seconds are the cost, whatever else shares the machine
        "cpu_time": time.process_time() - cpu_started,
    }


def choose(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The run with the lowest validation NLL (None when every run failed)."""
    ok = [r for r in runs if r["status"] == "ok"]
    return min(ok, key=lambda r: r["val_nll"]) if ok else None


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# -- the page ------------------------------------------------------------------------------------
def _lr(value: float) -> str:
    return f"{value:g}"


def _cell(run: dict[str, Any] | None, floor: float, with_lr: bool = True) -> str:
    if run is None:
        return "all diverged"
    text = f"{run['test_nll']:.3f} ({run['test_nll'] - floor:+.3f})"
    return f"{text} @ {_lr(run['lr'])}" if with_lr else text


def _default_run(entry: dict[str, Any], lr: float) -> dict[str, Any] | None:
    return next((r for r in entry["runs"] if r["lr"] == lr and r["status"] == "ok"), None)


def render(saved: dict[str, Any], notes: str = "") -> str:
    """The markdown page for a results JSON."""
    results, floor_of, default_lr = saved["results"], saved["floors"], saved["default_lr"]
    summary, grid_rows, misses = [], [], []
    for dataset, by_model in results.items():
        floor = floor_of[dataset]["p_test_nll"]
        fit = _default_run(by_model[OURS], default_lr) if OURS in by_model else None
        chosen = {m: choose(by_model[m]["runs"]) for m in MODELS if m in by_model}
        peers = [chosen[m] for m in PEERS if chosen.get(m) is not None]
        best_peer = min((r["test_nll"] for r in peers), default=math.nan)
        ours_best = chosen.get(OURS)
        vs_peer = ours_best["test_nll"] - best_peer if ours_best else math.nan
        gap = fit["test_nll"] - floor if fit else math.nan
        met = "yes" if gap <= GOAL else "no"
        if gap > GOAL:
            misses.append(f"{dataset} by {gap - GOAL:.3f}")
        time_s = f"{fit.get('cpu_time', fit['wall_time']):.0f}" if fit else "-"
        summary.append(
            f"| {dataset} | {floor_of[dataset]['entropy']:.3f} | {floor:.3f} | "
            f"{_cell(fit, floor, False)} | {time_s} | "
            + " | ".join(_cell(chosen[m], floor) if m in chosen else "-" for m in MODELS)
            + f" | {vs_peer:+.3f} | {met} |"
        )
        for model in MODELS:
            if model not in by_model:
                continue
            pick = chosen[model]
            cells = []
            for lr in saved["lrs"]:
                run = next((r for r in by_model[model]["runs"] if r["lr"] == lr), None)
                if run is None:
                    cells.append("-")
                elif run["status"] != "ok":
                    cells.append("diverged")
                else:
                    text = f"{run['val_nll']:.3f} / {run['test_nll']:.3f}"
                    cells.append(f"**{text}**" if run is pick else text)
            grid_rows.append(f"| {dataset} | {model} | " + " | ".join(cells) + " |")
    header = (
        "| data set | entropy | p on test | `pyro-invres fit` | CPU s | ours | Pyro affine x8"
        f" | Pyro spline x4 | Pyro spline x4, bound 5 | ours vs best peer | within {GOAL} |"
    )
    lr_head = " | ".join(f"lr {_lr(lr)}" for lr in saved["lrs"])
    env = saved["environment"]
    script = "python examples/benchmarks/bench_toy_nll.py"
    parts = [shlex.join(argv) for argv in saved["commands"]]
    if len(parts) == 1:
        produced = f"Produced by `{' '.join([script, parts[0]]).strip()}`"
    else:
        produced = (
            f"Produced in {len(parts)} parts, `{script}` with "
            + ", then ".join(f"`{x}`" for x in parts)
            + " (the plain command runs it all at once),"
        )
    verdict = (
        f"`pyro-invres fit` is within {GOAL} nats of the floor on every set."
        if not misses
        else f"`pyro-invres fit` misses the {GOAL}-nat goal on {len(misses)} of "
        f"{len(results)} sets: " + ", ".join(misses) + " (nats beyond the goal)."
    )
    return f"""# Toy densities: `pyro-invres fit` against Pyro's flows and the floor

Test NLL in nats on {saved["n_test"]} held-out points (lower is better). The floor is
the true density's own NLL on the same points ("p on test", from the exact log-density,
`examples/benchmarks/toy_entropy.py`); in brackets, each model's gap to it: an estimate of
`KL(p || q)` free of the test sample's own noise (about 0.01 nats at 5000 points), which
both scores share. "entropy" is the density's entropy (Monte Carlo on
{next(iter(floor_of.values()))["n"]} points, standard errors about 0.004 in the raw
results); "p on test" differs from it by that test-sample noise only. Every model trains
{saved["steps"]} steps of batch {saved["batch_size"]} on the same {saved["n_train"]}
points with the same helper and schedule (the initial learning rate decays geometrically
to {saved["lr_final"]:g} of itself) at each initial rate of the grid
{", ".join(_lr(x) for x in saved["lrs"])}; the rate is chosen on {saved["n_val"]}
validation points (`@` gives it). "`pyro-invres fit`" is our flow at the command's own
rate ({_lr(default_lr)}): what the command gives, with the CPU seconds of that run
(training and evaluation on one thread; the machine was shared, so wall time was longer).
"ours vs best peer" compares the chosen runs. The goal: `pyro-invres fit` within {GOAL}
nats of the floor.

{header}
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(summary)}

{verdict}

{produced} on {saved["date"]} (commit {saved["commit"]}; torch {env["torch"]},
Pyro {env["pyro"]}, {env["threads"]} CPU thread, {env["cpu"]}). Raw numbers:
`examples/benchmarks/results/toy_nll_cpu.json`.

## The learning-rate grid

Validation / test NLL per initial learning rate; the chosen run (lowest validation NLL)
in bold.

| data set | model | {lr_head} |
|---|---|{"---|" * len(saved["lrs"])}
{chr(10).join(grid_rows)}
{notes}"""


NOTES = """
## Reading it

**Pyro's spline at its default bound.** A Pyro spline coupling is the identity outside
`[-bound, bound]`, 3 by default, and the toy sets reach 3.3 to 4.4: 44% of checkerboard
points and 16% of 8gaussians points have a coordinate beyond 3. The default spline flow
scores 5.6-5.8 nats on checkerboard at every rate of the grid: the bound, not a diverged
configuration (as an earlier version of this page, which trained it at our rate only,
read its 5.73). With `bound=5` it comes within 0.012 nats of our flow on checkerboard
and is the best peer on six sets. Both are reported; "best peer" is the best of the three
Pyro flows.

**Learning rates.** Pyro's spline flows are best at the two highest rates on every set,
and at the top of the grid (2e-2) for 9 of the 16 set-and-bound pairs: a still higher
rate may help them further. The
affine flow is best at the low end and diverges at 2e-2 on four sets (a loss running away
from a Gaussian fit: `fit_density` stops it; such runs are never chosen). Our flow's test
NLL changes by at most 0.03 nats between 2.5e-3 and 1e-2 on every set; at 2e-2 it
collapses on 8gaussians and rings (+0.3 to +0.4). Lower rates gain 0.018 on rings and at
most 0.005 elsewhere, and lose up to 0.03 on checkerboard and 2spirals, so
`pyro-invres fit` keeps 1e-2. Validation picks a rate by noise where the rates tie
(pinwheel: 2e-2 chosen, 0.006 worse on the test points).

**Where `pyro-invres fit` misses the goal, and why.** Five sets are within 0.03 nats of
the floor. Checkerboard is uniform on squares with hard edges: every flow here is a
smooth map, so each edge is smeared over a width set by how fast the log-determinant can
change, and for an i-ResNet block that is bounded by the curvature of a network with
bounded layer norms. Rings (noise 0.08 at spacing 0.75) needs the same fast swings, four
times along every radius. 2spirals misses by 0.002, inside the noise of the estimate.
Doubling the steps (2400, twice the time) moves rings from +0.142 to +0.098 and leaves
checkerboard (+0.109) and 2spirals (+0.031) where they are: those two are limited by the
flow, not by training (`examples/benchmarks/results/toy_nll_tuning/steps2400.json`;
{ref}`tradeoffs-fit-flow`). Closing the gaps needs blocks whose log-determinant can turn
faster at the same cost (the sine activation's learned frequency did that once: rings
3.19 to 2.72 nats at this budget, see there), not more steps or another rate.
Density quality at equal training time, against normflows' residual flow too, is in
{doc}`benchmark_results`.
"""


def floors(sets: Sequence[str], seed: int) -> dict[str, dict[str, float]]:
    """Each set's entropy and the true density's own NLL on the test points.

    Both from the exact log-density (``toy_entropy.py``, next to this script). A model's
    test NLL minus the true density's NLL on the same points estimates ``KL(p || q)``
    without the test sample's own noise (about 0.01 nats at 5000 points), which the
    model's and the true density's scores share.
    """
    sys.path.insert(0, str(HERE))
    from toy_entropy import entropy_floor, log_density

    out = {}
    for name in sets:
        test = split(name, seed)[1]
        out[name] = {**entropy_floor(name), "p_test_nll": float(-log_density(name, test).mean())}
    return out


def write_doc(saved: dict[str, Any], path: Path) -> None:
    known = saved.setdefault("floors", {})
    missing = [s for s in saved["results"] if "p_test_nll" not in known.get(s, {})]
    if missing:
        known.update(floors(missing, saved["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(saved, NOTES))


# -- running -------------------------------------------------------------------------------------
def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in known]
    if unknown or not names:
        raise SystemExit(f"--{what}: expected names from {', '.join(known)}, got {text!r}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sets", "--datasets", default=",".join(TOY_DATASETS), help="comma-separated toy sets"
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--steps", type=int, default=None, help=f"default {DEFAULTS['steps']}")
    parser.add_argument("--lrs", default=None, help=f"initial learning rates (default {LR_GRID})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ours-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override an option of our flow (tuning runs; keys {', '.join(OUR_OPTIONS)})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK['steps']} steps, lrs {QUICK['lrs']}: a smoke run into a temporary directory",
    )
    parser.add_argument("--out", default=None, help="results JSON (see the module docstring)")
    parser.add_argument("--doc", default=None, help="markdown page (see the module docstring)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the sets and models run in the results JSON (same steps and grid)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the doc from the results JSON of an earlier run (no training)",
    )
    return parser


def _our_options(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in OUR_OPTIONS:
            raise SystemExit(f"--ours-option: expected KEY=VALUE with KEY in {list(OUR_OPTIONS)}")
        try:
            options[key] = OUR_OPTIONS[key](value)
        except ValueError:
            kind = OUR_OPTIONS[key].__name__
            raise SystemExit(f"--ours-option {key}: not a {kind}: {value!r}") from None
    return options


def _destinations(args: argparse.Namespace, full: bool) -> tuple[Path, Path]:
    if args.render_only or args.merge or full:
        return Path(args.out or RESULTS), Path(args.doc or DOC)
    if args.out and args.doc:
        return Path(args.out), Path(args.doc)
    scratch = Path(tempfile.mkdtemp(prefix="toy-nll-"))
    return Path(args.out or scratch / RESULTS.name), Path(args.doc or scratch / DOC.name)


def _environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)  # every run uses one thread; the page says so
    if args.render_only:
        out, doc = _destinations(args, False)
        saved = json.loads(out.read_text())
        write_doc(saved, doc)
        print(f"wrote {doc}")
        return saved
    sets = _names(args.sets, TOY_DATASETS, "sets")
    models = _names(args.models, MODELS, "models")
    steps = args.steps or (QUICK["steps"] if args.quick else DEFAULTS["steps"])
    lrs = (
        [float(x) for x in args.lrs.split(",")]
        if args.lrs
        else list(QUICK["lrs"] if args.quick else LR_GRID)
    )
    options = _our_options(args.ours_option)
    if any(not math.isfinite(x) or x <= 0 for x in lrs):
        raise SystemExit(f"--lrs: expected positive learning rates, got {args.lrs!r}")
    full = (
        not args.quick
        and steps == DEFAULTS["steps"]
        and lrs == list(LR_GRID)
        and sets == list(TOY_DATASETS)
        and models == list(MODELS)
        and not options
    )
    out, doc = _destinations(args, full)
    saved: dict[str, Any] = {
        "schema": SCHEMA,
        "steps": steps,
        "batch_size": DEFAULTS["batch_size"],
        "lr_final": DEFAULTS["lr_final"],
        "default_lr": DEFAULTS["lr"],
        "lrs": lrs,
        "n_train": DEFAULTS["n_train"],
        "n_test": DEFAULTS["n_test"],
        "n_val": N_VAL,
        "seed": args.seed,
        "quick": args.quick,
        "ours_options": options,
        "commands": [],
        "results": {},
        "floors": {},
    }
    if args.merge:
        if not out.exists():
            raise SystemExit(f"--merge: no results at {out} to merge into")
        old = json.loads(out.read_text())
        keys = ("schema", "steps", "seed", "lr_final", "batch_size", "ours_options")
        if any(old.get(k) != saved[k] for k in keys):
            raise SystemExit(f"--merge: {out} was run with other settings ({keys})")
        saved = old
        saved["lrs"] = sorted({*old["lrs"], *lrs})  # a run at a new rate joins the grid
    saved["commands"].append(argv)
    saved.update(date=str(datetime.date.today()), commit=_commit())
    saved["environment"] = _environment()
    started = time.perf_counter()
    for dataset in sets:
        by_model = saved["results"].setdefault(dataset, {})
        for model in models:
            kept = by_model.get(model, {}).get("runs", []) if args.merge else []
            todo = set(lrs)
            if model == OURS and all(r["lr"] != DEFAULTS["lr"] for r in kept):
                todo.add(DEFAULTS["lr"])  # the table reports the command's own run
            runs = [r for r in kept if r["lr"] not in todo]
            for lr in sorted(todo):
                runs.append(train_one(model, dataset, lr, steps, args.seed, options))
                r = runs[-1]
                r["commit"] = saved["commit"]
                shown = (
                    f"{r['test_nll']:.3f} ({r['cpu_time']:.0f} s CPU)"
                    if "test_nll" in r
                    else "failed"
                )
                print(f"{dataset:>12} {model:<15} lr {_lr(lr):<6} {shown}", flush=True)
            by_model[model] = {"runs": sorted(runs, key=lambda r: r["lr"])}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(saved, indent=2))  # after every set: a crash keeps the rest
    earlier = saved.get("total_time_s", 0.0) if args.merge else 0.0
    saved["total_time_s"] = earlier + time.perf_counter() - started
    out.write_text(json.dumps(saved, indent=2))
    write_doc(saved, doc)  # adds the floors of new sets
    out.write_text(json.dumps(saved, indent=2))
    print(f"wrote {out} and {doc} ({saved['total_time_s']:.0f} s)")
    return saved


if __name__ == "__main__":
    main()
