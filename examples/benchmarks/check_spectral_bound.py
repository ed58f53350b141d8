"""How far the training-mode spectral estimate lets a layer exceed its Lipschitz share.

Trains the residual-flow benchmark's config (default B: 64-D, 4 blocks of [256, 256],
Adam at lr 1e-3) with the refresh cap ``n_power_iterations`` (Lanczos steps) set to each value of
``--caps``, and after every 5th step from step 20 on compares the exact spectral norm of
every normalised weight (``torch.linalg.matrix_norm(ord=2)``) with its share ``c_l`` of
the bound. Prints the worst relative excess ``||W_l|| / c_l - 1`` per cap. Evaluation mode
tops the estimate up (200 iterations), so this concerns training-mode forward passes.

Usage::

    python examples/benchmarks/check_spectral_bound.py --caps 1,5,20 --config B
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_residual_flow as bench  # noqa: E402
from common import PhaseTimer  # noqa: E402

from pyro_invres.nn.spectral import SpectralNormScale  # noqa: E402


def worst_excess(config: str, cap: int, steps: int) -> tuple[float, float]:
    step = bench.build_step("ours", config)
    flow = next(
        c.cell_contents
        for c in step.__closure__ or ()
        if isinstance(c.cell_contents, torch.nn.Module)
    )
    for module in flow.modules():
        if isinstance(module, SpectralNormScale):
            module.n_power_iterations = cap
    layers = [m for m in flow.modules() if hasattr(m, "parametrizations")]
    timer, worst, start = PhaseTimer(torch.device("cpu")), 0.0, time.perf_counter()
    for i in range(steps):
        step(timer)
        if i >= 20 and i % 5 == 4:
            for layer in layers:
                c = layer.parametrizations.weight[0].lipschitz
                norm = float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2))
                worst = max(worst, norm / c - 1.0)
    return worst, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="B")
    parser.add_argument("--caps", default="1,3,5,20")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for cap in (int(c) for c in args.caps.split(",")):
        worst, seconds = worst_excess(args.config, cap, args.steps)
        print(f"n_power_iterations={cap}: worst ||W_l|| / c_l - 1 = {worst:.2e} ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
