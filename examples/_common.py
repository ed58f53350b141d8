"""Command-line options every example script shares."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_run_arguments(parser: argparse.ArgumentParser, results: Path | str) -> None:
    """``--seed``, ``--threads``, ``--out``, ``--results`` and ``--quick``."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the tensors are small, and a second thread only "
        "waits on the first, badly so on a shared machine)",
    )
    parser.add_argument("--out", default="docs/_static/figures", help="figures directory")
    parser.add_argument(
        "--results", default=None, help=f"JSON path (default {results}; <out>/ with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")


def write_results(
    args: argparse.Namespace, default: Path, payload: dict, figure: Path, total: float
) -> Path:
    """Write ``payload`` as JSON where ``--results``/``--quick`` say, and report it."""
    path = Path(args.results or (Path(args.out) / default.name if args.quick else default))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {figure} and {path} ({total:.0f} s in all)")
    return path
