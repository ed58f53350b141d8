"""Sampling a conditional i-ResNet: the work of each block solve, per solver.

Sampling a flow built with ``explicit="inverse"`` (the NPE setting: scoring is one pass per
block, sampling inverts every block) solves ``z + g(z; x) = w`` for each block. This script
counts that work per block solve and per solver (``fixed_point``, ``anderson``, ``newton``,
``secant``), every one of them stopping on the same rigorous Banach rule:

* **random blocks** (``--part blocks``): a conditional branch
  (:class:`~pyro_invres.nn.ConditionalLipschitzMLP`) scaled so that the largest ``||J_g||``
  over sampled points is ``c = 0.9`` (a worst case, as ``bench_residual_flow.py`` builds for
  its inversion table), at ``D = 2, 10, 64``; float64 with ``rtol = 1e-6, atol = 0`` (that
  table's target) and float32 with the default tolerances (what sampling uses); the batch
  shares one context (``one``: drawing for one observation) or has one per sample
  (``each``);
* **trained flows** (``--part trained``): :func:`~pyro_invres.flows.conditional_residual_flow`
  (5 blocks of ``[64, 64]``) trained with :func:`~pyro_invres.npe.fit_conditional` on two
  toy simulators (``D = 2``: a two-moons-like one; ``D = 10``: ``x = theta + 0.3 theta^3 +``
  noise; box priors), then sampled: 10,000 draws for one observation.

Reported per block solve: ``evals``, evaluations of ``g`` over the whole batch (a batch
solve runs until its slowest sample converges); ``jacobian_evals`` (Newton's evaluations
carry the ``D x D`` Jacobian); ``forward_equivalents``: the solve's median wall time over
the median wall time of one explicit pass of the same block on the same batch (interleaved
rounds; the pass includes the spectral normalisation's weight computation, which a solve
does once). For trained flows: per-block iterations and the wall time of drawing the
samples over one explicit pass of the whole flow on them.

Run::

    python examples/benchmarks/bench_conditional_sampling.py            # ~5 min, 1 thread
    python examples/benchmarks/bench_conditional_sampling.py --quick    # smoke test

Results: ``results/conditional_sampling_cpu.json`` (``--out`` to change).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    base_parser,
    env_info,
    interleaved_timing,
    markdown_table,
    setup_device,
    write_json,
)

LIPSCHITZ = 0.9
SOLVERS = ("fixed_point", "anderson", "newton", "secant")
BLOCKS = {2: [64, 64], 10: [100, 100], 64: [256, 256]}
CONTEXT_DIM = 5


class CountingNet(nn.Module):
    """``scale * net(x, context)``: counts the rows it evaluates, with and without Jacobians."""

    def __init__(self, net: nn.Module, scale: float) -> None:
        super().__init__()
        self.net = net
        self.scale = float(scale)
        self.lipschitz = LIPSCHITZ
        self.context_dim = net.context_dim
        self.rows = 0
        self.jacobian_rows = 0

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.rows += x.reshape(-1, x.shape[-1]).shape[0]
        return self.scale * self.net(x, context)

    def forward_with_jacobian(
        self, x: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.jacobian_rows += x.reshape(-1, x.shape[-1]).shape[0]
        gx, jac = self.net.forward_with_jacobian(x, context)
        return self.scale * gx, self.scale * jac


def worst_case_net(
    dim: int, dtype: torch.dtype, seed: int, z: torch.Tensor, context: torch.Tensor
) -> CountingNet:
    """A conditional branch scaled so that max ``||J_g||`` over sampled points is ``c``.

    The raw weights are first scaled up so that the spectral normalisation binds (as in a
    trained block; PyTorch's initialisation alone is so contractive that the scale factor
    would amplify the network's rounding far beyond what float32 tolerances allow). The
    points: 4096 standard normal draws with their own contexts, and the benchmark's
    own solutions ``z`` with their contexts at three scales (``0, 0.5, 1`` times ``z``, so
    that the segments the solvers travel are covered): the block is then a contraction
    where the solvers go, as the solvers' stopping rule assumes.
    """
    from pyro_invres.nn import ConditionalLipschitzMLP

    torch.manual_seed(seed)
    raw = ConditionalLipschitzMLP(dim, CONTEXT_DIM, BLOCKS[dim], lipschitz=LIPSCHITZ)
    with torch.no_grad():  # PyTorch's initialisation is contractive: make the norm bind
        for name, param in raw.named_parameters():
            if name.endswith("original"):
                param.mul_(5.0)
    raw = raw.to(dtype).eval()
    points = [torch.randn(4096, dim, dtype=dtype), *(a * z for a in (0.0, 0.5, 1.0))]
    contexts = [torch.randn(4096, CONTEXT_DIM, dtype=dtype), context, context, context]
    largest = 0.0
    with torch.no_grad():
        for x, c in zip(points, contexts):
            for xs, cs in zip(x.split(2048), c.split(2048)):
                jac = raw.forward_with_jacobian(xs, cs)[1]
                largest = max(largest, float(torch.linalg.matrix_norm(jac, ord=2).max()))
    return CountingNet(raw, LIPSCHITZ / largest)


def solver_object(name: str, tolerances: dict[str, float]) -> Any:
    from pyro_invres.ops.fixed_point import as_solver

    kind = type(as_solver(name))
    return kind(**tolerances, max_iter=1000, warm_start=False)


def bench_block(
    dim: int,
    dtype: torch.dtype,
    batch: int,
    tolerances: dict[str, float],
    contexts: str,
    args: Any,
) -> dict[str, Any]:
    from pyro_invres.transforms.iresnet import ConditionalInvertibleResidual

    gen = torch.Generator().manual_seed(args.seed)
    rows = 1 if contexts == "one" else batch  # one observation for all, or one each
    context = torch.randn(rows, CONTEXT_DIM, dtype=dtype, generator=gen).expand(batch, -1)
    z_true = torch.randn(batch, dim, dtype=dtype, generator=gen)
    net = worst_case_net(dim, dtype, args.seed + dim, z_true, context)
    blocks = {
        name: ConditionalInvertibleResidual(
            net,
            dim,
            lipschitz=LIPSCHITZ,
            explicit="inverse",
            solver=solver_object(name, tolerances),
        ).eval()
        for name in args.solvers
    }
    bound = {name: block.condition(context) for name, block in blocks.items()}
    explicit = next(iter(bound.values()))
    out: dict[str, Any] = {"dim": dim, "hidden": BLOCKS[dim], "batch": batch, "contexts": contexts}
    with torch.no_grad():
        w = explicit._inverse(z_true)  # explicit="inverse": the explicit pass maps z to w
        for name, block in bound.items():
            net.rows = net.jacobian_rows = 0
            z = block._call(w.clone())  # the iterative side: solve z + g(z) = w
            err = ((z - z_true).norm(dim=-1) / z_true.norm(dim=-1).clamp_min(1e-12)).max()
            out[name] = {
                "evals": net.rows / batch,
                "jacobian_evals": net.jacobian_rows / batch,
                "converged": bool(blocks[name].solve_stats.last.converged),
                "max_rel_error": float(err),
            }

        def timed(fn: Any) -> Any:
            def step(timer: Any) -> None:
                fn()
                timer.mark("run")

            return step

        steps = {"explicit": timed(lambda: explicit._inverse(z_true.clone()))}
        for name, block in bound.items():
            steps[name] = timed(lambda block=block: block._call(w.clone()))
        timing = interleaved_timing(steps, torch.device("cpu"), reps=args.reps, warmup=1)
    unit = timing["impls"]["explicit"]["total"]["median"]
    out["explicit_pass_seconds"] = unit
    for name in bound:
        seconds = timing["impls"][name]["total"]["median"]
        out[name]["seconds"] = seconds
        out[name]["forward_equivalents"] = seconds / unit
    return out


# -- trained flows ------------------------------------------------------------------------------
def simulate(dim: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Toy simulators with box priors ``U(-1, 1)^D``."""
    g = torch.Generator().manual_seed(seed)
    theta = 2 * torch.rand(n, dim, generator=g) - 1
    if dim == 2:  # two-moons-like: a crescent shifted by a folded function of theta
        a = math.pi * (torch.rand(n, generator=g) - 0.5)
        r = 0.1 + 0.01 * torch.randn(n, generator=g)
        p = torch.stack([r * torch.cos(a) + 0.25, r * torch.sin(a)], 1)
        shift = torch.stack(
            [-(theta[:, 0] + theta[:, 1]).abs(), -theta[:, 0] + theta[:, 1]], 1
        ) / math.sqrt(2)
        return theta, p + shift
    return theta, theta + 0.3 * theta**3 + 0.1 * torch.randn(n, dim, generator=g)


def bench_trained(dim: int, args: Any) -> dict[str, Any]:
    import pyro.distributions as dist
    from torch.distributions.transforms import ComposeTransform

    from pyro_invres.flows import conditional_residual_flow
    from pyro_invres.npe import ConditionalFlow, fit_conditional
    from pyro_invres.transforms.iresnet import ConditionalInvertibleResidual

    prior = dist.Uniform(-torch.ones(dim), torch.ones(dim)).to_event(1)
    theta, x = simulate(dim, args.simulations, args.seed)
    torch.manual_seed(args.seed)
    flow = ConditionalFlow(
        conditional_residual_flow(dim, dim, num_blocks=5, hidden_dims=[64, 64]),
        dim,
        dim,
        support=prior.support,
    )
    started = time.perf_counter()
    fit = fit_conditional(flow, theta, x, max_epochs=args.epochs, lr=1e-3, progress=False)
    out: dict[str, Any] = {
        "dim": dim,
        "simulations": args.simulations,
        "epochs": fit.epochs,
        "best_validation_loss": fit.best_validation_loss,
        "train_seconds": time.perf_counter() - started,
        "draws": args.draws,
    }
    blocks = [m for m in flow.modules() if isinstance(m, ConditionalInvertibleResidual)]
    observation = simulate(dim, 1, args.seed + 1)[1][0]
    draws = flow.condition(observation).sample((args.draws,))
    chain = ComposeTransform(flow.transforms(observation))

    def sample_with(name: str) -> Any:
        def step(timer: Any) -> None:
            for b in blocks:
                b.solver = name
            with torch.no_grad():
                flow.condition(observation).sample((args.draws,))
            timer.mark("run")

        return step

    def explicit(timer: Any) -> None:
        with torch.no_grad():
            chain.inv(draws.clone())  # scoring's pass: one explicit pass per block
        timer.mark("run")

    for name in args.solvers:
        for b in blocks:
            b.solver = name
            b.solve_stats.reset()
        torch.manual_seed(args.seed)
        with torch.no_grad():
            flow.condition(observation).sample((args.draws,))
        out[name] = {"iterations_per_block": [b.solve_stats.iterations for b in blocks]}
    steps = {"explicit": explicit, **{name: sample_with(name) for name in args.solvers}}
    timing = interleaved_timing(steps, torch.device("cpu"), reps=args.reps, warmup=1)
    unit = timing["impls"]["explicit"]["total"]["median"]
    out["explicit_pass_seconds"] = unit
    for name in args.solvers:
        seconds = timing["impls"][name]["total"]["median"]
        out[name]["sampling_seconds"] = seconds
        out[name]["explicit_pass_equivalents"] = seconds / unit
    return out


def bench_overhead(args: Any) -> list[dict[str, Any]]:
    """Seconds per iteration a solver spends beyond evaluating ``f`` (its bookkeeping).

    ``f(x) = y - tanh(x A^T)`` with ``||A|| = 0.6`` costs almost nothing, so the time of a
    solve over its iterations, less one evaluation of ``f``, is the solver's own work per
    iteration (the minimum over 15 runs: the least disturbed by other processes).
    """
    from pyro_invres.ops.fixed_point import solve_fixed_point

    def best(fn: Any, runs: int = 15) -> float:
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    rows = []
    for batch, dim in ((256, 10), (10_000, 10), (10_000, 64)):
        gen = torch.Generator().manual_seed(args.seed)
        a = torch.randn(dim, dim, generator=gen)
        a = 0.6 * a / torch.linalg.matrix_norm(a, ord=2)
        y = torch.randn(batch, dim, generator=gen)

        def f(x: torch.Tensor, y: torch.Tensor = y, a: torch.Tensor = a) -> torch.Tensor:
            return y - torch.tanh(x @ a.T)

        f_seconds = best(lambda f=f, y=y: f(y), 50)
        for name in args.solvers:
            if name == "newton":
                continue  # needs a Jacobian: not a bookkeeping comparison
            solve = lambda name=name, f=f, y=y: solve_fixed_point(  # noqa: E731
                f, y, contraction=0.9, method=name
            )
            iterations = solve()[1].iterations
            seconds = best(solve)
            rows.append(
                {
                    "batch": batch,
                    "dim": dim,
                    "solver": name,
                    "iterations": iterations,
                    "overhead_ms_per_iteration": 1e3 * (seconds / iterations - f_seconds),
                }
            )
            print("overhead", rows[-1], flush=True)
    return rows


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--part", default="blocks,trained,overhead", help="any of blocks, trained, overhead"
    )
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--dims", default="2,10,64")
    parser.add_argument("--batches", default="256,10000")
    parser.add_argument(
        "--contexts",
        default="one,each",
        help="one: the batch shares one context (sampling for one observation); each: a "
        "context per sample",
    )
    parser.add_argument("--simulations", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--draws", type=int, default=10_000)
    args = parser.parse_args()
    setup_device(args)
    args.solvers = args.solvers.split(",")
    args.reps = args.reps or (3 if args.quick else 9)
    dims = [int(d) for d in args.dims.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        dims, batches = dims[:2], [min(batches)]
        args.simulations, args.epochs, args.draws = 1000, 2, 1000
    started = time.perf_counter()
    result: dict[str, Any] = {
        "env": env_info(torch.device("cpu")),
        "blocks": [],
        "trained": [],
        "overhead": [],
    }
    settings = {
        "float64 rtol=1e-6 atol=0": (torch.float64, {"atol": 0.0, "rtol": 1e-6}),
        "float32 default tolerances": (torch.float32, {}),
    }
    if "blocks" in args.part:
        for label, (dtype, tol) in settings.items():
            for contexts in args.contexts.split(","):
                for dim in dims:
                    for batch in batches:
                        row = bench_block(dim, dtype, batch, tol, contexts, args)
                        row["setting"] = label
                        result["blocks"].append(row)
                        print(label, contexts, dim, batch, {s: row[s] for s in args.solvers})
    if "trained" in args.part:
        for dim in [d for d in dims if d <= 10]:
            row = bench_trained(dim, args)
            result["trained"].append(row)
            print("trained", dim, {s: row[s] for s in args.solvers}, flush=True)
    if "overhead" in args.part:
        result["overhead"] = bench_overhead(args)
    result["seconds"] = time.perf_counter() - started
    out = Path(args.out) if args.out else RESULTS_DIR / "conditional_sampling_cpu.json"
    if not args.quick or args.out:
        write_json(result, out)
    print_tables(result, args.solvers)


def print_tables(result: dict[str, Any], solvers: list[str]) -> None:
    rows = []
    for row in result["blocks"]:
        for s in solvers:
            r = row[s]
            rows.append(
                [
                    row["setting"],
                    row.get("contexts", "each"),
                    row["dim"],
                    row["batch"],
                    s,
                    r["evals"],
                    r["jacobian_evals"],
                    r["forward_equivalents"],
                    r["max_rel_error"],
                ]
            )
    headers = ["setting", "contexts", "D", "batch", "solver", "evals", "jacobian evals"]
    headers += ["fwd-eq", "max err"]
    print(markdown_table(headers, rows))
    rows = []
    for row in result["trained"]:
        for s in solvers:
            r = row[s]
            its = r["iterations_per_block"]
            rows.append(
                [
                    row["dim"],
                    s,
                    sum(its) / len(its),
                    str(its),
                    r["sampling_seconds"],
                    r["explicit_pass_equivalents"],
                ]
            )
    headers = ["D", "solver", "evals/block", "per block", "seconds", "explicit passes"]
    print(markdown_table(headers, rows))
    rows = [
        [r["batch"], r["dim"], r["solver"], r["iterations"], r["overhead_ms_per_iteration"]]
        for r in result["overhead"]
    ]
    print(markdown_table(["batch", "n", "solver", "iterations", "overhead ms/iteration"], rows))


if __name__ == "__main__":
    main()
