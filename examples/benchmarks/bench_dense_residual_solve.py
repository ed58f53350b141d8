"""Sampling through the NPE preset's residual block: the work of one Newton solve.

:func:`~pyro_invres.flows.conditional_spline_residual_flow` samples by solving each
conditional dense residual block (:class:`~pyro_invres.transforms.conditional_dense_residual.
ConditionalDenseResidual`, ``explicit="inverse"``) with Newton's method. This script
counts, for blocks whose spectral caps bind (``Lip(g) = 0.9``, as after training), the
evaluations of the residual a solve makes (the starting guess included) and its cost in
*forward-pass equivalents*: the median CPU time of the solve over that of one explicit
pass of the block on the same batch (interleaved rounds, one thread; the explicit pass
includes the spectral caps, which a solve computes once), for one observation's context,
at the preset's default hidden width ``max(32, 8 D)``.

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


def measure(dim: int, batch: int, context_dim: int = 8, reps: int = 15) -> dict[str, Any]:
    hidden = max(32, 8 * dim)
    torch.manual_seed(0)
    block = conditional_dense_residual(dim, context_dim, hidden)
    with torch.no_grad():  # large output weights: the cap binds, Lip(g) = 0.9
        block.layer2[:, :-1].normal_().mul_(3.0)
        block.layer1[:, -1].normal_()
    bound = block.condition(torch.randn(context_dim))
    z = torch.randn(batch, dim)
    calls = 0
    residual = block.residual

    def counted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return residual(*args)

    with torch.no_grad():
        block.residual = counted  # type: ignore[method-assign]
        x = bound.call(z, cached=False)
        del block.residual
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
        "hidden": hidden,
        "residual_evaluations": calls,
        "forward_equivalents": statistics.median(solve) / statistics.median(explicit),
        "round_trip_max_error": error,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [(2, 256), (10, 256), (10, 10_000), (64, 256)] + ([] if args.quick else [(64, 10_000)])
    rows = [measure(d, b) for d, b in cases]
    out = args.out or RESULTS_DIR / "dense_residual_solve_cpu.json"
    write_json(
        {"benchmark": "dense_residual_solve", "env": env_info(torch.device("cpu")), "rows": rows},
        out,
    )
    table = [
        [
            r["dim"],
            r["batch"],
            r["hidden"],
            r["residual_evaluations"],
            f"{r['forward_equivalents']:.1f}",
        ]
        for r in rows
    ]
    print(
        markdown_table(
            ["D", "batch", "hidden", "residual evaluations", "forward-pass equivalents"], table
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
