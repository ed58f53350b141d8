"""Smoke test of examples/benchmarks/bench_dense_residual_solve.py (the NPE block's solve)."""

from __future__ import annotations

from helpers import load_benchmark


def test_measure_counts_a_converged_solve() -> None:
    row = load_benchmark("bench_dense_residual_solve").measure(3, 32, reps=2)
    assert row["hidden"] == 32 and row["round_trip_max_error"] < 1e-4
    assert 2 <= row["residual_evaluations"] <= 10  # the start and a few Broyden steps
    assert row["forward_equivalents"] > 0
