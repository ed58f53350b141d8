"""``pyro-invres``: fit a flow to a toy density, sample from it, evaluate it.

Subcommands::

    pyro-invres fit [--dataset moons] [--flow iresnet] [--steps N] [--out runs/fit] ...
    pyro-invres sample --checkpoint runs/fit/checkpoint.pt --n 1000 --out samples.pt
    pyro-invres evaluate --checkpoint runs/fit/checkpoint.pt [--dataset moons]

``fit`` writes ``density.png`` (the model density beside the data), ``samples.png``,
``metrics.json`` and ``checkpoint.pt`` under ``--out``. Its defaults train a residual
flow on ``moons`` in under a minute of CPU time (one thread; the 2-D networks are too small
to gain from more).

Errors print one line on stderr (``pyro-invres COMMAND: error: ...``) and exit with
status 1, never a traceback (set ``PYRO_INVRES_TRACEBACK=1`` to see one for an unexpected
error). What the commands promise:

* Every file is written atomically (a temporary file in the same directory, then
  :func:`os.replace`): a full disk or a crash leaves the previous file or none, never a
  0-byte or half-written one.
* ``fit --seed S`` is reproducible bit for bit: everything is seeded before the flow is
  built.
* ``fit`` refuses an ``--out`` that another ``fit`` is writing (a lock file holding its
  pid; the lock of a process that died is taken over), and an ``--out`` that already
  holds a run unless given ``--resume`` (continue it) or ``--overwrite`` (replace it).
* ``fit`` writes ``checkpoint.pt`` and ``metrics.json`` as soon as training ends; if a
  later stage fails (sampling, a plot) the other outputs are still written and the
  failure is reported as the one-line error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .flows import PRESETS

__all__ = ["DEFAULTS", "LOCK_NAME", "CommandError", "flow_options", "main"]

#: The tuned 2-D flow ``fit`` trains by default: :data:`pyro_invres.flows.PRESETS`.
_FIT_PRESET = PRESETS["iresnet-2d"]

#: The ``fit`` defaults: the ``iresnet-2d`` preset's flow options, and a schedule that
#: trains it on ``moons`` in about a minute of one CPU thread. How they were chosen is in
#: the docs (``docs/tradeoffs.md``, "How the pyro-invres fit flow was tuned").
DEFAULTS: dict[str, Any] = {
    "dataset": "moons",
    "flow": "iresnet",
    "steps": 1200,
    "batch_size": 256,
    "lr": 1e-2,
    "lr_final": 0.1,
    "num_blocks": _FIT_PRESET["num_blocks"],
    "hidden": ",".join(str(h) for h in _FIT_PRESET["hidden_dims"]),
    "activation": _FIT_PRESET["activation"],
    # LipSwish's starting sharpness, used only with --activation (c)lipswish
    "beta": 32.0,
    "omega": _FIT_PRESET["activation_kwargs"]["omega"],
    "lipschitz": _FIT_PRESET["lipschitz"],
    "split": _FIT_PRESET["split"],
    "solver": _FIT_PRESET["solver"],
    "n_train": 20_000,
    "n_test": 5_000,
    "threads": 1,
    "seed": 0,
    "out": "runs/fit",
}
_SAMPLE_FORMATS = (".pt", ".npy", ".csv", ".png")
_PROG = "pyro-invres"
#: What ``fit`` writes under ``--out``; any of them there means the directory holds a run.
_RUN_FILES = ("checkpoint.pt", "metrics.json", "density.png", "samples.png")
#: Created with ``O_EXCL`` by ``fit``, holding ``"<pid> <host>"``; removed at the end.
LOCK_NAME = ".pyro-invres.lock"
#: A lock file still empty after this long was left by a process that died creating it.
_EMPTY_LOCK_STALE_S = 10.0


class CommandError(Exception):
    """An error for the user to fix, reported by :func:`main` as one line.

    Example:
        >>> str(CommandError("runs/fit is in use"))
        'runs/fit is in use'
    """


def flow_options(flow: str = DEFAULTS["flow"], **overrides: Any) -> dict[str, Any]:
    """The :func:`~pyro_invres.flows.build_flow` options ``pyro-invres fit`` uses.

    With no overrides and ``flow="iresnet"`` these are the options of the ``iresnet-2d``
    preset (:data:`pyro_invres.flows.PRESETS`): ``build_flow("iresnet-2d", 2)`` builds the
    same flow from Python.

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
    from .flows import FLOWS

    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Invertible residual flows in Pyro: fit, sample, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser(
        "fit",
        help="train a flow on a 2-D toy density and plot it",
        description="Train a flow on a 2-D toy density; write checkpoint.pt, metrics.json, "
        "density.png and samples.png under --out. An --out that already holds a run is "
        "refused: pass --resume to continue it, --overwrite to replace it (its outputs are "
        "deleted first), or another --out. While it runs, OUT/"
        + LOCK_NAME
        + " (holding its pid) makes a second fit into the same --out fail at once.",
    )
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
    existing = fit.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt if it exists (same data set, seed and flow "
        "options; new --steps, --lr, --lr-final, --batch-size are honoured from its step on)",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in OUT (its checkpoint, metrics and plots are deleted)",
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


def _finite_positive(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--{name} must be a positive finite number, got {value}")
    return value


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} requested but there are {count} CUDA devices")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} requested but MPS is not available")
    elif device.type != "cpu":  # meta, xla, ...: no data, or untested here
        raise ValueError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or mps")
    return device


def _write(path: Path, write: Callable[[Any], object]) -> None:
    """Write ``path`` atomically; a failure names the file and leaves no partial file."""
    from .checkpoint import atomic_write

    try:
        atomic_write(path, write)
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        failure = OSError(f"cannot write {path}: {reason}")
        failure.errno = err.errno  # callers may still tell a full disk from the rest
        raise failure from err


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    _write(path, lambda handle: handle.write(text.encode()))


def _save_figure(path: Path, figure: Any) -> None:
    _write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# -- the output directory of fit: a lock, and no silent overwrite -----------------------------
def _lock_holder(path: Path) -> tuple[str, bool]:
    """What a lock file says (``"pid 12 on host h"``), and whether that holder is gone."""
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "a process that just finished", True
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit():
        # empty: its creator may be about to write its pid, unless that was long ago
        return f"an unreadable lock {text[:40]!r}", age > _EMPTY_LOCK_STALE_S
    pid, host = int(parts[0]), parts[1]
    if host != socket.gethostname():
        return f"pid {pid} on host {host}", False  # cannot look there: assume alive
    if pid == os.getpid():
        return f"pid {pid} (this process)", False
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: assume alive
        return f"pid {pid}", False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid}", True
    except OSError:  # PermissionError included: alive, someone else's
        return f"pid {pid}", False
    return f"pid {pid}", False


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """Hold ``out/LOCK_NAME`` for the duration; refuse if a live process holds it."""
    path = out / LOCK_NAME
    token = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder, stale = _lock_holder(path)
            if not stale:
                raise CommandError(
                    f"{out} is in use by another pyro-invres fit ({holder}); wait for it to "
                    f"finish or choose another --out (if no such run is alive, delete {path})"
                ) from None
            _take_over(path)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(token)
        break
    else:
        raise CommandError(f"could not take the lock {path}: other processes keep taking it")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text() == token:
                path.unlink()


def _take_over(path: Path) -> None:
    """Move a stale lock aside atomically; put it back if it changed hands meanwhile."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        before = path.read_text()
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else took it over first: try again
    if aside.read_text() != before:  # a fresh lock was created in between: restore it
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink()


def _existing_run(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into ``out`` unless told how (under the lock)."""
    present = [name for name in _RUN_FILES if (out / name).exists()]
    if not present:
        return
    if overwrite:
        for name in present:
            (out / name).unlink()
        return
    checkpoint = out / "checkpoint.pt"
    if resume and checkpoint.exists():
        return
    what = ", ".join(present)
    if checkpoint.exists():
        raise CommandError(
            f"{out} already holds a run ({what}); pass --resume to continue it, "
            "--overwrite to replace it, or --out DIR for a new run"
        )
    raise CommandError(
        f"{out} holds outputs of another run ({what}) but no checkpoint.pt to resume; pass "
        "--overwrite to replace them, or --out DIR for a new run"
    )


def _check_resume(state: dict[str, Any], flow_config: dict[str, Any], metadata: dict) -> None:
    """Refuse to resume a checkpoint with other data or another flow than it was fitted to."""
    from .train import _as_plain

    config = state["config"]
    saved_meta = dict(config.get("metadata") or {})
    changed = [
        f"--{key.replace('_', '-')} {saved_meta[key]} (now {value})"
        for key, value in metadata.items()
        if key in saved_meta and saved_meta[key] != value
    ]
    saved_flow = dict(config.get("flow") or {})
    new_flow = _as_plain(flow_config)
    changed += [
        f"flow option {key}={saved_flow.get(key)!r} (now {new_flow.get(key)!r})"
        for key in sorted(set(saved_flow) | set(new_flow))
        if saved_flow.get(key) != new_flow.get(key)
    ]
    if changed:
        raise CommandError(
            f"cannot resume: the checkpoint was fitted with {'; '.join(changed)}; pass the "
            "checkpoint's values to resume it, or --overwrite / another --out for a new run"
        )


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
    from .evaluation import make_density

    dim = int(flow.flow_config["input_dim"]) if hasattr(flow, "flow_config") else 2
    density = make_density(flow, (dim,), device)
    flow.eval()
    with torch.no_grad():
        return density.sample((n,))


# -- plots ---------------------------------------------------------------------------------------
def _log_density_grid(
    flow: torch.nn.Module, lim: float, device: torch.device, size: int = 200
) -> Tensor:
    from .evaluation import make_density

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
    _save_figure(path, figure)


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
    _save_figure(path, figure)


# -- subcommands ---------------------------------------------------------------------------------
def _fit(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    try:
        return _fit_with_threads(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a longer-lived process


def _fit_with_threads(args: argparse.Namespace) -> int:
    from .flows import FLOWS

    started = time.perf_counter()
    # every argument is checked before anything touches the disk
    dataset = _toy(args.dataset)
    if args.flow not in FLOWS:
        raise ValueError(f"unknown flow {args.flow!r}; choose from {', '.join(FLOWS)}")
    for name in ("steps", "batch_size", "n_train", "n_test", "threads", "num_blocks"):
        _positive(name.replace("_", "-"), getattr(args, name))
    _positive("checkpoint-every", args.checkpoint_every)
    for name in ("lr", "lr_final", "beta", "omega"):
        _finite_positive(name.replace("_", "-"), getattr(args, name))
    device = _device(args.device)
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
    # the 2-D networks are tiny: one thread is fastest, and never oversubscribes a busy CPU
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; --out names a directory")
    out.mkdir(parents=True, exist_ok=True)
    with _output_lock(out):
        _existing_run(out, args.resume, args.overwrite)
        return _fit_run(args, out, dataset, options, device, started)


def _fit_run(
    args: argparse.Namespace,
    out: Path,
    dataset: str,
    options: dict[str, Any],
    device: torch.device,
    started: float,
) -> int:
    import pyro

    from .checkpoint import load_checkpoint
    from .datasets import sample_toy
    from .evaluation import inverse_iterations
    from .flows import build_flow
    from .train import fit_density

    checkpoint = out / "checkpoint.pt"
    metadata = {"dataset": dataset, "seed": args.seed, "n_train": args.n_train}
    if args.resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        _check_resume(state, {"name": args.flow, "input_dim": 2, **options}, metadata)
        print(_resume_note(state, args, checkpoint))

    # seed every generator before anything random happens, the flow's initial weights
    # included: the same --seed gives the same run, bit for bit
    pyro.set_rng_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train = sample_toy(dataset, args.n_train, generator)
    test = sample_toy(dataset, args.n_test, generator)
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
        checkpoint_path=checkpoint,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        metadata=metadata,
        progress=not args.quiet,
    )

    n_samples = 2000
    metrics: dict[str, Any] = {
        "dataset": dataset,
        "flow": args.flow,
        "train_nll": result.train_nll,
        "test_nll": result.test_nll,
        "final_loss": result.losses[-1] if result.losses else None,
        "wall_time_s": result.wall_time,
        "eval_time_s": result.eval_time,
        "total_time_s": time.perf_counter() - started,
        "inverse_iterations_train": result.inverse_iterations,
        "inverse_iterations_sample": None,
        "sample_n": None,
        "sample_time_s": None,
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
    # the run is kept whatever happens next: checkpoint.pt is written, metrics.json now
    _write_json(out / "metrics.json", metrics)

    failed: dict[str, str] = {}

    def stage(name: str, output: Path | None, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as err:  # reported below; the other stages still run
            failed[name] = _one_line(err)
            if output is not None:  # never leave an older run's file looking like this one's
                output.unlink(missing_ok=True)

    samples: list[Tensor] = []

    def draw() -> None:
        before = inverse_iterations(flow)
        sampling = time.perf_counter()
        torch.manual_seed(args.seed)
        samples.append(_sample(flow, n_samples, device))
        metrics["sample_time_s"] = time.perf_counter() - sampling
        metrics["inverse_iterations_sample"] = inverse_iterations(flow) - before
        metrics["sample_n"] = n_samples

    title = f"test NLL {result.test_nll:.3f}"
    stage("sampling", out / "samples.png", draw)
    stage(
        "density.png",
        out / "density.png",
        lambda: _plot_density(out / "density.png", flow, train[:20_000], title, device),
    )
    if samples:
        stage(
            "samples.png",
            out / "samples.png",
            lambda: _plot_samples(
                out / "samples.png", samples[0], test[:n_samples], f"model samples ({args.flow})"
            ),
        )
    metrics["total_time_s"] = time.perf_counter() - started
    if failed:
        metrics["failed"] = failed
    _write_json(out / "metrics.json", metrics)
    if failed:
        raise CommandError(
            f"training finished and {out}/checkpoint.pt and metrics.json are written, but "
            + "; ".join(f"{name} failed: {why}" for name, why in failed.items())
        )
    print(
        f"{dataset}: train NLL {result.train_nll:.4f}, test NLL {result.test_nll:.4f} nats "
        f"({result.wall_time:.1f} s training); wrote {out}/"
        "{density.png,samples.png,metrics.json,checkpoint.pt}"
    )
    return 0


def _resume_note(state: dict[str, Any], args: argparse.Namespace, checkpoint: Path) -> str:
    """What resuming does, said before it happens."""
    saved = state["config"].get("fit") or {}
    now = {
        "steps": args.steps,
        "lr": args.lr,
        "lr_final": args.lr_final,
        "batch_size": min(args.batch_size, args.n_train),
    }
    changes = [
        f"--{key.replace('_', '-')} {saved[key]} -> {value}"
        for key, value in now.items()
        if key in saved and saved[key] != value
    ]
    note = f"resuming {checkpoint} at step {state['step']}"
    if changes:
        note += (
            f"; from there on {', '.join(changes)} (the learning rate at each step is the "
            "one a run started with these settings would use)"
        )
    return note


def _check_sample_path(path: Path) -> None:
    """Refuse an output the samples could not be written to, before drawing them."""
    suffix = path.suffix.lower()
    if suffix not in _SAMPLE_FORMATS:
        raise ValueError(
            f"cannot write samples to {str(path)!r}: use a file ending in "
            f"{', '.join(_SAMPLE_FORMATS)}"
        )
    if path.is_dir():
        raise CommandError(f"cannot write samples to {str(path)!r}: it is a directory")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write samples to {str(path)!r}: the directory is read-only")


def _save_samples(path: Path, samples: Tensor) -> None:
    _check_sample_path(path)
    suffix = path.suffix.lower()
    array = samples.numpy()
    if suffix == ".pt":
        _write(path, lambda handle: torch.save(samples, handle))
    elif suffix == ".npy":
        import numpy as np

        _write(path, lambda handle: np.save(handle, array))
    elif suffix == ".csv":
        import numpy as np

        header = ",".join(f"x{i}" for i in range(samples.shape[-1]))
        _write(
            path,
            lambda handle: np.savetxt(handle, array, delimiter=",", header=header, comments=""),
        )
    else:
        if samples.shape[-1] != 2:
            raise ValueError(f"a .png plot needs 2-D samples, got dimension {samples.shape[-1]}")
        _plot_samples(path, samples, None, "model samples")


def _sample_cmd(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, load_flow

    _positive("n", args.n)
    device = _device(args.device)
    path = Path(args.out)
    _check_sample_path(path)  # fail before the work
    flow = load_flow(load_checkpoint(args.checkpoint)).to(device)
    torch.manual_seed(args.seed)
    samples = _sample(flow, args.n, device).cpu()
    _save_samples(path, samples)
    print(f"wrote {args.n} samples to {path}")
    return 0


def _evaluate_cmd(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, load_flow
    from .datasets import sample_toy
    from .evaluation import evaluate_nll

    _positive("n", args.n)
    device = _device(args.device)
    state = load_checkpoint(args.checkpoint)  # its structure is checked there
    metadata = state["config"].get("metadata") or {}
    dataset = args.dataset if args.dataset is not None else metadata.get("dataset")
    if dataset is None:
        raise ValueError("the checkpoint does not name its data set: pass --dataset")
    if not isinstance(dataset, str):
        raise ValueError(f"the checkpoint names data set {dataset!r:.80}: pass --dataset")
    dataset = _toy(dataset)
    seed = args.seed
    if seed is None:
        fit_seed = metadata.get("seed", 0)
        if isinstance(fit_seed, bool) or not isinstance(fit_seed, int):
            raise ValueError(f"the checkpoint's seed is {fit_seed!r:.80}: pass --seed")
        seed = fit_seed + 1
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
    from .checkpoint import CheckpointError

    args = _parser().parse_args(argv)
    expected = (CommandError, CheckpointError, ValueError, OSError, ImportError)
    try:
        return _COMMANDS[args.command](args)
    except (*expected, FloatingPointError) as err:
        print(f"{_PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{_PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, or a failure deep in torch: still one line
        if os.environ.get("PYRO_INVRES_TRACEBACK"):
            raise
        print(
            f"{_PROG} {args.command}: error: {type(err).__name__}: {_one_line(err)} "
            "(set PYRO_INVRES_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
