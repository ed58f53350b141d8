"""Sampling through the NPE preset's residual block: the work of one solve.

:func:`~pyro_invres.flows.conditional_spline_residual_flow` samples by solving each
conditional dense residual block (:class:`~pyro_invres.transforms.conditional_dense_residual.
ConditionalDenseResidual`, ``explicit="inverse"``): Broyden's method from the inverse of the
batch's average Jacobian, Newton's for any row it leaves. This script
counts, for blocks whose spectral caps bind (``Lip(g) = 0.9``, as after training), the
evaluations of the residual a solve makes (the starting guess included) and its cost in
*forward-pass equivalents*: the median CPU time of the solve over that of one explicit
pass of the block on the same batch (interleaved rounds, one thread; the explicit pass
includes the spectral caps, which a solve computes once), for one observation's context,
at the preset's default hidden width ``max(32, 8 D)``, for one observation's context (the
tutorial's case) and for a different context per row (a batch of observations, where the
rows' Jacobians differ most from their average).

Run::

    python examples/benchmarks/bench_dense_residual_solve.py   # ~1 min, 1 thread
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, base_parser, env_info, markdown_table, write_json  # noqa: E402

from pyro_invres.transforms.conditional_dense_residual import (  # noqa: E402
    conditional_dense_residual,
)


def measure(
    dim: int, batch: int, context_dim: int = 8, reps: int = 15, per_row: bool = False
) -> dict[str, Any]:
    hidden = max(32, 8 * dim)
    torch.manual_seed(0)
    block = conditional_dense_residual(dim, context_dim, hidden)
    with torch.no_grad():  # large output weights: the cap binds, Lip(g) = 0.9
        block.layer2[:, :-1].normal_().mul_(3.0)
        block.layer1[:, -1].normal_()
    context = torch.randn(batch, context_dim) if per_row else torch.randn(context_dim)
    bound = block.condition(context)
    z = torch.randn(batch, dim)
    calls = 0

    def counting(method: Any) -> Any:
        def counted(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            return method(*args)

        return counted

    with torch.no_grad():
        # every evaluation of r, with or without its slopes
        block.residual = counting(block.residual)  # type: ignore[method-assign]
        block.value = counting(block.value)  # type: ignore[method-assign]
        x = bound.call(z, cached=False)
        del block.residual, block.value
        solve, explicit = [], []
        for _ in range(reps):
            start = time.thread_time()
            bound.call(z, cached=False)
            solve.append(time.thread_time() - start)
            start = time.thread_time()
            bound.inverse(x, cached=False)
            explicit.append(time.thread_time() - start)
        error = float((bound.inverse(x, cached=False) - z).abs().max())
    return {
        "dim": dim,
        "batch": batch,
        "contexts": "per row" if per_row else "one",
        "hidden": hidden,
        "residual_evaluations": calls,
        "forward_equivalents": statistics.median(solve) / statistics.median(explicit),
        "round_trip_max_error": error,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [(2, 256, False), (10, 256, False), (10, 10_000, False), (64, 256, False)]
    if not args.quick:
        cases += [(64, 10_000, False), (10, 10_000, True), (64, 10_000, True)]
    rows = [measure(d, b, per_row=p) for d, b, p in cases]
    out = args.out or RESULTS_DIR / "dense_residual_solve_cpu.json"
    write_json(
        {"benchmark": "dense_residual_solve", "env": env_info(torch.device("cpu")), "rows": rows},
        out,
    )
    table = [
        [
            r["dim"],
            r["batch"],
            r["contexts"],
            r["hidden"],
            r["residual_evaluations"],
            f"{r['forward_equivalents']:.1f}",
        ]
        for r in rows
    ]
    print(
        markdown_table(
            [
                "D",
                "batch",
                "contexts",
                "hidden",
                "residual evaluations",
                "forward-pass equivalents",
            ],
            table,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
