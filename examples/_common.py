"""Command-line options every example script shares, and where its results go.

An example writes files only when asked: ``--save`` records a run where the docs read it
(the figure in ``docs/_static/figures/``, the numbers in ``examples/results/``), ``--out
DIR`` writes both under ``DIR``; with neither it prints its table and writes nothing. A
``--quick`` smoke test is never recorded: ``--save --quick`` is refused.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIGURES = REPO / "docs" / "_static" / "figures"


@dataclass(frozen=True)
class Outputs:
    """Where one run writes its figure and its JSON."""

    figure: Path
    results: Path


def add_run_arguments(parser: argparse.ArgumentParser, results: Path | str) -> None:
    """``--seed``, ``--threads``, ``--quick`` and where to write: ``--save`` or ``--out``."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the tensors are small, and a second thread only "
        "waits on the first, badly so on a shared machine; "
        "examples/benchmarks/bench_threads.py measures it)",
    )
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    written = parser.add_mutually_exclusive_group()
    written.add_argument(
        "--save",
        action="store_true",
        help=f"record this run: the figure in {shown(FIGURES)}/ and the numbers in "
        f"{shown(Path(results))} (not with --quick)",
    )
    written.add_argument(
        "--out", default=None, metavar="DIR", help="write the figure and the JSON under DIR"
    )


def run_outputs(
    parser: argparse.ArgumentParser, args: argparse.Namespace, results: Path, figure_name: str
) -> Outputs | None:
    """Where this run writes (``None``: nowhere), checked before any work is done."""
    if args.save and args.quick:
        parser.error(
            "--save records a run in the repository, and a --quick smoke test is not one; "
            "pass --out DIR to keep its files"
        )
    if args.save:
        return Outputs(FIGURES / figure_name, results)
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            parser.error(f"--out {out} is a file; --out names a directory")
        return Outputs(out / figure_name, out / results.name)
    return None


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (as the recorded JSON keeps it)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def write_results(outputs: Outputs | None, payload: dict, total: float) -> Path | None:
    """Write ``payload`` as JSON where ``outputs`` says, or say that nothing was written."""
    if outputs is None:
        print(
            f"nothing written ({total:.0f} s in all): pass --save to record this run "
            f"({shown(FIGURES)}/, examples/results/) or --out DIR"
        )
        return None
    outputs.results.parent.mkdir(parents=True, exist_ok=True)
    outputs.results.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {shown(outputs.figure)} and {shown(outputs.results)} ({total:.0f} s in all)")
    return outputs.results
