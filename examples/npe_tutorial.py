"""Neural posterior estimation with a simulator written as a Pyro model (docs/npe.md).

The simulator: a box prior on ``theta = (a, b)`` and an observation whose first
coordinate only sees ``a**2``, so the posterior has two modes (``a`` and ``-a``)::

    a, b ~ U(-1, 1)
    x_1 ~ N(a**2, 0.05),   x_2 ~ N(a + b, 0.1)

Simulations come from running the model (``poutine.trace``); a
:class:`~pyro_invres.npe.ConditionalFlow` around
:func:`~pyro_invres.flows.conditional_spline_residual_flow` is trained on them with
:func:`~pyro_invres.npe.fit_conditional`, then sampled for one observation. The reference
posterior is exact: the likelihood is Gaussian and the prior uniform, so the posterior
density is evaluated on a fine grid and sampled from it. The figure puts the flow's draws
beside the reference draws; the JSON records the C2ST between them when ``sbibm`` is
installed (sbibm's classifier two-sample test: 0.5 is a perfect match).

Run::

    python examples/npe_tutorial.py --save     # docs/_static/figures/npe_pairs.png
    python examples/npe_tutorial.py --quick    # a smoke test, writes nothing
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from _common import add_run_arguments, run_outputs, write_results  # noqa: E402
from pyro import poutine  # noqa: E402

from pyro_invres.flows import conditional_spline_residual_flow  # noqa: E402
from pyro_invres.npe import ConditionalFlow, fit_conditional  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "npe_tutorial.json"
NOISE = torch.tensor([0.05, 0.1])
PRIOR = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)
X_OBS = torch.tensor([0.25, 0.3])


def simulator(n: int) -> None:
    """``n`` independent draws of ``(theta, x)``: the Pyro model of the simulation."""
    with pyro.plate("simulations", n):
        theta = pyro.sample("theta", PRIOR)
        loc = torch.stack([theta[..., 0] ** 2, theta[..., 0] + theta[..., 1]], -1)
        pyro.sample("x", dist.Normal(loc, NOISE).to_event(1))


def simulate(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    trace = poutine.trace(simulator).get_trace(n)
    return trace.nodes["theta"]["value"], trace.nodes["x"]["value"]


def reference_posterior(x_o: torch.Tensor, n: int, grid: int = 801) -> torch.Tensor:
    """Exact draws: the posterior density on a grid over the prior's box, then jitter."""
    ticks = torch.linspace(-1.0, 1.0, grid, dtype=torch.float64)
    a, b = torch.meshgrid(ticks, ticks, indexing="ij")
    loc = torch.stack([a**2, a + b], -1)
    log_p = dist.Normal(loc, NOISE.double()).log_prob(x_o.double()).sum(-1)
    cells = torch.multinomial((log_p - log_p.max()).exp().flatten(), n, replacement=True)
    step = float(ticks[1] - ticks[0])
    draws = torch.stack([a.flatten()[cells], b.flatten()[cells]], -1)
    return (draws + step * (torch.rand_like(draws) - 0.5)).clamp(-1, 1).float()


def pair_plot(flow_draws: torch.Tensor, reference: torch.Tensor, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.4), sharex=True, sharey=True)
    for ax, draws, title in zip(
        axes,
        (reference, flow_draws),
        ("reference (exact)", "NPE: conditional spline-residual flow"),
    ):
        ax.hist2d(
            draws[:, 0].numpy(),
            draws[:, 1].numpy(),
            bins=90,
            range=[[-1, 1], [-1, 1]],
            cmap="Blues",
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("a")
    axes[0].set_ylabel("b")
    fig.suptitle(f"posterior given x_o = ({X_OBS[0]:.2f}, {X_OBS[1]:.2f})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulations", type=int, default=3000)
    parser.add_argument("--max-epochs", type=int, default=200)
    add_run_arguments(parser, RESULTS)
    args = parser.parse_args()
    outputs = run_outputs(parser, args, RESULTS, "npe_pairs.png")
    if args.quick:
        args.simulations, args.max_epochs = 500, 3
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pyro.set_rng_seed(args.seed)

    theta, x = simulate(args.simulations)
    flow = ConditionalFlow(conditional_spline_residual_flow(2, 2), 2, 2, support=PRIOR.support)
    fit = fit_conditional(flow, theta, x, max_epochs=args.max_epochs, progress=False)
    with torch.no_grad():
        draws = flow.condition(X_OBS).sample((10_000,))
    reference = reference_posterior(X_OBS, 10_000)

    summary = {
        "simulations": args.simulations,
        **fit.summary(),
        "config": None,
        "flow_mean": draws.mean(0).tolist(),
        "reference_mean": reference.mean(0).tolist(),
        "share_a_positive": {
            "flow": float((draws[:, 0] > 0).float().mean()),
            "reference": float((reference[:, 0] > 0).float().mean()),
        },
    }
    try:
        from sbibm.metrics import c2st

        summary["c2st"] = float(c2st(draws[:2000], reference[:2000]))
    except ImportError:
        summary["c2st"] = None
    for key, value in summary.items():
        print(f"{key}: {value}")
    if outputs is not None:
        pair_plot(draws, reference, outputs.figure)
    write_results(outputs, summary, time.perf_counter() - started)


if __name__ == "__main__":
    main()
