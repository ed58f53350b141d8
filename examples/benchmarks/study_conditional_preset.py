"""Design study for :func:`pyro_invres.flows.conditional_residual_flow` on sbibm tasks.

Every candidate flow and zuko's neural spline flow (sbi's default estimator:
``zuko.flows.NSF(D, C, transforms=5, hidden_features=[50, 50])``) are trained on the same
simulations with the same loop (:func:`pyro_invres.npe.fit_conditional`: Adam at 5e-4,
batches of 200, 10% validation, 20 epochs of patience, the same per-tensor gradient clip),
the same z-scoring and the same map onto the prior's support (both sit inside a
:class:`~pyro_invres.npe.ConditionalFlow`; NSF through a thin adapter that scores with
zuko's own ``call_and_ladj``). Each trained flow draws 10,000 samples per observation,
scored with sbibm's C2ST against the reference posterior (0.5 is perfect).

Candidates (names for ``--flows``):

* ``nsf``: zuko's NSF as above.
* ``iresnet``: the first preset, 5 conditional i-ResNet blocks ``[64, 64]`` + ActNorm
  (``explicit="inverse"``, exact log-det, LipSwish, ``c = 0.9``).
* ``hybrid``: the preset as built by ``conditional_residual_flow(D, C)`` now.
* ``hybrid-noaffine``, ``hybrid-sine``, ``hybrid-3``: the preset without its last
  conditional affine layer, with the sine activation, with 3 blocks.

Run (one task per process, several at once on a shared machine; ``--merge`` joins them)::

    OMP_NUM_THREADS=1 python examples/benchmarks/study_conditional_preset.py \\
        --tasks two_moons --flows nsf hybrid --out /tmp/study_two_moons.json
    python examples/benchmarks/study_conditional_preset.py --merge /tmp/study_*.json \\
        --out examples/benchmarks/results/conditional_preset_study_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch.distributions import constraints
from torch.distributions.transforms import Transform

from pyro_invres.flows import conditional_residual_flow
from pyro_invres.npe import ConditionalFlow, fit_conditional
from pyro_invres.transforms.actnorm import ActNorm
from pyro_invres.transforms.iresnet import conditional_iresnet

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("two_moons", "slcp", "gaussian_mixture", "gaussian_linear_uniform", "bernoulli_glm")


# -- zuko's NSF as a Pyro conditional transform --------------------------------------------------
class _ZukoSide(Transform):
    """Base noise -> data through a zuko transform (which maps data -> noise).

    Scoring calls ``_inverse`` and then ``log_abs_det_jacobian`` on the same pair: the
    log-det of zuko's one ``call_and_ladj`` pass is kept for it (no second pass).
    """

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, transform: Any) -> None:
        super().__init__(cache_size=0)
        self.t = transform
        self._memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        return self.t.inv(z)

    def _inverse(self, x: torch.Tensor) -> torch.Tensor:
        z, ladj = self.t.call_and_ladj(x)
        self._memo = (x, z, ladj)
        return z

    def log_abs_det_jacobian(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        memo = self._memo
        if memo is not None and memo[0] is x and memo[1] is z:
            return -memo[2]
        return -self.t.log_abs_det_jacobian(x, z)


class ZukoConditional(ConditionalTransformModule):
    """A zuko conditional flow's transform as a Pyro conditional transform (base -> data)."""

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, flow: torch.nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def condition(self, context: torch.Tensor) -> Transform:
        return _ZukoSide(self.flow.transform(context))


# -- candidates ------------------------------------------------------------------------------------
def build(name: str, dim: int, context_dim: int) -> Any:
    if name == "nsf":
        import zuko

        return ZukoConditional(
            zuko.flows.NSF(dim, context_dim, transforms=5, hidden_features=[50, 50])
        )
    if name == "iresnet":
        parts: list[Any] = []
        for _ in range(5):
            parts += [
                conditional_iresnet(dim, context_dim, [64, 64], explicit="inverse", logdet="exact"),
                ActNorm(dim),
            ]
        return parts
    if name == "hybrid":
        return conditional_residual_flow(dim, context_dim)
    if name == "hybrid-noaffine":
        return conditional_residual_flow(dim, context_dim, context_affine=False)
    if name == "hybrid-sine":
        return conditional_residual_flow(dim, context_dim, activation="sine")
    if name == "hybrid-3":
        return conditional_residual_flow(dim, context_dim, num_blocks=3)
    raise ValueError(f"unknown flow {name!r}")


FLOW_NAMES = ("nsf", "iresnet", "hybrid", "hybrid-noaffine", "hybrid-sine", "hybrid-3")


# -- one task ------------------------------------------------------------------------------------
def run_task(task_name: str, flows: list[str], args: argparse.Namespace) -> list[dict]:
    import sbibm
    from sbibm.metrics import c2st

    task = sbibm.get_task(task_name)
    torch.manual_seed(args.seed)
    theta = task.get_prior()(num_samples=args.num_simulations)
    x = task.get_simulator()(theta)
    support = task.get_prior_dist().support
    support = None if support is constraints.real or support is constraints.real_vector else support
    rows = []
    for name in flows:
        torch.manual_seed(args.seed)
        transform = build(name, theta.shape[1], x.shape[1])
        flow = ConditionalFlow(transform, theta.shape[1], x.shape[1], support=support)
        n_params = sum(p.numel() for p in flow.parameters())
        fit = fit_conditional(
            flow, theta, x, max_epochs=args.max_epochs, seed=args.seed, progress=False
        )
        row: dict[str, Any] = {
            "task": task_name,
            "flow": name,
            "parameters": n_params,
            "train_time_s": fit.wall_time,
            "epochs": fit.epochs,
            "best_epoch": fit.best_epoch,
            "stopped_early": fit.stopped_early,
            "best_validation_loss": fit.best_validation_loss,
            "observations": {},
        }
        for num in args.observations:
            obs = task.get_observation(num_observation=num).reshape(-1)
            reference = task.get_reference_posterior_samples(num_observation=num)[: args.draws]
            torch.manual_seed(args.seed + num)
            with torch.no_grad():
                start = time.perf_counter()
                samples = flow.condition(obs).sample((args.draws,))
                sample_time = time.perf_counter() - start
            finite = bool(torch.isfinite(samples).all())
            score = float(c2st(reference, samples)[0]) if finite else float("nan")
            row["observations"][str(num)] = {"c2st": score, "sample_time_s": sample_time}
            print(f"{task_name} {name} obs {num}: c2st {score:.3f}, sampling {sample_time:.2f} s")
        cs = [o["c2st"] for o in row["observations"].values()]
        row["c2st_mean"] = sum(cs) / len(cs)
        print(
            f"{task_name} {name}: mean c2st {row['c2st_mean']:.3f}, train {fit.wall_time:.0f} s, "
            f"{fit.epochs} epochs (best {fit.best_epoch}), {n_params} parameters",
            flush=True,
        )
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table: C2ST per observation, times and their ratios to NSF's on the task."""
    nsf = {r["task"]: r for r in rows if r["flow"] == "nsf"}
    nums = sorted({k for r in rows for k in r["observations"]}, key=int)
    head = ["task", "flow", *(f"C2ST obs {k}" for k in nums), "mean", "train s (x NSF)"]
    head += ["epochs (best)", "sample 10k s (x NSF)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def sample_time(r: dict) -> float:
        ts = [o["sample_time_s"] for o in r["observations"].values()]
        return sum(ts) / len(ts)

    for r in rows:
        ref = nsf.get(r["task"])
        tr = f"{r['train_time_s']:.0f}"
        st = f"{sample_time(r):.2f}"
        if ref is not None and r is not ref:
            tr += f" ({r['train_time_s'] / ref['train_time_s']:.2f})"
            st += f" ({sample_time(r) / sample_time(ref):.2f})"
        cells = [r["task"], r["flow"]]
        cells += [
            f"{r['observations'][k]['c2st']:.3f}" if k in r["observations"] else "" for k in nums
        ]
        cells += [f"{r['c2st_mean']:.3f}", tr, f"{r['epochs']} ({r['best_epoch']})", st]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        return out.stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons", "slcp", "gaussian_mixture"])
    parser.add_argument("--flows", nargs="+", default=["nsf", "hybrid"], choices=FLOW_NAMES)
    parser.add_argument("--num-simulations", type=int, default=10_000)
    parser.add_argument("--observations", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--draws", type=int, default=10_000)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", nargs="+", default=None, help="join these result files")
    parser.add_argument("--table", default=None, help="print the table of this result file")
    parser.add_argument("--out", default=str(RESULTS / "conditional_preset_study_cpu.json"))
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())["rows"]))
        return
    if args.merge:
        rows, runs = [], []
        for path in args.merge:
            data = json.loads(Path(path).read_text())
            rows += data["rows"]
            runs.append(data["run"])
        Path(args.out).write_text(json.dumps({"runs": runs, "rows": rows}, indent=1) + "\n")
        return
    torch.set_num_threads(1)
    for task in args.tasks:
        if task not in TASKS:
            raise SystemExit(f"unknown task {task!r}; choose from {TASKS}")
    rows = []
    for task in args.tasks:
        rows += run_task(task, args.flows, args)
        run = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "commit": _commit(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "threads": 1,
        }
        Path(args.out).write_text(json.dumps({"run": run, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
