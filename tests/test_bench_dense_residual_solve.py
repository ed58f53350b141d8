"""Smoke test of examples/benchmarks/bench_dense_residual_solve.py (the NPE block's solve)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = (
    Path(__file__).resolve().parents[1]
    / "examples"
    / "benchmarks"
    / "bench_dense_residual_solve.py"
)


def test_measure_counts_a_converged_solve() -> None:
    spec = importlib.util.spec_from_file_location("bench_dense_residual_solve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    row = module.measure(3, 32, reps=2)
    assert row["hidden"] == 32 and row["round_trip_max_error"] < 1e-4
    assert 2 <= row["residual_evaluations"] <= 10  # the start and a few Newton steps
    assert row["forward_equivalents"] > 0
