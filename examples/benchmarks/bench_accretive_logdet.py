"""Pivot-free elimination (``accretive_logdet``) against LAPACK's ``slogdet``, side by side.

Three levels, each timed forward + backward in interleaved rounds (this thread's CPU time,
so the other jobs of a shared machine do not count; the wall clock with ``--device cuda``,
where ``PixelResidual`` itself keeps ``slogdet``):

* the log-det alone, ``I + J`` with ``||J||_2 = 0.9``: the per-pixel Jacobians of
  ``glow_residual``'s blocks on MNIST (64 images; 14 x 14 pixels of 4 channels, 7 x 7 of 8),
  16 channels, and a posterior guide's batch (8 particles, ``D = 10`` and ``31``), where
  LAPACK wins and the guides keep ``slogdet``;
* one ``PixelResidual`` block (16 hidden units) at those two image sizes, with its log-det
  by ``accretive_logdet`` (the block's) or by ``slogdet`` of the same Jacobians;
* a ``glow_residual`` training step on MNIST-sized images (1 x 28 x 28, batch 64, Adam),
  both ways, with the ``glow`` preset's step as the reference.

Run ``python bench_accretive_logdet.py``; results go to
``results/accretive_logdet_<device>.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    base_parser,
    env_info,
    interleaved_timing,
    markdown_table,
    paired_ratio,
    setup_device,
    write_json,
)

from pyro_invres.ops.accretive import accretive_logdet  # noqa: E402
from pyro_invres.transforms.pixel_residual import PixelResidual  # noqa: E402

MATRICES = {  # name: (batch shape, n)
    "mnist level 1 (64 x 14 x 14, C = 4)": ((64, 14, 14), 4),
    "mnist level 2 (64 x 7 x 7, C = 8)": ((64, 7, 7), 8),
    "64 x 7 x 7, C = 16": ((64, 7, 7), 16),
    "guide (8 particles, D = 10)": ((8,), 10),
    "guide (8 particles, D = 31)": ((8,), 31),
}
BLOCKS = {"C = 4 at 14 x 14": (4, 14, 14), "C = 8 at 7 x 7": (8, 7, 7)}


def _clock(device: torch.device) -> str:
    """This thread's CPU time on the CPU (other jobs do not count); the wall clock on a GPU."""
    return "cpu" if device.type == "cpu" else "wall"


def _matrices(shape: tuple[int, ...], n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    j = torch.randn(*shape, n, n, generator=g)
    j = 0.9 * j / torch.linalg.matrix_norm(j, 2)[..., None, None]
    return (torch.eye(n) + j).to(device).requires_grad_(True)


def bench_matrices(args: Any, device: torch.device) -> dict[str, Any]:
    out = {}
    for name, (shape, n) in MATRICES.items():
        a = _matrices(shape, n, device)
        cols = a.detach().reshape(-1, n, n).permute(1, 2, 0).contiguous().requires_grad_(True)

        def lapack(timer: Any, a: torch.Tensor = a) -> None:
            torch.linalg.slogdet(a)[1].sum().backward()
            timer.mark("step")

        def ours(timer: Any, cols: torch.Tensor = cols) -> None:
            accretive_logdet(cols).sum().backward()
            timer.mark("step")

        t = interleaved_timing(
            {"slogdet": lapack, "accretive": ours}, device, reps=args.reps,
            warmup=args.warmup, clock=_clock(device),
        )  # fmt: skip
        out[name] = {"timing": t, "ratio": paired_ratio(t, "accretive", "slogdet")}
    return out


def bench_blocks(args: Any, device: torch.device) -> dict[str, Any]:
    out = {}
    for name, shape in BLOCKS.items():
        block = PixelResidual(shape, 16, 0.9).to(device)
        x = torch.randn(64, *shape, device=device, requires_grad=True)

        def step(
            timer: Any, lapack: bool, block: PixelResidual = block, x: torch.Tensor = x
        ) -> None:
            if lapack:
                block._ladj = block._ladj_lapack  # type: ignore[method-assign]
            try:
                y, ladj = block.call_and_ladj(x, cached=False)
                (y.square().sum() + ladj.sum()).backward()
            finally:
                block.__dict__.pop("_ladj", None)
            timer.mark("step")

        t = interleaved_timing(
            {"slogdet": lambda tm: step(tm, True), "accretive": lambda tm: step(tm, False)},
            device, reps=args.reps, warmup=args.warmup, clock=_clock(device),
        )  # fmt: skip
        out[name] = {"timing": t, "ratio": paired_ratio(t, "accretive", "slogdet")}
    return out


def bench_training(args: Any, device: torch.device) -> dict[str, Any]:
    import pyro.distributions as dist

    from pyro_invres.flows import base_shape, glow, glow_residual

    shape = (1, 28, 28)
    x = torch.rand(64, *shape, device=device)

    def make(preset: str, lapack: bool = False) -> Any:
        torch.manual_seed(0)
        if preset == "glow":
            flow = glow(shape, 2, 4, 64)
        else:
            flow = glow_residual(shape, 2, 4, 64, residual_channels=16)
        flow = flow.to(device)
        if lapack:
            for m in flow.modules():
                if isinstance(m, PixelResidual):
                    m._ladj = m._ladj_lapack  # type: ignore[method-assign]
        zeros = torch.zeros(base_shape(flow, shape), device=device)
        model = dist.TransformedDistribution(dist.Normal(zeros, 1.0).to_event(3), flow)
        opt = torch.optim.Adam(flow.parameters(), lr=1e-3)

        def step(timer: Any) -> None:
            opt.zero_grad(set_to_none=True)
            (-model.log_prob(x).mean()).backward()
            opt.step()
            timer.mark("step")

        return step

    steps = {
        "glow": make("glow"),
        "glow_residual (slogdet)": make("glow_residual", lapack=True),
        "glow_residual (accretive)": make("glow_residual"),
    }
    reps = max(3, args.reps // 4)
    t = interleaved_timing(steps, device, reps=reps, warmup=2, clock=_clock(device))
    return {
        "timing": t,
        "accretive / slogdet": paired_ratio(
            t, "glow_residual (accretive)", "glow_residual (slogdet)"
        ),
        "accretive / glow": paired_ratio(t, "glow_residual (accretive)", "glow"),
        "slogdet / glow": paired_ratio(t, "glow_residual (slogdet)", "glow"),
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    args.reps = args.reps if args.reps is not None else (5 if args.quick else 40)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    device = setup_device(args)
    result: dict[str, Any] = {
        "benchmark": "accretive_logdet",
        "command": " ".join(sys.argv),
        "env": env_info(device),
        "matrices": bench_matrices(args, device),
        "blocks": bench_blocks(args, device),
    }
    if not args.skip_training:
        result["training"] = bench_training(args, device)
    out = args.out or RESULTS_DIR / f"accretive_logdet_{device.type}.json"
    path = write_json(result, out)

    def ms(entry: dict, name: str) -> float:
        return 1e3 * entry["timing"]["impls"][name]["total"]["median"]

    rows = [
        [
            name,
            f"{ms(r, 'slogdet'):.3f}",
            f"{ms(r, 'accretive'):.3f}",
            f"{r['ratio']['median_of_paired']:.2f}",
        ]
        for section in ("matrices", "blocks")
        for name, r in result[section].items()
    ]
    print(markdown_table(["log-det (forward + backward)", "slogdet ms", "accretive ms",
                          "accretive / slogdet"], rows))  # fmt: skip
    if "training" in result:
        tr = result["training"]
        print(
            "\nglow_residual training step (MNIST 28 x 28, batch 64): accretive / slogdet "
            f"{tr['accretive / slogdet']['median_of_paired']:.3f}, accretive / glow "
            f"{tr['accretive / glow']['median_of_paired']:.3f}, slogdet / glow "
            f"{tr['slogdet / glow']['median_of_paired']:.3f}"
        )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
