"""``pyro-invres``: fit a flow to a toy density, sample from it, evaluate it.

Subcommands::

    pyro-invres fit [--dataset moons] [--flow iresnet] [--steps N] [--out runs/fit] ...
    pyro-invres sample --checkpoint runs/fit/checkpoint.pt --n 1000 --out samples.pt
    pyro-invres evaluate --checkpoint runs/fit/checkpoint.pt [--dataset moons]

``fit`` writes ``density.png`` (the model density beside the data), ``samples.png``,
``metrics.json`` and ``checkpoint.pt`` under ``--out``. Its defaults train a residual
flow on ``moons`` in under a minute of CPU time (one thread; the 2-D networks are too small
to gain from more).

Errors that are the user's to fix (an unknown data set, a bad path, a corrupted
checkpoint) print one line on stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULTS", "flow_options", "main"]

#: The ``fit`` defaults. Measured on moons (one thread): about 84 s in all, test NLL
#: 2.417 (76 s and 2.408 since the spectral refresh got cheaper and beta = 32; 64 s and
#: 2.406 since the exact log-det uses the Jacobian the network carries forward).
#: Six blocks of [32, 32] beat four of [64, 64] (2.51-2.64) at the same cost; with
#: lr 1e-2 and Lip 0.97 LipSwish edged out ELU (2.47 vs 2.50), while at lr 5e-3 and Lip
#: 0.9 ELU was ahead (2.65 vs 2.73). The learned Lipschitz split took checkerboard from
#: 3.816 to 3.782 and rings from 3.460 to 3.352 (six blocks); a seventh and eighth block
#: gave another 0.01 (checkerboard 3.774, moons 2.417, 8gaussians 2.836). Lip 0.99 and
#: wider blocks ([64, 64], 8 or 12 blocks) were worse on rings (3.53-3.55); 3000 steps
#: instead of 1200 gained 0.02 there, CLipSwish and a third hidden layer ~0.01.
#: Starting LipSwish sharper (beta is learned; it used to start at 1) helps where the
#: density has thin structure: rings 3.33 at beta 1, then 3.26 / 3.24 / 3.22 / 3.19 / 3.19 /
#: 3.28 at beta 4 / 8 / 16 / 32 / 64 / 256; checkerboard 3.77 -> 3.70 (beta 16) and 3.71
#: (64); moons and 8gaussians unchanged (2.40, 2.84 at beta 16). With beta 16, 12 blocks
#: reached 3.15 on rings but take 1.5x the time; lr 2e-2 was worse (3.26 at beta 64).
#: The sine activation (sin(omega x) / omega, omega learned) then beat LipSwish at beta 32
#: everywhere: rings 2.737 (omega 4; 2.738 at 2, 2.729 at 8, 2.729 at 4 with seed 1),
#: checkerboard 3.572 (3.596 at 2, 3.591 at 8, 3.574 seed 1), moons 2.395, 8gaussians
#: 2.841; 12 LipSwish blocks had reached only 3.120 on rings. Sampling inverts each
#: block by Newton's method (the network carries its 2 x 2 Jacobian): median 4
#: evaluations per block solve to 1e-6 on this flow, against 6 (Anderson) and 9 (fixed
#: point), and 3.4 explicit passes of wall time per sampled batch against 4.1 and 4.5
#: (`examples/benchmarks/bench_residual_flow.py`).
DEFAULTS: dict[str, Any] = {
    "dataset": "moons",
    "flow": "iresnet",
    "steps": 1200,
    "batch_size": 256,
    "lr": 1e-2,
    "lr_final": 0.1,
    "num_blocks": 8,
    "hidden": "32,32",
    "activation": "sine",
    "beta": 32.0,
    "omega": 4.0,
    "lipschitz": 0.97,
    "split": "learned",
    "solver": "newton",
    "n_train": 20_000,
    "n_test": 5_000,
    "threads": 1,
    "seed": 0,
    "out": "runs/fit",
}
_SAMPLE_FORMATS = (".pt", ".npy", ".csv", ".png")
_PROG = "pyro-invres"


def flow_options(flow: str = DEFAULTS["flow"], **overrides: Any) -> dict[str, Any]:
    """The :func:`~pyro_invres.train.build_flow` options ``pyro-invres fit`` uses.

    Arguments:
        flow: the flow's name.
        **overrides: ``num_blocks``, ``hidden`` (``"32,32"``), and for ``iresnet``
            ``activation``, ``beta`` (LipSwish), ``omega`` (sine), ``lipschitz``,
            ``split``, ``solver`` (the sampling side's); the rest come from
            :data:`DEFAULTS`.

    Example:
        >>> opts = flow_options()
        >>> opts["hidden_dims"], opts["activation"], opts["activation_kwargs"]
        ([32, 32], 'sine', {'omega': 4.0})
        >>> flow_options(activation="lipswish")["activation_kwargs"]
        {'beta': 32.0}
    """
    keys = ("num_blocks", "hidden", "activation", "beta", "omega", "lipschitz", "split", "solver")
    unknown = sorted(set(overrides) - set(keys))
    if unknown:
        raise TypeError(f"flow_options got unknown options {unknown}")
    o = {k: overrides.get(k, DEFAULTS[k]) for k in keys}
    options: dict[str, Any] = {"num_blocks": o["num_blocks"], "hidden_dims": _hidden(o["hidden"])}
    if flow == "iresnet":
        options["activation"] = o["activation"]
        if o["activation"] in ("lipswish", "clipswish"):
            options["activation_kwargs"] = {"beta": float(o["beta"])}
        elif o["activation"] == "sine":
            options["activation_kwargs"] = {"omega": float(o["omega"])}
        options["lipschitz"] = o["lipschitz"]
        options["split"] = o["split"]
        options["solver"] = o["solver"]
    return options


# -- argument parsing ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from .datasets import TOY_DATASETS
    from .train import FLOWS

    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Invertible residual flows in Pyro: fit, sample, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser("fit", help="train a flow on a 2-D toy density and plot it")
    d = DEFAULTS
    fit.add_argument("--dataset", default=d["dataset"], help=f"one of {', '.join(TOY_DATASETS)}")
    fit.add_argument("--flow", default=d["flow"], help=f"one of {', '.join(FLOWS)}")
    fit.add_argument("--steps", type=int, default=d["steps"], help="optimisation steps")
    fit.add_argument("--batch-size", type=int, default=d["batch_size"])
    fit.add_argument("--lr", type=float, default=d["lr"], help="initial learning rate")
    fit.add_argument(
        "--lr-final", type=float, default=d["lr_final"], help="final lr as a fraction of --lr"
    )
    fit.add_argument("--num-blocks", type=int, default=d["num_blocks"])
    fit.add_argument("--hidden", default=d["hidden"], help="hidden sizes, comma separated")
    fit.add_argument(
        "--activation",
        default=d["activation"],
        help="iresnet only: sine, lipswish, clipswish or elu",
    )
    fit.add_argument(
        "--beta",
        type=float,
        default=d["beta"],
        help="iresnet with (c)lipswish only: the activation's starting sharpness (learned)",
    )
    fit.add_argument(
        "--omega",
        type=float,
        default=d["omega"],
        help="iresnet with sine only: the activation's starting frequency (learned)",
    )
    fit.add_argument(
        "--lipschitz", type=float, default=d["lipschitz"], help="iresnet only: Lip(g) bound"
    )
    fit.add_argument(
        "--split",
        default=d["split"],
        help="iresnet only: share Lip(g) between the layers 'equal'ly or as 'learned' gains",
    )
    fit.add_argument(
        "--solver",
        default=d["solver"],
        help="iresnet only: how sampling inverts a block: newton, anderson or fixed_point",
    )
    fit.add_argument("--n-train", type=int, default=d["n_train"], help="training points")
    fit.add_argument("--n-test", type=int, default=d["n_test"], help="held-out points")
    fit.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    fit.add_argument("--seed", type=int, default=d["seed"])
    fit.add_argument(
        "--threads",
        type=int,
        default=d["threads"],
        help="torch CPU threads (1: the 2-D nets are tiny)",
    )
    fit.add_argument("--out", default=d["out"], help="output directory")
    fit.add_argument("--checkpoint-every", type=int, default=500)
    fit.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists"
    )
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    sample = sub.add_parser("sample", help="draw samples from a checkpoint's flow")
    sample.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by fit")
    sample.add_argument("--n", type=int, default=1000, help="number of samples")
    sample.add_argument("--out", required=True, help=f"output file ({', '.join(_SAMPLE_FORMATS)})")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="cpu")

    evaluate = sub.add_parser("evaluate", help="held-out NLL of a checkpoint's flow")
    evaluate.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by fit")
    evaluate.add_argument(
        "--dataset", default=None, help="toy data set (default: the one it was fitted to)"
    )
    evaluate.add_argument("--n", type=int, default=5000, help="number of fresh points")
    evaluate.add_argument("--seed", type=int, default=None, help="default: the fit's seed + 1")
    evaluate.add_argument("--device", default="cpu")
    return parser


# -- small helpers -------------------------------------------------------------------------------
def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"--{name} must be a positive integer, got {value}")
    return value


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"--hidden takes comma-separated integers, got {text!r}") from err
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"--hidden takes positive comma-separated integers, got {text!r}")
    return sizes


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _toy(name: str) -> str:
    from .datasets import TOY_DATASETS

    if name not in TOY_DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(TOY_DATASETS)}")
    return name


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install matplotlib") from err
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _limit(data: Tensor) -> float:
    """A symmetric plot range that holds nearly all of ``data``."""
    return float(data.abs().flatten().quantile(0.999)) * 1.1 + 0.1


def _sample(flow: torch.nn.Module, n: int, device: torch.device) -> Tensor:
    from .train import make_density

    dim = int(flow.flow_config["input_dim"]) if hasattr(flow, "flow_config") else 2
    density = make_density(flow, (dim,), device)
    flow.eval()
    with torch.no_grad():
        return density.sample((n,))


# -- plots ---------------------------------------------------------------------------------------
def _log_density_grid(
    flow: torch.nn.Module, lim: float, device: torch.device, size: int = 200
) -> Tensor:
    from .train import make_density

    axis = torch.linspace(-lim, lim, size, device=device)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    density = make_density(flow, (2,), device)
    flow.eval()
    with torch.no_grad():
        logp = torch.cat([density.log_prob(chunk) for chunk in grid.split(8192)])
    return logp.reshape(size, size).cpu()


def _plot_density(
    path: Path, flow: torch.nn.Module, data: Tensor, title: str, device: torch.device
) -> None:
    lim = _limit(data)
    logp = _log_density_grid(flow, lim, device)
    figure = _figure(10, 5)
    left, right = figure.subplots(1, 2, sharex=True, sharey=True)
    x = data.cpu()
    left.hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=200, range=[[-lim, lim]] * 2)
    left.set_title("data")
    right.imshow(logp.exp().numpy(), origin="lower", extent=(-lim, lim, -lim, lim), aspect="auto")
    right.set_title(f"model density ({title})")
    for ax in (left, right):
        ax.set_aspect("equal")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    figure.savefig(path, dpi=100)


def _plot_samples(path: Path, samples: Tensor, data: Tensor | None, title: str) -> None:
    panels = [("model samples", samples)] if data is None else [("data", data), (title, samples)]
    figure = _figure(5 * len(panels), 5)
    axes = figure.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    lim = _limit(samples if data is None else data)
    for ax, (name, points) in zip(axes, panels):
        p = points.cpu()[:5000]
        ax.scatter(p[:, 0].numpy(), p[:, 1].numpy(), s=2, alpha=0.4, linewidths=0)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    figure.savefig(path, dpi=100)


# -- subcommands ---------------------------------------------------------------------------------
def _fit(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    try:
        return _fit_with_threads(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a longer-lived process


def _fit_with_threads(args: argparse.Namespace) -> int:
    from .datasets import sample_toy
    from .train import build_flow, fit_density, inverse_iterations

    started = time.perf_counter()
    dataset = _toy(args.dataset)
    for name in ("steps", "batch_size", "n_train", "n_test", "threads", "num_blocks"):
        _positive(name.replace("_", "-"), getattr(args, name))
    device = _device(args.device)
    # the 2-D networks are tiny: one thread is fastest, and never oversubscribes a busy CPU
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    generator = torch.Generator().manual_seed(args.seed)
    train = sample_toy(dataset, args.n_train, generator)
    test = sample_toy(dataset, args.n_test, generator)
    options = flow_options(
        args.flow,
        num_blocks=args.num_blocks,
        hidden=args.hidden,
        activation=args.activation,
        beta=args.beta,
        omega=args.omega,
        lipschitz=args.lipschitz,
        split=args.split,
        solver=args.solver,
    )
    flow = build_flow(args.flow, 2, **options)
    result = fit_density(
        flow,
        train,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_final=args.lr_final,
        seed=args.seed,
        test_data=test,
        device=device,
        checkpoint_path=out / "checkpoint.pt",
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        metadata={"dataset": dataset, "seed": args.seed, "n_train": args.n_train},
        progress=not args.quiet,
    )

    n_samples = 2000
    before = inverse_iterations(flow)
    sampling = time.perf_counter()
    torch.manual_seed(args.seed)
    samples = _sample(flow, n_samples, device)
    sampling = time.perf_counter() - sampling
    title = f"test NLL {result.test_nll:.3f}"
    _plot_density(out / "density.png", flow, train[:20_000], title, device)
    _plot_samples(out / "samples.png", samples, test[:n_samples], f"model samples ({args.flow})")

    metrics = {
        "dataset": dataset,
        "flow": args.flow,
        "train_nll": result.train_nll,
        "test_nll": result.test_nll,
        "final_loss": result.losses[-1] if result.losses else None,
        "wall_time_s": result.wall_time,
        "eval_time_s": result.eval_time,
        "total_time_s": time.perf_counter() - started,
        "inverse_iterations_train": result.inverse_iterations,
        "inverse_iterations_sample": inverse_iterations(flow) - before,
        "sample_n": n_samples,
        "sample_time_s": sampling,
        "steps": result.steps,
        "resumed_from_step": result.start_step,
        "config": result.config,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "device": str(device),
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"{dataset}: train NLL {result.train_nll:.4f}, test NLL {result.test_nll:.4f} nats "
        f"({result.wall_time:.1f} s training); wrote {out}/"
        "{density.png,samples.png,metrics.json,checkpoint.pt}"
    )
    return 0


def _save_samples(path: Path, samples: Tensor) -> None:
    suffix = path.suffix.lower()
    if suffix not in _SAMPLE_FORMATS:
        raise ValueError(
            f"cannot write samples to {str(path)!r}: use a file ending in "
            f"{', '.join(_SAMPLE_FORMATS)}"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {str(path.parent)!r} does not exist")
    if suffix == ".pt":
        torch.save(samples, path)
    elif suffix == ".npy":
        import numpy as np

        np.save(path, samples.numpy())
    elif suffix == ".csv":
        import numpy as np

        header = ",".join(f"x{i}" for i in range(samples.shape[-1]))
        np.savetxt(path, samples.numpy(), delimiter=",", header=header, comments="")
    else:
        if samples.shape[-1] != 2:
            raise ValueError(f"a .png plot needs 2-D samples, got dimension {samples.shape[-1]}")
        _plot_samples(path, samples, None, "model samples")


def _sample_cmd(args: argparse.Namespace) -> int:
    from .train import load_checkpoint, load_flow

    _positive("n", args.n)
    device = _device(args.device)
    path = Path(args.out)
    if path.suffix.lower() not in _SAMPLE_FORMATS:  # fail before the work
        _save_samples(path, torch.zeros(0, 2))
    flow = load_flow(load_checkpoint(args.checkpoint)).to(device)
    torch.manual_seed(args.seed)
    samples = _sample(flow, args.n, device).cpu()
    _save_samples(path, samples)
    print(f"wrote {args.n} samples to {path}")
    return 0


def _evaluate_cmd(args: argparse.Namespace) -> int:
    from .datasets import sample_toy
    from .train import evaluate_nll, load_checkpoint, load_flow

    _positive("n", args.n)
    device = _device(args.device)
    state = load_checkpoint(args.checkpoint)
    metadata = (state.get("config") or {}).get("metadata") or {}
    dataset = args.dataset if args.dataset is not None else metadata.get("dataset")
    if dataset is None:
        raise ValueError("the checkpoint does not name its data set: pass --dataset")
    dataset = _toy(dataset)
    seed = args.seed if args.seed is not None else int(metadata.get("seed", 0)) + 1
    flow = load_flow(state).to(device)
    data = sample_toy(dataset, args.n, seed=seed, device=device)
    nll = evaluate_nll(flow, data)
    report = {"dataset": dataset, "n": args.n, "seed": seed, "nll": nll, "step": state["step"]}
    print(json.dumps(report))
    return 0 if math.isfinite(nll) else 1


_COMMANDS = {"fit": _fit, "sample": _sample_cmd, "evaluate": _evaluate_cmd}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pyro-invres`` command line; returns the exit status.

    Arguments:
        argv: the arguments (default: ``sys.argv[1:]``).

    Example:
        >>> main(["evaluate", "--checkpoint", "/no/such/checkpoint.pt"])
        1
    """
    from .train import CheckpointError

    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (CheckpointError, ValueError, OSError, ImportError, FloatingPointError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{_PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{_PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
