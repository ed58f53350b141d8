"""Conditional density estimation with conditional i-ResNet blocks: ``p(y | x)``.

The data: ``x ~ U(-2, 2)`` and, given ``x``, a two-component mixture whose modes split
apart and whose spread grows as ``x`` increases (bimodal *and* heteroscedastic)::

    y | x ~ 0.5 N(m(x) - d(x), s(x)) + 0.5 N(m(x) + d(x), s(x)),
    m(x) = sin(1.5 x),  d(x) = 0.3 (x + 2),  s(x) = 0.12 + 0.06 (x + 2)

The flow is a :class:`pyro.distributions.ConditionalTransformedDistribution` of a standard
normal through ``num_blocks`` x [``conditional_iresnet(1, context_dim=1, ...)``,
``ActNorm``]. The blocks are built with ``explicit="inverse"``: scoring data (training) is
one explicit pass per block, only drawing samples (the figure) solves a fixed point.

It is fitted the Pyro way, a model observing mini-batches of ``y`` given ``x`` with an
empty guide and SVI (the ELBO is then the log-likelihood), and compared with a conditional
Gaussian baseline ``y | x ~ N(mu(x), sigma(x))`` (an MLP) trained the same way. Reported:
held-out conditional NLL (nats per sample) of both, and of the true density for reference.
The figure shows the data with flow samples, then ``p(y | x)`` at four values of ``x``
(truth, flow, Gaussian). Files are written only when asked: ``--save`` records the figure
in ``docs/_static/figures/conditional_density.png`` and the numbers in
``examples/results/conditional_density.json``; ``--out DIR`` puts both under ``DIR``.

Run (defaults: 2000 steps, batch 256, 4 blocks of [64, 64], lr 5e-3; about a minute on 2
idle cores)::

    python examples/conditional_density.py --save     # the recorded run
    python examples/conditional_density.py --quick    # a smoke test, writes nothing
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from _common import add_run_arguments, run_outputs, shown, write_results  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from pyro_invres import ActNorm, conditional_iresnet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "conditional_density.json"
X_SLICES = (-1.5, -0.5, 0.5, 1.5)


# -- the data and its true conditional density ------------------------------------------------
def components(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, half-separation and spread of the two modes at ``x``."""
    return torch.sin(1.5 * x), 0.3 * (x + 2.0), 0.12 + 0.06 * (x + 2.0)


def true_log_density(y: Tensor, x: Tensor) -> Tensor:
    m, d, s = components(x)
    both = torch.stack([dist.Normal(m - d, s).log_prob(y), dist.Normal(m + d, s).log_prob(y)])
    return both.logsumexp(0) - math.log(2.0)


def sample_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    x = 4.0 * torch.rand(n, 1, generator=generator) - 2.0
    m, d, s = components(x)
    sign = 2.0 * torch.randint(0, 2, (n, 1), generator=generator).float() - 1.0
    y = m + sign * d + s * torch.randn(n, 1, generator=generator)
    return x, y


# -- the two conditional densities -------------------------------------------------------------
def make_flow(num_blocks: int, hidden_dims: list[int]) -> tuple[nn.ModuleList, object]:
    parts: list[nn.Module] = []
    for _ in range(num_blocks):
        parts.append(conditional_iresnet(1, 1, hidden_dims, explicit="inverse", activation="elu"))
        parts.append(ActNorm(1))
    base = dist.Normal(torch.zeros(1), torch.ones(1)).to_event(1)
    return nn.ModuleList(parts), dist.ConditionalTransformedDistribution(base, list(parts))


class GaussianBaseline(nn.Module):
    """``y | x ~ N(mu(x), sigma(x))`` with an MLP for ``(mu, log sigma)``."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1, hidden),
            nn.ELU(),
            nn.Linear(hidden, hidden),
            nn.ELU(),
            nn.Linear(hidden, 2),
        )

    def condition(self, x: Tensor) -> dist.Distribution:
        loc, log_scale = self.net(x).unbind(-1)
        return dist.Normal(loc.unsqueeze(-1), log_scale.exp().unsqueeze(-1)).to_event(1)


def fit(
    module: nn.Module,
    conditional: object,
    x: Tensor,
    y: Tensor,
    steps: int,
    batch_size: int,
    lr: float,
) -> dict:
    """SVI on the model ``y_i | x_i ~ conditional(x_i)`` with an empty guide (max likelihood)."""

    def model(x: Tensor, y: Tensor) -> None:
        pyro.module("density", module)
        with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
            with poutine.scale(scale=1.0 / len(x)):  # losses read as nats per sample
                pyro.sample("y", conditional.condition(x[idx]), obs=y[idx])

    def guide(x: Tensor, y: Tensor) -> None:
        pass

    pyro.clear_param_store()
    optim = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": lr}, "gamma": 0.1 ** (1 / steps)}
    )
    svi = SVI(model, guide, optim, Trace_ELBO(max_plate_nesting=1))
    wall, cpu = time.perf_counter(), time.process_time()
    losses = []
    for _ in range(steps):
        losses.append(svi.step(x, y))
        optim.step()
    return {
        "train_wall_s": time.perf_counter() - wall,
        "train_cpu_s": time.process_time() - cpu,
        "final_loss": losses[-1],
    }


@torch.no_grad()
def conditional_nll(module: nn.Module, conditional: object, x: Tensor, y: Tensor) -> float:
    module.eval()
    return float(-conditional.condition(x).log_prob(y).mean())


# -- the figure -------------------------------------------------------------------------------
@torch.no_grad()
def plot(flow: object, gaussian: GaussianBaseline, x: Tensor, y: Tensor, path: Path) -> None:
    fig, axes = plt.subplots(1, 1 + len(X_SLICES), figsize=(3.2 * (1 + len(X_SLICES)), 3.3))
    ax = axes[0]
    ax.scatter(x[:1500, 0], y[:1500, 0], s=2, alpha=0.4, color="k", label="data")
    xs = torch.linspace(-2.0, 2.0, 1500).unsqueeze(-1)
    # sampling iterates each block's fixed point (explicit="inverse" makes scoring cheap)
    ys = flow.condition(xs).sample(xs.shape[:1])
    ax.scatter(xs[:, 0], ys[:, 0], s=2, alpha=0.4, color="tab:red", label="flow samples")
    for value in X_SLICES:
        ax.axvline(value, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("data (black), flow samples (red)", fontsize=9)
    grid = torch.linspace(-2.5, 3.2, 400).unsqueeze(-1)
    for ax, value in zip(axes[1:], X_SLICES):
        context = torch.full_like(grid, value)
        ax.plot(grid[:, 0], true_log_density(grid, context)[:, 0].exp(), "k", lw=2, label="true")
        ax.plot(grid[:, 0], flow.condition(context).log_prob(grid).exp(), "tab:red", label="flow")
        ax.plot(
            grid[:, 0],
            gaussian.condition(context).log_prob(grid).exp(),
            "tab:blue",
            ls="--",
            label="Gaussian",
        )
        ax.set_title(f"p(y | x = {value})", fontsize=9)
        ax.set_xlabel("y")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--num-test", type=int, default=5000)
    add_run_arguments(parser, RESULTS)
    args = parser.parse_args()
    outputs = run_outputs(parser, args, RESULTS, "conditional_density.png")
    if args.quick:
        args.steps = 10

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train = sample_data(args.num_train, generator)
    x_test, y_test = sample_data(args.num_test, generator)

    pyro.set_rng_seed(args.seed)
    modules, flow = make_flow(args.num_blocks, args.hidden_dims)
    gaussian = GaussianBaseline()
    results = {}
    for name, module, conditional in [
        ("ResidualFlow", modules, flow),
        ("Gaussian", gaussian, gaussian),
    ]:
        pyro.set_rng_seed(args.seed)
        metrics = fit(module, conditional, x_train, y_train, args.steps, args.batch_size, args.lr)
        metrics["test_nll"] = conditional_nll(module, conditional, x_test, y_test)
        results[name] = metrics
        print(f"{name:12s} test NLL {metrics['test_nll']:.4f}  ({metrics['train_wall_s']:.1f} s)")
    true_nll = float(-true_log_density(y_test, x_test).mean())
    results["True density"] = {"test_nll": true_nll}

    print("\n| model | held-out NLL (nats) | train wall s | train CPU s |")
    print("|---|---|---|---|")
    for name, m in results.items():
        wall = f"{m['train_wall_s']:.1f}" if "train_wall_s" in m else "-"
        cpu = f"{m['train_cpu_s']:.1f}" if "train_cpu_s" in m else "-"
        print(f"| {name} | {m['test_nll']:.4f} | {wall} | {cpu} |")

    if outputs is not None:
        plot(flow, gaussian, x_train, y_train, outputs.figure)
    total = time.perf_counter() - start
    payload = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "results")},
        "data": "x ~ U(-2,2); y|x ~ 0.5 N(sin(1.5x) -/+ 0.3(x+2), 0.12 + 0.06(x+2))",
        "results": results,
        "total_wall_s": total,
        "figure": None if outputs is None else shown(outputs.figure),
    }
    write_results(outputs, payload, total)


if __name__ == "__main__":
    main()
