"""The toy-density grid, in the style of the i-ResNet paper: one row per data set.

Columns: samples of the data | residual-flow density | Pyro ``affine_coupling`` flow density
| Pyro ``spline_coupling`` flow density. Every flow is fitted by maximum likelihood with
the same loop, the same number of steps, batch size, learning-rate schedule and data:

* ``ResidualFlow``: the flow ``pyro-invres fit`` trains,
  ``build_flow("iresnet", 2, **flow_options())``: 8 i-ResNet blocks of [32, 32] with
  ActNorm, ``lipschitz=0.97``, the learned Lipschitz split and the sine activation
  (scoring data is one explicit pass per block). An earlier version of this grid used
  ELU blocks; at 400 steps they reached 2.93 / 4.17 / 2.77 nats on 8gaussians /
  checkerboard / moons;
* ``PyroAffine``: 8 of Pyro's ``affine_coupling(2, hidden_dims=[64, 64])`` with a swap of
  the two coordinates between them;
* ``PyroSpline``: 4 of Pyro's ``spline_coupling(2, hidden_dims=[64, 64], count_bins=8,
  bound=5)`` with swaps between them.

The fit is Pyro-native: a model observes a random mini-batch under a subsampled
``pyro.plate`` (scaled to nats per sample) with an empty guide; the loss is
``Trace_ELBO().differentiable_loss`` (which, with no latent variables, is the negative
log-likelihood), minimised by one ``torch.optim.Adam`` over all parameters with global
gradient clipping and an exponential decay of the learning rate to a tenth. (One
optimiser over all parameters costs much less per step than ``pyro.optim``'s one per
parameter, and these steps are dominated by such overheads.)

Held-out NLL (nats per sample, 5000 fresh points, eval mode) per flow and data set is
printed as a markdown table. Files are written only when asked: ``--save`` records the
numbers in ``examples/results/toy_grid.json`` and the grid in
``docs/_static/figures/toy_grid.png``; ``--out DIR`` puts both under ``DIR``.

Defaults, chosen to finish in about 2 minutes on 2 idle cores: four data sets
(8gaussians, checkerboard, moons, rings) and 400 steps of batch 256, learning rate 1e-2
decayed to 1e-3. ``--full``: the six data sets of the papers (8gaussians, checkerboard,
2spirals, moons, rings, pinwheel) and 2000 steps (about 15 minutes)::

    python examples/toy_grid.py --save                # the recorded run
    python examples/toy_grid.py --full --out runs/toy_grid_full
    python examples/toy_grid.py --datasets rings pinwheel --steps 1000   # table only
    python examples/toy_grid.py --quick               # a smoke test, writes nothing
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from _common import add_run_arguments, run_outputs, shown, write_results  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.distributions.torch_transform import ComposeTransformModule  # noqa: E402
from pyro.distributions.transforms import Permute, affine_coupling, spline_coupling  # noqa: E402
from pyro.infer import Trace_ELBO  # noqa: E402
from torch import Tensor  # noqa: E402

from pyro_invres.cli import flow_options  # noqa: E402
from pyro_invres.datasets import sample_toy  # noqa: E402
from pyro_invres.train import build_flow  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "toy_grid.json"
DEFAULT_DATASETS = ("8gaussians", "checkerboard", "moons", "rings")
FULL_DATASETS = ("8gaussians", "checkerboard", "2spirals", "moons", "rings", "pinwheel")
LIMITS = (-4.0, 4.0)


# -- the three flows ----------------------------------------------------------------------------
def couplings(block: Callable[[], object], num_blocks: int) -> ComposeTransformModule:
    swap = torch.tensor([1, 0])
    parts: list = []
    for k in range(num_blocks):
        if k:
            parts.append(Permute(swap))
        parts.append(block())
    return ComposeTransformModule(parts)


FLOWS: dict[str, Callable[[], ComposeTransformModule]] = {
    "ResidualFlow": lambda: build_flow("iresnet", 2, **flow_options()),
    "PyroAffine": lambda: couplings(lambda: affine_coupling(2, hidden_dims=[64, 64]), 8),
    "PyroSpline": lambda: couplings(
        lambda: spline_coupling(2, hidden_dims=[64, 64], count_bins=8, bound=5.0), 4
    ),
}


def density_of(flow: ComposeTransformModule) -> dist.TransformedDistribution:
    return dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), flow)


# -- fitting and evaluation -------------------------------------------------------------------
def fit(flow: ComposeTransformModule, data: Tensor, steps: int, batch_size: int, lr: float) -> dict:
    density = density_of(flow)

    def model(data: Tensor) -> None:
        pyro.module("flow", flow)
        with pyro.plate("data", len(data), subsample_size=batch_size) as idx:
            with poutine.scale(scale=1.0 / len(data)):  # nats per sample
                pyro.sample("x", density, obs=data[idx])

    def guide(data: Tensor) -> None:  # no latent variables: the ELBO is the likelihood
        pass

    elbo = Trace_ELBO(max_plate_nesting=1)
    pyro.clear_param_store()
    flow.train()
    params = list(flow.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.1 ** (1 / steps))
    wall, cpu = time.perf_counter(), time.process_time()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = elbo.differentiable_loss(model, guide, data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return {
        "train_wall_s": time.perf_counter() - wall,
        "train_cpu_s": time.process_time() - cpu,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
    }


@torch.no_grad()
def held_out_nll(flow: ComposeTransformModule, data: Tensor) -> float:
    flow.eval()
    return float(-density_of(flow).log_prob(data).mean())


@torch.no_grad()
def density_grid(flow: ComposeTransformModule, n: int) -> Tensor:
    flow.eval()
    g = torch.linspace(*LIMITS, n)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    points = torch.stack([gx, gy], dim=-1).reshape(-1, 2)
    return density_of(flow).log_prob(points).exp().reshape(n, n)


def plot(rows: dict, nll: dict, path: Path) -> None:
    columns = ["data", *FLOWS]
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(2.6 * len(columns), 2.6 * len(rows)), squeeze=False
    )
    for r, (name, (samples, grids)) in enumerate(rows.items()):
        axes[r, 0].hist2d(
            samples[:, 0].numpy(),
            samples[:, 1].numpy(),
            bins=150,
            range=[LIMITS, LIMITS],
            cmap="viridis",
        )
        axes[r, 0].set_ylabel(name)
        for c, flow_name in enumerate(FLOWS, start=1):
            grid = grids[flow_name]
            axes[r, c].imshow(
                grid.numpy(),
                origin="lower",
                extent=(*LIMITS, *LIMITS),
                cmap="viridis",
                vmin=0.0,
                vmax=float(grid.quantile(0.995)),  # spikes would wash out the rest
            )
            axes[r, c].set_title(f"NLL {nll[name][flow_name]:.3f}", fontsize=8, pad=2)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    for c, title in enumerate(columns):
        axes[0, c].annotate(title, (0.5, 1.18), xycoords="axes fraction", ha="center", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="default 400 (2000 --full)")
    parser.add_argument("--datasets", nargs="+", default=None, help="names from sample_toy")
    parser.add_argument("--full", action="store_true", help="six data sets, 2000 steps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--num-train", type=int, default=20_000)
    parser.add_argument("--grid", type=int, default=150, help="grid points per axis")
    add_run_arguments(parser, RESULTS)
    args = parser.parse_args()
    outputs = run_outputs(parser, args, RESULTS, "toy_grid.png")
    datasets = args.datasets or list(FULL_DATASETS if args.full else DEFAULT_DATASETS)
    steps = args.steps or (2000 if args.full else 400)
    if args.quick:
        datasets, steps, args.grid = datasets[:2], 10, 60

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, nll, results = {}, {}, {}
    for name in datasets:
        train = sample_toy(name, args.num_train, seed=args.seed)
        test = sample_toy(name, 5000, seed=args.seed + 1000)
        grids, nll[name], results[name] = {}, {}, {}
        for flow_name, make in FLOWS.items():
            pyro.set_rng_seed(args.seed)
            flow = make()
            metrics = fit(flow, train, steps, args.batch_size, args.lr)
            metrics["test_nll"] = nll[name][flow_name] = held_out_nll(flow, test)
            grids[flow_name] = density_grid(flow, args.grid)
            results[name][flow_name] = metrics
            print(
                f"{name:13s} {flow_name:13s} test NLL {metrics['test_nll']:.3f}  "
                f"({metrics['train_wall_s']:.1f} s wall, {metrics['train_cpu_s']:.1f} s CPU)",
                flush=True,
            )
        rows[name] = (train[:20_000], grids)

    print("\n| data set | " + " | ".join(FLOWS) + " |")
    print("|---|" + "---|" * len(FLOWS))
    for name in datasets:
        print(f"| {name} | " + " | ".join(f"{nll[name][f]:.3f}" for f in FLOWS) + " |")
    cpu = {f: sum(results[n][f]["train_cpu_s"] for n in datasets) for f in FLOWS}
    print("| train CPU s (all sets) | " + " | ".join(f"{cpu[f]:.1f}" for f in FLOWS) + " |")

    if outputs is not None:
        plot(rows, nll, outputs.figure)
    total = time.perf_counter() - start
    payload = {
        "config": {
            "datasets": datasets,
            "steps": steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "lr_final": 0.1 * args.lr,
            "num_train": args.num_train,
            "num_test": 5000,
            "seed": args.seed,
            "quick": args.quick,
            "flows": {
                "ResidualFlow": f"build_flow('iresnet', 2, **{flow_options()})",
                "PyroAffine": "8 x affine_coupling(2, hidden_dims=[64, 64]), swaps between",
                "PyroSpline": "4 x spline_coupling(2, [64, 64], count_bins=8, bound=5), swaps",
            },
        },
        "test_nll": nll,
        "results": results,
        "total_wall_s": total,
        "figure": None if outputs is None else shown(outputs.figure),
    }
    write_results(outputs, payload, total)


if __name__ == "__main__":
    main()
