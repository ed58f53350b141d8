"""``pyro-invres``: fit a flow to a toy density or to your data, sample from it, evaluate it.

Subcommands::

    pyro-invres fit [--dataset moons | --data FILE] [--flow iresnet] [--steps N] [--out runs/fit]
    pyro-invres sample --checkpoint runs/fit/checkpoint.pt --n 1000 --out samples.npy
    pyro-invres evaluate --checkpoint runs/fit/checkpoint.pt [--dataset NAME | --data FILE]

``fit`` writes ``checkpoint.pt``, ``metrics.json``, ``density.png`` (the model density
beside the data; a pair plot of samples over data when the data have more than two
columns), ``samples.png`` and ``loss.png`` under ``--out``. Its defaults train a residual
flow on ``moons`` in under a minute of CPU time (one thread; the 2-D networks are too small
to gain from more).

``--data FILE`` reads an ``N x D`` table (``.npy``, ``.csv`` with an optional header row,
or a ``.pt`` tensor; :mod:`pyro_invres.data_files`), holds out ``--test-fraction`` of the
rows (chosen by ``--test-seed``), and standardises every column with the training rows'
mean and standard deviation. Those statistics are stored in the checkpoint: ``sample``
returns data units, and ``evaluate`` and ``metrics.json`` report NLL in data units
(the standardised NLL plus ``sum(log std)``).

Errors print one line on stderr (``pyro-invres COMMAND: error: ...``) and exit with
status 1, never a traceback (set ``PYRO_INVRES_TRACEBACK=1`` to see one for an unexpected
error); a mistyped or abbreviated option is argparse's usage error (status 2). What the
commands promise:

* Every option is checked (the data file read, the flow built once) before ``fit``
  creates or touches ``--out``: a refused command leaves no directory behind.
* An option that cannot apply is refused, not ignored (``--beta`` without a LipSwish
  activation, ``--n-train`` with ``--data``); one that is reduced says so
  (``--batch-size`` above the number of training rows).
* Every file is written atomically (a temporary file in the same directory, then
  :func:`os.replace`): a full disk or a crash leaves the previous file or none, never a
  0-byte or half-written one.
* ``fit --seed S`` is reproducible bit for bit: everything is seeded before the flow is
  built.
* ``fit`` refuses an ``--out`` that another ``fit`` is writing (a lock file holding its
  pid; the lock of a process that died is taken over), and an ``--out`` that already
  holds a run unless given ``--resume`` (continue it) or ``--overwrite`` / ``--force``
  (replace it).
* ``fit`` writes ``checkpoint.pt`` and ``metrics.json`` as soon as training ends; if a
  later stage fails (sampling, a plot) the other outputs are still written and the
  failure is reported as the one-line error.
* ``pyro-invres --help`` imports neither torch, Pyro nor matplotlib: the commands import
  them when they run.
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only when a command runs: --help stays fast
    import torch
    from torch import Tensor

    from .data_files import Standardization

__all__ = ["DEFAULTS", "LOCK_NAME", "CommandError", "flow_options", "main"]

# The vocabularies of the choice options, written out so that building the parser imports
# no torch; tests/test_cli_data.py checks each against the registry it mirrors
# (flows.FLOWS, datasets.TOY_DATASETS, nn.activations.ACTIVATIONS, nn.lipschitz_mlp.SPLITS,
# ops.fixed_point.SolverName).
_FLOWS = ("iresnet", "revnet", "additive", "affine", "pyro-affine")
_TOY_DATASETS = (
    "8gaussians",
    "checkerboard",
    "2spirals",
    "moons",
    "rings",
    "pinwheel",
    "circles",
    "swissroll",
)
_ACTIVATIONS = ("sine", "lipswish", "clipswish", "elu", "relu")
_SPLITS = ("equal", "learned")
_SOLVERS = ("newton", "anderson", "fixed_point", "secant")
_DATA_SUFFIXES = (".npy", ".csv", ".pt")  # data_files.DATA_SUFFIXES

#: The ``fit`` defaults: the ``iresnet-2d`` preset's flow options
#: (:data:`pyro_invres.flows.PRESETS`) and :func:`~pyro_invres.train.fit_density`'s
#: schedule (:data:`pyro_invres.train.FIT_DEFAULTS`), written out here so that ``--help``
#: needs no torch (tests/test_cli_data.py keeps them equal); it trains the flow on
#: ``moons`` in about a minute of one CPU thread. How they were chosen is in the docs
#: (``docs/tradeoffs.md``, "How the pyro-invres fit flow was tuned").
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
    # LipSwish's starting sharpness, used only with --activation (c)lipswish
    "beta": 32.0,
    "omega": 4.0,
    "lipschitz": 0.97,
    "split": "learned",
    "solver": "newton",
    "n_train": 20_000,
    "n_test": 5_000,
    "test_fraction": 0.2,
    "test_seed": 0,
    "threads": 1,
    "seed": 0,
    "out": "runs/fit",
    "checkpoint_every": 500,
    "eval_every": 100,
    "evaluate_n": 5_000,
}
#: Fewer training rows than this are refused: the fit and its held-out NLL would mean nothing.
_MIN_TRAIN_ROWS = 10
_SAMPLE_FORMATS = (".pt", ".npy", ".csv", ".png")
_PROG = "pyro-invres"
#: What ``fit`` writes under ``--out``; any of them there means the directory holds a run.
_RUN_FILES = ("checkpoint.pt", "metrics.json", "density.png", "samples.png", "loss.png")
#: Created with ``O_EXCL`` by ``fit``, holding ``"<pid> <host>"``; removed at the end.
LOCK_NAME = ".pyro-invres.lock"
#: A lock file still empty after this long was left by a process that died creating it.
_EMPTY_LOCK_STALE_S = 10.0
#: Options of the i-ResNet only, and of the activations they belong to.
_IRESNET_ONLY = ("activation", "beta", "omega", "lipschitz", "split", "solver")


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
            :data:`DEFAULTS`. ``None`` means the default.

    Example:
        >>> opts = flow_options()
        >>> opts["hidden_dims"], opts["activation"], opts["activation_kwargs"]
        ([32, 32], 'sine', {'omega': 4.0})
        >>> flow_options(activation="lipswish")["activation_kwargs"]
        {'beta': 32.0}
    """
    keys = ("num_blocks", "hidden", *_IRESNET_ONLY)
    unknown = sorted(set(overrides) - set(keys))
    if unknown:
        raise TypeError(f"flow_options got unknown options {unknown}")
    o = {k: DEFAULTS[k] if overrides.get(k) is None else overrides[k] for k in keys}
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
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where there is one to show: not for flags, not for ``None``
    (those options say in their help what happens without them)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS:
            return text
        if "%(default)" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the option, what was wrong, where to read
    more) instead of the whole usage text above it; the exit status stays 2."""

    #: The subcommands' parsers, by name (on the top-level parser).
    commands: dict[str, _Parser]

    def error(self, message: str) -> None:  # type: ignore[override]
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see '{self.prog} --help')\n")

    def refuse_unknown(self, extra: Sequence[str]) -> None:
        """Report options this command does not know, naming those a prefix would have
        matched (no option is ever abbreviated)."""
        known = [s for action in self._actions for s in action.option_strings]
        unknown = [token.split("=")[0] for token in extra if token.startswith("--")]
        meant = sorted({k for token in unknown for k in known if k.startswith(token)})
        hint = (
            f"; options are never abbreviated: did you mean {' or '.join(meant)}?" if meant else ""
        )
        self.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


class _VersionAction(argparse.Action):
    """``--version``: the package and the versions of what it runs on, found without
    importing them (from the installed distributions' metadata)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(_version_text())
        parser.exit()


def _version_text() -> str:
    from importlib import metadata

    from . import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    peers = ", ".join(f"{name} {installed(name)}" for name in ("torch", "pyro-ppl"))
    return f"{_PROG} {__version__} ({peers}, Python {platform.python_version()})"


def _parser() -> argparse.ArgumentParser:
    """The command line; building it imports nothing heavy (no torch, Pyro, matplotlib)."""
    common = {"formatter_class": _HelpFormatter, "allow_abbrev": False}
    parser = _Parser(
        prog=_PROG,
        description="Invertible residual flows in Pyro: fit, sample, evaluate.",
        epilog="Run 'pyro-invres COMMAND --help' for a command's options.",
        **common,
    )
    parser.add_argument("--version", action=_VersionAction, help="print versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {
        "fit": _fit_parser(sub, common),
        "sample": _sample_parser(sub, common),
        "evaluate": _evaluate_parser(sub, common),
    }
    return parser


def _fit_parser(sub: Any, common: dict[str, Any]) -> _Parser:
    d = DEFAULTS
    fit = sub.add_parser(
        "fit",
        help="train a flow on a toy density or a data file and plot it",
        description="Train a flow on a 2-D toy density (--dataset) or on your own N x D table "
        "(--data); write checkpoint.pt, metrics.json, density.png, samples.png and loss.png "
        "under --out. An --out that already holds a run is refused: pass --resume to "
        "continue it, --overwrite (or --force) to replace it (its outputs are deleted "
        "first), or another --out. While it runs, OUT/"
        + LOCK_NAME
        + " (holding its pid) makes a second fit into the same --out fail at once.",
        **common,
    )
    data = fit.add_argument_group("data (one of --dataset, --data)")
    source = data.add_mutually_exclusive_group()
    source.add_argument(
        "--dataset",
        choices=_TOY_DATASETS,
        default=None,
        help=f"a 2-D toy density (default: {d['dataset']} when --data is not given)",
    )
    source.add_argument(
        "--data",
        metavar="FILE",
        default=None,
        help="your data: an N x D table in a .npy, .csv (a header row allowed) or .pt (a "
        "tensor) file, one sample per row; columns are standardised with the training "
        "rows' mean and std (stored in the checkpoint: samples and NLL come in data units)",
    )
    data.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help=f"--data only: share of rows held out for the test NLL "
        f"(default: {d['test_fraction']})",
    )
    data.add_argument(
        "--test-seed",
        type=int,
        default=None,
        help="--data only: seed of the random held-out split, apart from --seed so runs "
        f"with other seeds score the same rows (default: {d['test_seed']})",
    )
    data.add_argument(
        "--n-train",
        type=int,
        default=None,
        help=f"--dataset only: training points drawn (default: {d['n_train']})",
    )
    data.add_argument(
        "--n-test",
        type=int,
        default=None,
        help=f"--dataset only: held-out points drawn (default: {d['n_test']})",
    )

    train = fit.add_argument_group("training")
    train.add_argument("--steps", type=int, default=d["steps"], help="optimisation steps")
    train.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        help="rows per step (reduced, with a note, to the number of training rows)",
    )
    train.add_argument("--lr", type=float, default=d["lr"], help="initial learning rate")
    train.add_argument(
        "--lr-final",
        type=float,
        default=d["lr_final"],
        help="final learning rate as a fraction of --lr (geometric decay)",
    )
    train.add_argument("--seed", type=int, default=d["seed"], help="seeds every generator")
    train.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    train.add_argument(
        "--threads",
        type=int,
        default=d["threads"],
        help="torch CPU threads (the small networks gain nothing from more)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=d["checkpoint_every"],
        help="steps between checkpoints",
    )
    train.add_argument(
        "--eval-every",
        type=int,
        default=d["eval_every"],
        help="steps between scores of the held-out data (loss.png, metrics.json)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    flow = fit.add_argument_group("flow")
    flow.add_argument("--flow", choices=_FLOWS, default=d["flow"], help="the kind of flow")
    flow.add_argument("--num-blocks", type=int, default=d["num_blocks"], help="blocks")
    flow.add_argument(
        "--hidden", default=d["hidden"], help="hidden layer sizes of each block, comma separated"
    )
    flow.add_argument(
        "--activation",
        choices=_ACTIVATIONS,
        default=None,
        help=f"iresnet only: the residual branch's activation (default: {d['activation']})",
    )
    flow.add_argument(
        "--beta",
        type=float,
        default=None,
        help="iresnet with --activation lipswish or clipswish only: the activation's "
        f"starting sharpness, learned (default: {d['beta']})",
    )
    flow.add_argument(
        "--omega",
        type=float,
        default=None,
        help="iresnet with --activation sine only: the activation's starting frequency, "
        f"learned (default: {d['omega']})",
    )
    flow.add_argument(
        "--lipschitz",
        type=float,
        default=None,
        help=f"iresnet only: the bound Lip(g) < 1 of each residual branch "
        f"(default: {d['lipschitz']})",
    )
    flow.add_argument(
        "--split",
        choices=_SPLITS,
        default=None,
        help="iresnet only: share Lip(g) between the layers equally or as learned gains "
        f"(default: {d['split']})",
    )
    flow.add_argument(
        "--solver",
        choices=_SOLVERS,
        default=None,
        help=f"iresnet only: how sampling inverts a block (default: {d['solver']})",
    )

    output = fit.add_argument_group("output")
    output.add_argument("--out", default=d["out"], help="output directory")
    output.add_argument(
        "--log-density",
        action="store_true",
        help="plot the model's log-density instead of its density (shows the tails)",
    )
    existing = output.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt if it exists (same data, seed and flow "
        "options; new --steps, --lr, --lr-final, --batch-size are honoured from its step on)",
    )
    existing.add_argument(
        "--overwrite",
        "--force",
        dest="overwrite",
        action="store_true",
        help="replace the run already in OUT (its checkpoint, metrics and plots are deleted)",
    )
    return fit


def _sample_parser(sub: Any, common: dict[str, Any]) -> _Parser:
    sample = sub.add_parser(
        "sample",
        help="draw samples from a checkpoint's flow",
        description="Draw samples from the flow in a checkpoint written by fit, in the units "
        "of the data it was fitted to.",
        **common,
    )
    sample.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by fit")
    sample.add_argument("--n", type=int, default=1000, help="number of samples")
    sample.add_argument(
        "--out",
        required=True,
        help=f"output file, by its suffix: {', '.join(_SAMPLE_FORMATS)} (.png: a scatter "
        "plot, or a pair plot above two dimensions)",
    )
    sample.add_argument("--seed", type=int, default=0, help="seeds the draw")
    sample.add_argument("--force", action="store_true", help="replace an existing --out file")
    sample.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    _threads_option(sample)
    return sample


def _threads_option(parser: Any) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULTS["threads"],
        help="torch CPU threads (the small networks gain nothing from more)",
    )


def _with_threads(command: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Run a command with ``--threads`` torch threads, restoring the setting after it."""

    def run(args: argparse.Namespace) -> int:
        import torch

        _positive("threads", args.threads)
        before = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            return command(args)
        finally:
            torch.set_num_threads(before)  # main() may run inside a longer-lived process

    run.__name__ = command.__name__
    run.__doc__ = command.__doc__
    return run


def _evaluate_parser(sub: Any, common: dict[str, Any]) -> _Parser:
    evaluate = sub.add_parser(
        "evaluate",
        help="held-out NLL of a checkpoint's flow",
        description="Print the mean negative log-likelihood (nats per sample, in data units) "
        "of data under the flow in a checkpoint, as one JSON line. Without --dataset or "
        "--data it scores what the fit held out: fresh points of its toy density, or the "
        "held-out rows of its data file.",
        **common,
    )
    evaluate.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by fit")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument(
        "--dataset",
        choices=_TOY_DATASETS,
        default=None,
        help="score fresh points of this toy density (default: the fit's own data)",
    )
    source.add_argument(
        "--data",
        metavar="FILE",
        default=None,
        help="score the rows of this .npy/.csv/.pt table (only the held-out rows when it is "
        "the file the checkpoint was fitted to)",
    )
    evaluate.add_argument(
        "--n",
        type=int,
        default=None,
        help=f"toy data sets only: number of fresh points (default: {DEFAULTS['evaluate_n']})",
    )
    evaluate.add_argument(
        "--seed",
        type=int,
        default=None,
        help="toy data sets only: seed of the fresh points (default: the fit's seed + 1)",
    )
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    _threads_option(evaluate)
    return evaluate


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


def _fraction(name: str, value: float) -> float:
    if not (math.isfinite(value) and 0 < value < 1):
        raise ValueError(f"--{name} must be a number between 0 and 1 (exclusive), got {value}")
    return value


def _device(name: str) -> torch.device:
    import torch

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


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _note(command: str, text: str) -> None:
    """Tell the user about something done on their behalf (an option reduced, say)."""
    print(f"{_PROG} {command}: note: {text}", file=sys.stderr)


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
            "--overwrite (or --force) to replace it, or --out DIR for a new run"
        )
    raise CommandError(
        f"{out} holds outputs of another run ({what}) but no checkpoint.pt to resume; pass "
        "--overwrite (or --force) to replace them, or --out DIR for a new run"
    )


def _data_source(metadata: dict[str, Any]) -> str:
    if metadata.get("dataset"):
        return f"--dataset {metadata['dataset']}"
    if metadata.get("data"):
        return f"--data {metadata['data']}"
    return "no recorded data"


def _check_resume(state: dict[str, Any], flow_config: dict[str, Any], metadata: dict) -> None:
    """Refuse to resume a checkpoint with other data or another flow than it was fitted to.

    One line names what differs, as the options that would make it match: another
    ``--flow`` is named alone (its every option differs too), never as state-dict keys.
    """
    from .train import _as_plain

    config = state["config"]
    saved_meta = dict(config.get("metadata") or {})
    before, now = _data_source(saved_meta), _data_source(metadata)
    changed = []
    if before.split()[0] != now.split()[0] or (
        metadata.get("dataset") and saved_meta.get("dataset") != metadata.get("dataset")
    ):
        changed.append(f"{before} (now {now})")
    elif metadata.get("data") and saved_meta.get("data_sha256") != metadata.get("data_sha256"):
        # the same content under another path is the same data; other content is not
        changed.append(f"{before} (now {now}, whose content differs)")
    keys = (
        ("seed", "n_train") if metadata.get("dataset") else ("seed", "test_fraction", "test_seed")
    )
    changed += [
        f"--{key.replace('_', '-')} {saved_meta[key]} (now {metadata[key]})"
        for key in keys
        if key in saved_meta and key in metadata and saved_meta[key] != metadata[key]
    ]
    saved_flow = dict(config.get("flow") or {})
    new_flow = _as_plain(flow_config)
    if saved_flow.get("name") != new_flow.get("name"):
        changed.append(f"--flow {saved_flow.get('name')} (now {new_flow.get('name')})")
    elif saved_flow.get("input_dim") != new_flow.get("input_dim"):
        changed.append(
            f"data of {saved_flow.get('input_dim')} columns (now {new_flow.get('input_dim')})"
        )
    else:
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


def _sample(flow: torch.nn.Module, n: int, device: torch.device) -> Tensor:
    """``n`` draws of the flow's density (in the units the flow was fitted in)."""
    import torch

    from .evaluation import make_density

    dim = int(flow.flow_config["input_dim"]) if hasattr(flow, "flow_config") else 2
    density = make_density(flow, (dim,), device)
    flow.eval()
    with torch.no_grad():
        return density.sample((n,))


# -- the data a run fits -------------------------------------------------------------------------
class _RunData:
    """What ``fit`` trains on and scores, how the checkpoint records it, and its units.

    ``train``/``test`` are what the flow sees (float32; standardised for a data file);
    ``raw_train``/``raw_test`` are the same rows in data units, for the plots.
    """

    def __init__(
        self,
        label: str,
        raw_train: Tensor,
        raw_test: Tensor,
        metadata: dict[str, Any],
        scale: Standardization | None,
        columns: list[str],
    ) -> None:
        self.label = label
        self.raw_train, self.raw_test = raw_train, raw_test
        self.metadata = metadata
        self.scale = scale
        self.columns = columns
        encode = scale.encode if scale is not None else (lambda x: x)
        self.train = encode(raw_train).float()
        self.test = encode(raw_test).float()

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])

    @property
    def log_scale(self) -> float:
        """What turns a standardised NLL into one in data units (0 without standardising)."""
        return 0.0 if self.scale is None else self.scale.log_scale


def _toy_data(args: argparse.Namespace) -> _RunData:
    import torch

    from .datasets import sample_toy

    name = args.dataset or DEFAULTS["dataset"]
    n_train = _positive("n-train", DEFAULTS["n_train"] if args.n_train is None else args.n_train)
    n_test = _positive("n-test", DEFAULTS["n_test"] if args.n_test is None else args.n_test)
    generator = torch.Generator().manual_seed(args.seed)
    train = sample_toy(name, n_train, generator)
    test = sample_toy(name, n_test, generator)
    metadata = {"dataset": name, "seed": args.seed, "n_train": n_train}
    return _RunData(name, train, test, metadata, None, ["x1", "x2"])


def _file_data(args: argparse.Namespace) -> _RunData:
    from .data_files import Standardization, load_data, split_data

    fraction = _fraction(
        "test-fraction",
        DEFAULTS["test_fraction"] if args.test_fraction is None else args.test_fraction,
    )
    seed = DEFAULTS["test_seed"] if args.test_seed is None else args.test_seed
    table = load_data(args.data)
    try:
        train, test = split_data(table.data, fraction, seed)
    except ValueError as err:
        raise ValueError(f"{table.path}: {err}") from None
    if len(train) < _MIN_TRAIN_ROWS:
        # a flow fitted to a handful of rows reports a held-out NLL that means nothing
        raise ValueError(
            f"{table.path}: {len(train)} training rows (of {len(table.data)}, holding out "
            f"{fraction:g}) are too few to fit a density; give at least {_MIN_TRAIN_ROWS}"
        )
    try:
        scale = Standardization.from_data(train)
    except ValueError as err:
        raise ValueError(f"{table.path}: in the training rows, {err}") from None
    metadata = {
        "data": str(table.path.resolve()),
        "data_sha256": table.sha256,
        "columns": table.columns,
        "named_columns": table.has_header,
        "rows": len(table.data),
        "test_fraction": fraction,
        "test_seed": seed,
        "seed": args.seed,
        "n_train": len(train),
        "standardization": scale.to_dict(),
    }
    return _RunData(str(args.data), train, test, metadata, scale, table.columns)


# -- plots ---------------------------------------------------------------------------------------
def _save_figure(path: Path, figure: Any) -> None:
    _write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))


def _in_data_units(flow: torch.nn.Module, scale: Standardization | None) -> torch.nn.Module:
    return flow if scale is None else scale.wrap(flow)


def _plot_density(
    path: Path,
    flow: torch.nn.Module,
    data: _RunData,
    samples: Tensor | None,
    title: str,
    log_density: bool,
) -> None:
    """``density.png``: the model density beside the data in 2-D; in 1-D, its curve over
    the data's histogram; above 2-D, a pair plot of samples over the data."""
    from .plotting import density_figure, pair_figure

    if data.dim == 2:
        figure = density_figure(
            _in_data_units(flow, data.scale),
            data.raw_train[:20_000],
            title=title,
            log_density=log_density,
            labels=data.columns,
        )
    elif data.dim == 1:
        figure = _density_1d_figure(flow, data, title, log_density)
    else:
        if samples is None:
            raise ValueError("no samples to draw (sampling failed)")
        figure = pair_figure(samples, data.raw_train, labels=data.columns, title=title)
    _save_figure(path, figure)


def _density_1d_figure(flow: torch.nn.Module, data: _RunData, title: str, log_density: bool) -> Any:
    import numpy as np
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .evaluation import make_density

    x = data.raw_train[:, 0].double().numpy()
    lo, hi = np.quantile(x, [0.0005, 0.9995])
    lo, hi = lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)
    grid = torch.linspace(float(lo), float(hi), 400, dtype=torch.float64)
    density = make_density(_in_data_units(flow, data.scale), (1,))
    flow.eval()
    with torch.no_grad():
        logp = density.log_prob(grid.float().unsqueeze(1)).double().numpy()
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.hist(x, bins=80, range=(lo, hi), density=True, color="0.7", label="data")
    ax.plot(grid.numpy(), logp if log_density else np.exp(logp), color="C1", label="model")
    if log_density:  # the tails fall without bound: show the top 12 nats
        ax.set_ylim(logp.max() - 12, logp.max() + 1)
    ax.set_xlabel(data.columns[0])
    ax.set_ylabel("log density" if log_density else "density")
    ax.legend()
    ax.set_title(title)
    return figure


def _plot_samples(
    path: Path,
    samples: Tensor,
    data: Tensor | None,
    title: str,
    columns: Sequence[str] | None = None,
) -> None:
    from .plotting import pair_figure, samples_figure

    dim = samples.shape[-1]
    if dim == 2:
        figure = samples_figure(samples, data, title=title, labels=columns)
    elif dim > 2:
        figure = pair_figure(samples, data, title=title, labels=columns)
    else:
        raise ValueError(f"a .png plot needs samples of 2 or more dimensions, got {dim}")
    _save_figure(path, figure)


def _plot_loss(path: Path, history: dict[str, Any], title: str) -> None:
    from .plotting import loss_figure

    _save_figure(path, loss_figure(history, title=title))


# -- subcommands ---------------------------------------------------------------------------------
def _fit(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _fit_with_threads(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a longer-lived process


def _check_fit_options(args: argparse.Namespace) -> None:
    """Every option on its own and together, before any work; the data come next."""
    for name in ("steps", "batch_size", "threads", "num_blocks", "checkpoint_every"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.eval_every is not None:
        _positive("eval-every", args.eval_every)
    for name in ("lr", "lr_final"):
        _finite_positive(name.replace("_", "-"), getattr(args, name))
    unused = (
        [("n_train", "--dataset"), ("n_test", "--dataset")]
        if args.data is not None
        else [("test_fraction", "--data"), ("test_seed", "--data")]
    )
    for name, owner in unused:
        if getattr(args, name) is not None:
            what = (
                "a --data file is split by --test-fraction"
                if owner == "--dataset"
                else ("a toy data set draws --n-train and --n-test fresh points")
            )
            raise ValueError(f"--{name.replace('_', '-')} applies to {owner} only ({what})")
    if args.flow != "iresnet":
        given = [name for name in _IRESNET_ONLY if getattr(args, name) is not None]
        if given:
            raise ValueError(
                f"--{given[0]} applies to --flow iresnet only (got --flow {args.flow})"
            )
    activation = args.activation or DEFAULTS["activation"]
    if args.beta is not None and activation not in ("lipswish", "clipswish"):
        raise ValueError(
            f"--beta applies to --activation lipswish or clipswish (the activation is {activation})"
        )
    if args.omega is not None and activation != "sine":
        raise ValueError(f"--omega applies to --activation sine (the activation is {activation})")
    for name in ("beta", "omega"):
        if getattr(args, name) is not None:
            _finite_positive(name, getattr(args, name))
    if args.lipschitz is not None:
        _fraction("lipschitz", args.lipschitz)
    _hidden(args.hidden)


def _check_flow_builds(name: str, dim: int, options: dict[str, Any]) -> None:
    """Build the flow once, with the random streams put back: an option the flow refuses
    is reported before ``--out`` exists."""
    import torch

    from .flows import build_flow

    with torch.random.fork_rng(devices=[]):
        try:
            build_flow(name, dim, **options)
        except ValueError as err:
            raise ValueError(f"--flow {name} on {dim}-D data: {_one_line(err)}") from None


def _fit_with_threads(args: argparse.Namespace) -> int:
    import torch

    started = time.perf_counter()
    # every option is checked, the data read and the flow built once, before anything
    # touches the disk: a refused command leaves no --out behind
    _check_fit_options(args)
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
    data = _file_data(args) if args.data is not None else _toy_data(args)
    _check_flow_builds(args.flow, data.dim, options)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; --out names a directory")
    # the small networks are fastest on one thread, which never oversubscribes a busy CPU
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    with _output_lock(out):
        _existing_run(out, args.resume, args.overwrite)
        return _fit_run(args, out, data, options, device, started)


def _fit_run(
    args: argparse.Namespace,
    out: Path,
    data: _RunData,
    options: dict[str, Any],
    device: torch.device,
    started: float,
) -> int:
    import pyro
    import torch

    from .checkpoint import load_checkpoint
    from .evaluation import inverse_iterations
    from .flows import build_flow
    from .train import fit_density

    if args.batch_size > len(data.train):
        _note(
            "fit",
            f"--batch-size {args.batch_size} is more than the {len(data.train)} training rows: "
            f"each step uses all {len(data.train)}",
        )
    checkpoint = out / "checkpoint.pt"
    if args.resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        _check_resume(state, {"name": args.flow, "input_dim": data.dim, **options}, data.metadata)
        print(_resume_note(state, args, checkpoint, len(data.train)))

    # seed every generator before anything random happens, the flow's initial weights
    # included: the same --seed gives the same run, bit for bit
    pyro.set_rng_seed(args.seed)
    flow = build_flow(args.flow, data.dim, **options)
    result = fit_density(
        flow,
        data.train,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_final=args.lr_final,
        seed=args.seed,
        test_data=data.test,
        device=device,
        checkpoint_path=checkpoint,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        metadata=data.metadata,
        eval_every=args.eval_every,
        progress=not args.quiet,
    )

    shift = data.log_scale
    history = {
        "units": "data",  # losses of a standardised fit are shifted back by sum(log std)
        "step": result.history.get("step", []),
        "loss": [v + shift for v in result.history.get("loss", [])],
        "eval_step": result.history.get("eval_step", []),
        "eval_nll": [v + shift for v in result.history.get("eval_nll", [])],
    }
    n_samples = 2000
    metrics: dict[str, Any] = {
        "dataset": data.metadata.get("dataset"),
        "data": data.metadata.get("data"),
        "flow": args.flow,
        "dim": data.dim,
        "train_nll": result.train_nll + shift,
        "test_nll": result.test_nll + shift,
        "final_loss": result.losses[-1] + shift if result.losses else None,
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
        "history": history,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "device": str(device),
        },
    }
    if data.scale is not None:
        # what the flow itself scores, on the standardised columns
        metrics["standardized"] = {
            "train_nll": result.train_nll,
            "test_nll": result.test_nll,
            "final_loss": result.losses[-1] if result.losses else None,
            "log_scale": shift,
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
        drawn = _sample(flow, n_samples, device).cpu()
        samples.append(drawn if data.scale is None else data.scale.decode(drawn))
        metrics["sample_time_s"] = time.perf_counter() - sampling
        metrics["inverse_iterations_sample"] = inverse_iterations(flow) - before
        metrics["sample_n"] = n_samples

    title = f"{args.flow} on {Path(data.label).name}: test NLL {metrics['test_nll']:.3f}"
    stage("sampling", out / "samples.png", draw)
    stage(
        "density.png",
        out / "density.png",
        lambda: _plot_density(
            out / "density.png",
            flow,
            data,
            samples[0] if samples else None,
            title,
            args.log_density,
        ),
    )
    if samples and data.dim >= 2:
        stage(
            "samples.png",
            out / "samples.png",
            lambda: _plot_samples(
                out / "samples.png",
                samples[0],
                data.raw_test[:n_samples],
                f"model samples ({args.flow}) beside held-out data",
                data.columns,
            ),
        )
    else:
        (out / "samples.png").unlink(missing_ok=True)  # 1-D: density.png shows both
    stage(
        "loss.png",
        out / "loss.png",
        lambda: _plot_loss(
            out / "loss.png",
            history,
            f"{args.flow} on {Path(data.label).name}"
            + (" (NLL in data units)" if data.scale is not None else ""),
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
    written = ",".join(sorted(p.name for p in out.iterdir() if p.name in _RUN_FILES))
    units = " (data units)" if data.scale is not None else ""
    print(
        f"{data.label}: train NLL {metrics['train_nll']:.4f}, test NLL "
        f"{metrics['test_nll']:.4f} nats{units} ({result.wall_time:.1f} s training); "
        f"wrote {out}/{{{written}}}"
    )
    return 0


def _resume_note(
    state: dict[str, Any], args: argparse.Namespace, checkpoint: Path, n_train: int
) -> str:
    """What resuming does, said before it happens (or why it cannot)."""
    step = state.get("step")
    if isinstance(step, int) and args.steps < step:
        raise CommandError(
            f"--resume: the checkpoint is at step {step}, past --steps {args.steps}: pass "
            f"--steps {step} or more to continue it"
        )
    saved = state["config"].get("fit") or {}
    now = {
        "steps": args.steps,
        "lr": args.lr,
        "lr_final": args.lr_final,
        "batch_size": min(args.batch_size, n_train),
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


def _save_samples(path: Path, samples: Tensor, columns: Sequence[str] | None = None) -> None:
    import torch

    _check_sample_path(path)
    suffix = path.suffix.lower()
    array = samples.numpy()
    names = list(columns) if columns else [f"x{i}" for i in range(samples.shape[-1])]
    if suffix == ".pt":
        _write(path, lambda handle: torch.save(samples, handle))
    elif suffix == ".npy":
        import numpy as np

        _write(path, lambda handle: np.save(handle, array))
    elif suffix == ".csv":
        import numpy as np

        header = ",".join(names)
        _write(
            path,
            lambda handle: np.savetxt(handle, array, delimiter=",", header=header, comments=""),
        )
    else:
        _plot_samples(path, samples, None, "model samples", names)


def _stored_columns(state: dict[str, Any]) -> list[str] | None:
    columns = (state["config"].get("metadata") or {}).get("columns")
    if isinstance(columns, list) and all(isinstance(c, str) for c in columns):
        return columns
    return None


def _sample_cmd(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_checkpoint, load_flow, load_standardization

    _positive("n", args.n)
    device = _device(args.device)
    path = Path(args.out)
    _check_sample_path(path)  # fail before the work
    if path.exists() and not args.force:
        # fit never replaces a run without being told; neither does sample
        raise CommandError(f"{str(path)!r} exists: pass --force to replace it, or another --out")
    state = load_checkpoint(args.checkpoint)
    scale = load_standardization(state)
    flow = load_flow(state).to(device)
    torch.manual_seed(args.seed)
    samples = _sample(flow, args.n, device).cpu()
    if scale is not None:
        samples = scale.decode(samples)  # data units
    columns = _stored_columns(state)
    _save_samples(path, samples, columns if columns and len(columns) == samples.shape[-1] else None)
    units = " (data units)" if scale is not None else ""
    print(f"wrote {args.n} samples{units} to {path}")
    return 0


def _evaluation_rows(
    args: argparse.Namespace, state: dict[str, Any], dim: int
) -> tuple[Tensor, dict[str, Any]]:
    """The rows ``evaluate`` scores (in data units) and how the report names them."""
    from .data_files import load_data, split_data
    from .datasets import sample_toy

    metadata = state["config"].get("metadata") or {}
    if args.data is not None or (args.dataset is None and metadata.get("data")):
        for name in ("n", "seed"):
            if getattr(args, name) is not None:
                raise ValueError(
                    f"--{name} applies to toy data sets (the rows of a data file are scored)"
                )
    dataset = args.dataset
    if args.data is None and dataset is None:
        dataset = metadata.get("dataset")
        if dataset is None and not metadata.get("data"):
            raise CommandError(
                "the checkpoint records no data to score (it was not written by pyro-invres "
                "fit, e.g. fit_density from Python without metadata): pass --data FILE (an "
                f"N x {dim} table in a .npy, .csv or .pt file) or --dataset NAME"
            )
        if dataset is not None and (not isinstance(dataset, str) or dataset not in _TOY_DATASETS):
            raise ValueError(f"the checkpoint names data set {dataset!r:.80}: pass --dataset")
    if dataset is not None:
        if dim != 2:
            raise ValueError(
                f"--dataset {dataset} is 2-D, but the checkpoint's flow has {dim} dimensions"
            )
        seed = args.seed
        if seed is None:
            fit_seed = metadata.get("seed", 0)
            if isinstance(fit_seed, bool) or not isinstance(fit_seed, int):
                raise ValueError(f"the checkpoint's seed is {fit_seed!r:.80}: pass --seed")
            seed = fit_seed + 1
        n = _positive("n", DEFAULTS["evaluate_n"] if args.n is None else args.n)
        rows = sample_toy(dataset, n, seed=seed)
        return rows, {"dataset": dataset, "n": n, "seed": seed}

    recorded = metadata.get("data")
    file = args.data if args.data is not None else recorded
    if args.data is None and not Path(str(recorded)).is_file():
        raise CommandError(
            f"the checkpoint was fitted to {recorded}, which is not there any more: pass "
            "--data FILE to score a table of held-out rows"
        )
    table = load_data(file)
    if table.data.shape[1] != dim:
        raise ValueError(
            f"{file} has {table.data.shape[1]} columns, but the checkpoint's flow has {dim}"
        )
    columns = _stored_columns(state)
    # a fit on a file without a header knows its columns by position only (x0, x1, ...)
    named = (state["config"].get("metadata") or {}).get("named_columns", True)
    if table.has_header and named and columns is not None and table.columns != columns:
        raise ValueError(
            f"{file} has columns {table.columns}, the checkpoint was fitted to {columns}: "
            "give the columns in the same order"
        )
    if table.sha256 == metadata.get("data_sha256"):
        # the file the flow was fitted to: only the rows it held out
        fraction, split_seed = metadata.get("test_fraction"), metadata.get("test_seed")
        if not isinstance(fraction, float) or not isinstance(split_seed, int):
            raise CommandError("the checkpoint's record of its held-out split is damaged")
        rows = split_data(table.data, fraction, split_seed)[1]
        return rows, {"data": str(file), "rows": "held-out", "n": len(rows)}
    if args.data is None:
        raise CommandError(
            f"{file} changed since the fit (its sha256 differs), so the rows it held out "
            f"are unknown: pass --data {file} to score all of its rows"
        )
    return table.data, {"data": str(file), "rows": "all", "n": len(table.data)}


def _evaluate_cmd(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, load_flow, load_standardization
    from .evaluation import evaluate_nll

    if args.n is not None:
        _positive("n", args.n)
    device = _device(args.device)
    state = load_checkpoint(args.checkpoint)  # its structure is checked there
    dim = (state["config"].get("flow") or {}).get("input_dim")
    flow = load_flow(state).to(device)  # checks the flow config against the weights
    scale = load_standardization(state)
    rows, report = _evaluation_rows(args, state, dim)
    dtype = next((p.dtype for p in flow.parameters()), None) or rows.dtype
    scored = rows if scale is None else scale.encode(rows.double())
    nll = evaluate_nll(flow, scored.to(device=device, dtype=dtype))
    if scale is not None:
        report["nll_standardized"] = nll
        nll += scale.log_scale
    report.update({"nll": nll, "units": "data", "step": state["step"]})
    print(json.dumps(report))
    return 0 if math.isfinite(nll) else 1


_COMMANDS = {
    "fit": _fit,
    "sample": _with_threads(_sample_cmd),
    "evaluate": _with_threads(_evaluate_cmd),
}
#: Longer error messages are cut: a message is read, not scrolled (a state-dict mismatch
#: deep in torch can run to kilobytes).
_MAX_MESSAGE = 600


def _message(err: BaseException) -> str:
    text = _one_line(err)
    if len(text) > _MAX_MESSAGE:
        text = f"{text[:_MAX_MESSAGE]} ... [{len(text) - _MAX_MESSAGE} more characters cut]"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pyro-invres`` command line; returns the exit status.

    0 on success (``--help`` and ``--version`` included), 1 for an error (one line on
    stderr), 2 for a usage error (an unknown, abbreviated or malformed option: one line on
    stderr too), 130 when interrupted.

    Arguments:
        argv: the arguments (default: ``sys.argv[1:]``).

    Example:
        >>> main(["evaluate", "--checkpoint", "/no/such/checkpoint.pt"])
        1
    """
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the command's own parser, which knows its options
            parser.commands[args.command].refuse_unknown(extra)
    except SystemExit as done:  # --help, --version (0) and usage errors (2, one line)
        return done.code if isinstance(done.code, int) else 1
    from .checkpoint import CheckpointError

    expected = (CommandError, CheckpointError, ValueError, OSError, ImportError)
    try:
        return _COMMANDS[args.command](args)
    except (*expected, FloatingPointError) as err:
        print(f"{_PROG} {args.command}: error: {_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{_PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, or a failure deep in torch: still one line
        if os.environ.get("PYRO_INVRES_TRACEBACK"):
            raise
        print(
            f"{_PROG} {args.command}: error: {type(err).__name__}: {_message(err)} "
            "(set PYRO_INVRES_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
