"""The benchmarks' shared timer: wall or this thread's CPU clock."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import load_benchmark

_COMMON = load_benchmark("common", "bench_common_under_test")
PhaseTimer, interleaved_timing = _COMMON.PhaseTimer, _COMMON.interleaved_timing


def test_the_cpu_clock_does_not_count_sleeping() -> None:
    cpu, wall = PhaseTimer(torch.device("cpu"), "cpu"), PhaseTimer(torch.device("cpu"))
    cpu.start()
    wall.start()
    time.sleep(0.05)
    cpu.mark("sleep")
    wall.mark("sleep")
    assert wall.phases["sleep"] >= 0.05 > 10 * cpu.phases["sleep"]


def test_interleaved_timing_takes_the_clock() -> None:
    def busy(timer: PhaseTimer) -> None:
        sum(i * i for i in range(20_000))
        timer.mark("work")

    out = interleaved_timing({"a": busy}, torch.device("cpu"), reps=3, warmup=1, clock="cpu")
    assert out["impls"]["a"]["total"]["median"] > 0


def test_bad_clocks_are_refused() -> None:
    with pytest.raises(ValueError, match="clock must be one of"):
        PhaseTimer(torch.device("cpu"), "gpu")
    with pytest.raises(ValueError, match="CPU work only"):
        PhaseTimer(torch.device("cuda"), "cpu")
