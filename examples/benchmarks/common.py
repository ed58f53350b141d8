"""Shared machinery for the benchmarks: interleaved timing, peak memory, environment, output.

Timing: every implementation runs one step in turn (A B C, then B C A, ...), so a load
spike on a shared machine hits all of them alike; the report is per-implementation medians
(and means) and the median of the per-round ratios. CUDA work is synchronised around every
timed region.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what is allocated once the
model is built. On CPU, :func:`peak_allocated_cpu` replays the allocations the torch
profiler records during a step (the step's own tensors; see there); or, with
:func:`peak_memory`, each measurement runs in a fresh child process forked from a
``forkserver`` that has only imported the libraries (no tensor work: fork-safe, and it saves
re-importing torch for every measurement; ``spawn`` where there is no forkserver): the
child builds the model, takes its resident set size as the baseline, resets the kernel's
high-water mark (``/proc/self/clear_refs``; falls back to ``ru_maxrss`` where that is not
allowed), runs the training steps and reports ``VmHWM - baseline``: the peak extra memory
of training, optimizer state and allocator effects included.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- options and environment ------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    """Options every benchmark shares: device, threads, repetitions, output path."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads on CPU (default 1: steadier on a shared machine)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per config")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per impl")
    parser.add_argument("--mem-reps", type=int, default=None, help="memory runs per impl")
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke test")
    parser.add_argument("--out", default=None, help="JSON path (default: results/<name>.json)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def setup_device(args: argparse.Namespace) -> torch.device:
    """Resolve ``--device`` (failing loudly when CUDA is asked for and absent) and threads."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"model name\s*:\s*(.+)", text)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def env_info(device: torch.device) -> dict[str, Any]:
    """Versions, threads, CPU and (on CUDA) GPU: everything a reader needs to judge a number."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for name in ("pyro", "normflows", "numpy", "pyro_invres"):
        try:
            module = importlib.import_module(name)
            info[f"{name}_version"] = getattr(module, "__version__", "unknown")
        except ImportError:
            info[f"{name}_version"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing ---------------------------------------------------------------------------------
CLOCKS: dict[str, Callable[[], float]] = {
    # wall time: what a user waits (on a GPU, the only honest clock)
    "wall": time.perf_counter,
    # this thread's CPU time: on a one-thread CPU run, the work a step does, whatever
    # else a shared machine runs meanwhile (preemption does not count)
    "cpu": time.thread_time,
}


class PhaseTimer:
    """Splits one step into named phases: ``mark("forward")`` closes the phase so named."""

    def __init__(self, device: torch.device, clock: str = "wall") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
        if clock == "cpu" and device.type != "cpu":
            raise ValueError("the cpu clock times CPU work only: use clock='wall' on a GPU")
        self.device = device
        self.clock = CLOCKS[clock]
        self.phases: dict[str, float] = {}
        self._last = 0.0

    def start(self) -> None:
        sync(self.device)
        self.phases = {}
        self._last = self.clock()

    def mark(self, name: str) -> None:
        sync(self.device)
        now = self.clock()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now


Step = Callable[[PhaseTimer], None]


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    q25, _, q75 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else ordered * 3
    return {
        "median": statistics.median(ordered),
        "mean": statistics.fmean(ordered),
        "q25": q25,
        "q75": q75,
        "min": ordered[0],
        "n": len(ordered),
    }


def interleaved_timing(
    steps: dict[str, Step],
    device: torch.device,
    *,
    reps: int,
    warmup: int,
    seed: int = 0,
    before_round: Callable[[int], None] | None = None,
    clock: str = "wall",
) -> dict[str, Any]:
    """Time ``steps`` in interleaved rounds; return per-impl summaries in seconds.

    Each round runs every step once, in an order rotated from round to round, after
    ``before_round(r)`` (e.g. to reseed the random generators identically for all).

    Returns:
        ``{"impls": {name: {"total": summary, "phases": {phase: summary}}},
        "order": [...], "reps": reps, "warmup": warmup}``; summaries hold the median, mean,
        quartiles, minimum and the number of rounds.
    """
    names = list(steps)
    timer = PhaseTimer(device, clock)
    for name in names:
        for w in range(warmup):
            if before_round is not None:
                before_round(seed - 1 - w)
            timer.start()
            steps[name](timer)
    totals: dict[str, list[float]] = {n: [] for n in names}
    phases: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if before_round is not None:
                before_round(seed + r)
            gc.collect()
            timer.start()
            steps[name](timer)
            sync(device)
            totals[name].append(sum(timer.phases.values()))
            for phase, value in timer.phases.items():
                phases[name].setdefault(phase, []).append(value)
    return {
        "impls": {
            n: {
                "total": _summary(totals[n]),
                "phases": {p: _summary(v) for p, v in phases[n].items()},
                "samples": totals[n],
            }
            for n in names
        },
        "order": "rotated each round",
        "reps": reps,
        "warmup": warmup,
    }


def paired_ratio(timing: dict[str, Any], num: str, den: str) -> dict[str, float]:
    """Ratios ``num / den`` of medians, of means, and the median of per-round ratios."""
    a = timing["impls"][num]
    b = timing["impls"][den]
    per_round = [x / y for x, y in zip(a["samples"], b["samples"])]
    return {
        "of_medians": a["total"]["median"] / b["total"]["median"],
        "of_means": a["total"]["mean"] / b["total"]["mean"],
        "median_of_paired": statistics.median(per_round),
    }


# -- peak memory ----------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _warm_autograd() -> None:
    """Initialise autograd (double backward included) before the baseline is taken."""
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.nn.functional.silu(torch.nn.Linear(3, 3)(x)).sum()
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    g.sum().backward()


def _memory_child(
    builder: str, kwargs: dict[str, Any], steps: int, threads: int, queue: Any
) -> None:
    try:
        torch.set_num_threads(threads)
        _warm_autograd()
        module_name, func_name = builder.split(":")
        step = getattr(importlib.import_module(module_name), func_name)(**kwargs)
        gc.collect()
        baseline = _proc_status_kib("VmRSS")
        reset = _reset_peak_rss()
        ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        timer = PhaseTimer(torch.device("cpu"))
        for _ in range(steps):
            timer.start()
            step(timer)
        if reset and baseline is not None:
            peak = _proc_status_kib("VmHWM")
            method = "VmHWM after /proc/self/clear_refs reset, minus VmRSS baseline"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            baseline = ru_before
            method = "ru_maxrss delta (high-water mark could not be reset)"
        queue.put({"peak_bytes": (peak - baseline) * 1024, "method": method})
    except BaseException as exc:  # report, do not hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def peak_memory(
    builder: str,
    kwargs: dict[str, Any],
    device: torch.device,
    *,
    steps: int = 3,
    threads: int = 1,
    preload: tuple[str, ...] = ("torch",),
) -> dict[str, Any]:
    """Peak extra memory of ``steps`` training steps of the model ``builder`` makes.

    Arguments:
        builder: ``"module:function"``; ``function(**kwargs)`` builds the model, data and
            optimizer and returns a step ``step(timer)``. It must be importable from a
            fresh interpreter (the benchmarks directory is put on ``sys.path``).
        kwargs: its keyword arguments (picklable; ``device`` is added).
        device: ``cpu`` (fresh spawned child per call) or ``cuda`` (in process).
        steps: training steps run after the baseline.
        threads: torch threads in the CPU child.
        preload: modules the forkserver imports once (CPU; include the builder's module).

    Returns:
        ``{"peak_bytes": int, "method": str}`` (or ``{"error": str}``).
    """
    kwargs = {**kwargs, "device": str(device)}
    if device.type == "cuda":
        module_name, func_name = builder.split(":")
        step = getattr(importlib.import_module(module_name), func_name)(**kwargs)
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        timer = PhaseTimer(device)
        for _ in range(steps):
            timer.start()
            step(timer)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        del step
        gc.collect()
        torch.cuda.empty_cache()
        return {"peak_bytes": int(peak), "method": "torch.cuda.max_memory_allocated delta"}
    here = str(Path(__file__).resolve().parent)
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = here + (os.pathsep + old if old else "")
    try:
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(list(preload))
        else:
            ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_child, args=(builder, kwargs, steps, threads, queue))
        proc.start()
        result = queue.get(timeout=600)
        proc.join(timeout=60)
    finally:
        os.environ["PYTHONPATH"] = old
    return result


def peak_allocated_cpu(step: Any, steps: int = 5) -> dict[str, Any]:
    """Peak bytes allocated *during* a training step on CPU, the largest over ``steps``.

    RSS reports what the C allocator holds, not what tensors use: after a warm-up step the
    allocator reuses freed blocks and the high-water mark barely moves, and before it the
    one-time work (optimizer state, data-dependent initialisation) dominates. This measure
    runs each step under ``torch.autograd.profiler.profile(profile_memory=True)`` and
    replays the allocations and frees of every operator (its own, children excluded, at
    the operator's end) and those outside operators in time order; the step's peak is the
    largest running total, i.e. the most memory the step's own tensors held at once
    (parameters, optimizer state and whatever the previous step left are excluded; within
    one operator only its net allocation counts). Like ``max_memory_allocated`` on CUDA
    after ``reset_peak_memory_stats``, up to that operator granularity.
    """
    timer = PhaseTimer(torch.device("cpu"))
    peaks = []
    for _ in range(steps):
        with torch.autograd.profiler.profile(profile_memory=True) as prof:
            timer.start()
            step(timer)
        events = []
        for e in prof.function_events:
            if e.name == "[memory]":
                events.append((e.time_range.start, e.cpu_memory_usage))
            elif e.self_cpu_memory_usage:
                events.append((e.time_range.end, e.self_cpu_memory_usage))
        events.sort(key=lambda item: item[0])
        total = peak = 0
        for _, change in events:
            total += change
            peak = max(peak, total)
        peaks.append(peak)
    return {
        "peak_bytes": int(max(peaks)),
        "per_step_bytes": [int(p) for p in peaks],
        "method": "torch profiler allocation replay, peak of the step's own tensors",
    }


def memory_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    values = [r["peak_bytes"] for r in runs if "peak_bytes" in r]
    errors = [r["error"] for r in runs if "error" in r]
    out: dict[str, Any] = {"runs_bytes": values, "errors": errors}
    if values:
        out["median_bytes"] = statistics.median(values)
        out["method"] = runs[0].get("method")
    return out


# -- output ---------------------------------------------------------------------------------
def write_json(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20
