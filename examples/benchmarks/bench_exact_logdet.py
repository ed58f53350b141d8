"""Exact i-ResNet log-det: the Jacobian carried forward against vector-Jacobian products.

With ``logdet="exact"`` (the default up to 16 dimensions) a block needs the full Jacobian
of its branch ``g``. Two ways to get it, both exact:

* ``carried``: the network pushes ``D`` tangents through its layers beside the
  activations (:meth:`pyro_invres.nn.LipschitzMLP.forward_with_jacobian`), so training
  back-propagates through explicit operations once;
* ``vjp``: ``D`` batched vector-Jacobian products with ``create_graph=True``
  (:func:`pyro_invres.ops.logdet_exact`), so training runs a double backward. A block
  takes this path when its network has no ``forward_with_jacobian`` or carries a forward
  hook; the benchmark registers a no-op hook to select it.

Both flows start from the same weights; a training step is ``-log p(x)`` of a batch of
data, ``backward()``, an Adam step. Timing interleaves the two round by round in one
process (common.py); the script also checks that both paths give the same log-density
and gradients before timing. Configurations: the flow ``pyro-invres fit`` trains
(2-D, 8 blocks of [32, 32], batch 256) and a wider one (``--dims``, 4 blocks of [64, 64]).

Run ``python bench_exact_logdet.py --help``; results go to
``results/exact_logdet_<device>.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pyro.distributions as dist
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

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

from pyro_invres.cli import flow_options  # noqa: E402
from pyro_invres.train import build_flow  # noqa: E402
from pyro_invres.transforms import InvertibleResidual  # noqa: E402

IMPLS = ("carried", "vjp")


def build(dim: int, config: dict[str, Any], impl: str, device: torch.device, seed: int) -> Any:
    torch.manual_seed(seed)
    flow = build_flow("iresnet", dim, **config).to(device)
    blocks = [b for b in flow if isinstance(b, InvertibleResidual)]
    if impl == "vjp":
        for b in blocks:
            b.nn.register_forward_hook(lambda module, args, out: None)
    assert all(b._carries_jacobian() == (impl == "carried") for b in blocks)
    base = dist.Normal(torch.zeros(dim, device=device), torch.ones(dim, device=device))
    return flow, dist.TransformedDistribution(base.to_event(1), [flow])


def agreement(dim: int, config: dict[str, Any], device: torch.device, seed: int) -> dict:
    """Max differences of log p and of the gradients between the two paths (float64)."""
    x = torch.randn(64, dim, device=device, dtype=torch.float64)
    out = {}
    for impl in IMPLS:
        flow, d = build(dim, config, impl, device, seed)
        flow.double()
        base = dist.Normal(
            torch.zeros(dim, device=device, dtype=torch.float64),
            torch.ones(dim, device=device, dtype=torch.float64),
        )
        d = dist.TransformedDistribution(base.to_event(1), [flow])
        lp = d.log_prob(x.clone())
        lp.sum().backward()
        out[impl] = (lp.detach(), [p.grad.clone() for p in flow.parameters()])
    (lp_a, g_a), (lp_b, g_b) = out["carried"], out["vjp"]
    grad_diff = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) for a, b in zip(g_a, g_b)
    )
    return {
        "log_prob_max_abs_diff": float((lp_a - lp_b).abs().max()),
        "grad_max_rel_diff": grad_diff,
    }


def bench(args: Any, device: torch.device, dim: int, config: dict[str, Any], batch: int) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    pool = torch.randn(32, batch, dim, generator=generator).to(device)
    steps = {}
    for impl in IMPLS:
        flow, d = build(dim, config, impl, device, args.seed)
        opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
        state = {"i": 0}

        def step(timer: PhaseTimer, d: Any = d, opt: Any = opt, state: dict = state) -> None:
            x = pool[state["i"] % len(pool)]
            state["i"] += 1
            loss = -d.log_prob(x).mean()
            timer.mark("forward")
            loss.backward()
            timer.mark("backward")
            opt.step()
            opt.zero_grad(set_to_none=True)
            timer.mark("optimizer")

        steps[impl] = step
    timing = interleaved_timing(steps, device, reps=args.reps, warmup=args.warmup)
    return {
        "dim": dim,
        "batch": batch,
        "flow": config,
        "agreement_float64": agreement(dim, config, device, args.seed),
        "timing": {
            impl: {
                "total": timing["impls"][impl]["total"],
                "phases": timing["impls"][impl]["phases"],
            }
            for impl in IMPLS
        },
        "ratio_carried_over_vjp": paired_ratio(timing, "carried", "vjp"),
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dims", default="8", help="wider configurations (4 blocks of [64, 64])")
    args = parser.parse_args()
    args.reps = args.reps if args.reps is not None else (5 if args.quick else 60)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    device = setup_device(args)
    configs = [("fit default", 2, flow_options("iresnet"), 256)]
    for dim in (int(d) for d in args.dims.split(",") if d):
        wide = flow_options("iresnet", num_blocks=4, hidden="64,64")
        configs.append((f"{dim}-D, 4 x [64, 64]", dim, wide, 256))
    result: dict[str, Any] = {
        "benchmark": "exact_logdet",
        "env": env_info(device),
        "reps": args.reps,
        "warmup": args.warmup,
        "configs": {},
    }
    for name, dim, config, batch in configs:
        result["configs"][name] = bench(args, device, dim, config, batch)
    out = args.out or HERE / "results" / f"exact_logdet_{device.type}.json"
    write_json(result, out)
    rows = []
    for name, r in result["configs"].items():
        t = r["timing"]
        ratio = r["ratio_carried_over_vjp"]
        rows.append(
            [
                name,
                f"{1e3 * t['carried']['total']['median']:.1f}",
                f"{1e3 * t['vjp']['total']['median']:.1f}",
                f"{ratio['of_medians']:.2f}",
                f"{ratio['median_of_paired']:.2f}",
                f"{r['agreement_float64']['log_prob_max_abs_diff']:.1e}",
                f"{r['agreement_float64']['grad_max_rel_diff']:.1e}",
            ]
        )
    print(
        markdown_table(
            [
                "flow",
                "carried (ms/step)",
                "vjp (ms/step)",
                "ratio of medians",
                "median paired ratio",
                "max |d log p| (f64)",
                "max rel d grad (f64)",
            ],
            rows,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
