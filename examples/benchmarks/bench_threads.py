"""Torch's CPU threads on the training step of the default ``pyro-invres fit`` flow.

The flow is ``build_flow("iresnet-2d", 2)`` (what ``pyro-invres fit`` trains), the step is
the one :func:`pyro_invres.train.fit_density` takes (Pyro's SVI on a batch of 256 rows of
two moons, backward, Adam), and the question is how many intra-op threads it should get.
Each measurement runs in a fresh Python process, under one of two thread settings:

* ``default``: whatever torch picks at start-up (one per core here; no ``set_num_threads``);
* ``1``: ``torch.set_num_threads(1)``;

and one of two loads:

* ``quiet``: nothing else of this script's runs (other users of the machine may: the load
  average before and after each run is recorded);
* ``loaded``: a second process spins alongside, a single-threaded torch loop of small
  matrix products (one core busy, as a second job, a test run or a notebook would keep it).

The settings are interleaved (round 1: quiet default, quiet 1, loaded default, loaded 1;
round 2 the same...), so a change of the machine's load hits them alike. Reported per
setting: the median over rounds of ``fit_density``'s ``wall_time / steps`` (milliseconds
per step, after 5 untimed steps on the same flow: ActNorm's initialisation and the first
power iterations are not counted), the process CPU time per step, and the load averages. Run::

    python examples/benchmarks/bench_threads.py            # ~5 minutes on 2 cores
    python examples/benchmarks/bench_threads.py --quick    # a smoke test

The JSON goes to ``examples/benchmarks/results/threads_cpu.json`` only with ``--save``
(``--out PATH`` to write it elsewhere); otherwise the table is printed and nothing is
written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "threads_cpu.json"
SETTINGS = [("quiet", "default"), ("quiet", "1"), ("loaded", "default"), ("loaded", "1")]

# a single-threaded busy process: small matrix products in a loop, until killed
LOADER = """
import torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
while True:
    a = torch.tanh(a @ a.T / 256)
"""


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def worker(threads: str, steps: int, seed: int, warmup: int = 5) -> dict:
    """One measurement, in this (fresh) process: ``fit_density`` for ``steps`` steps
    after ``warmup`` untimed ones."""
    import torch

    if threads != "default":
        torch.set_num_threads(int(threads))
    from pyro_invres.datasets import sample_toy
    from pyro_invres.flows import build_flow
    from pyro_invres.train import fit_density

    data = sample_toy("moons", 20_000, torch.Generator().manual_seed(seed))
    flow = build_flow("iresnet-2d", 2)
    options = dict(batch_size=256, lr=1e-2, seed=seed, eval_max=2, progress=False)
    # untimed: the first steps initialise ActNorm from the data and the spectral norms'
    # singular vectors, and warm the allocator; the timed call continues on the same flow
    fit_density(flow, data, steps=warmup, **options)
    cpu = time.process_time()
    result = fit_density(flow, data, steps=steps, **options)
    cpu = time.process_time() - cpu
    return {
        "torch_threads": torch.get_num_threads(),
        "ms_per_step": 1e3 * result.wall_time / steps,
        # the whole call's CPU time (the 2-row evaluation at the end is negligible)
        "cpu_ms_per_step": 1e3 * cpu / steps,
        "final_loss": result.losses[-1],
        "pyro_invres": str(Path(sys.modules["pyro_invres"].__file__).parent),
    }


def measure(load: str, threads: str, steps: int, seed: int) -> dict:
    """Run :func:`worker` in a fresh process, with a busy neighbour when ``load == "loaded"``."""
    env = dict(os.environ)
    # the worker's own thread count is what is measured: no inherited OMP_NUM_THREADS
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)
    before = loadavg()
    loader = None
    if load == "loaded":
        loader = subprocess.Popen([sys.executable, "-c", LOADER], env=env)
        time.sleep(1.0)  # let it reach its loop before the worker starts
    try:
        command = [sys.executable, __file__, "--worker", threads, "--steps", str(steps)]
        run = subprocess.run(
            [*command, "--seed", str(seed)], env=env, capture_output=True, text=True, check=False
        )
    finally:
        if loader is not None:
            loader.kill()
            loader.wait()
    if run.returncode != 0:
        raise SystemExit(f"worker failed ({load}, threads {threads}):\n{run.stderr}")
    row = json.loads(run.stdout.strip().splitlines()[-1])
    row.update(load=load, threads=threads, loadavg_before=before, loadavg_after=loadavg())
    return row


def summarise(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for load, threads in SETTINGS:
        mine = [r for r in rows if r["load"] == load and r["threads"] == threads]
        ms = [r["ms_per_step"] for r in mine]
        out[f"{load}/{threads}"] = {
            "torch_threads": mine[0]["torch_threads"],
            "ms_per_step_median": statistics.median(ms),
            "ms_per_step_all": ms,
            "cpu_ms_per_step_median": statistics.median(r["cpu_ms_per_step"] for r in mine),
        }
    for load in ("quiet", "loaded"):
        default = out[f"{load}/default"]["ms_per_step_median"]
        out[f"{load}/default"]["slowdown_vs_one_thread"] = (
            default / out[f"{load}/1"]["ms_per_step_median"]
        )
    return out


def table(summary: dict[str, dict]) -> str:
    lines = [
        "| load | torch threads | ms/step (median) | CPU ms/step | default / one thread |",
        "|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        load, threads = key.split("/")
        name = f"default ({s['torch_threads']})" if threads == "default" else threads
        ratio = s.get("slowdown_vs_one_thread")
        lines.append(
            f"| {load} | {name} | {s['ms_per_step_median']:.1f} | "
            f"{s['cpu_ms_per_step_median']:.1f} | {'' if ratio is None else f'{ratio:.2f}x'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="fit_density steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="5 steps, 1 round: a smoke test")
    written = parser.add_mutually_exclusive_group()
    written.add_argument("--save", action="store_true", help=f"write {RESULTS.relative_to(HERE)}")
    written.add_argument("--out", default=None, help="write the JSON to this path instead")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.steps, args.seed)))
        return {}
    if args.quick:
        if args.save:
            parser.error("--save records the full run; a --quick smoke test takes --out PATH")
        args.steps, args.rounds = 5, 1

    started, start_load = time.perf_counter(), loadavg()
    rows = []
    for round_ in range(args.rounds):
        for load, threads in SETTINGS:
            row = measure(load, threads, args.steps, args.seed)
            rows.append({"round": round_, **row})
            print(
                f"round {round_} {load:6s} threads {threads:7s} ({row['torch_threads']}): "
                f"{row['ms_per_step']:7.1f} ms/step, CPU {row['cpu_ms_per_step']:7.1f} ms/step, "
                f"load {row['loadavg_before'][0]} -> {row['loadavg_after'][0]}",
                flush=True,
            )
    summary = summarise(rows)
    print()
    print(table(summary))
    import platform

    import torch

    payload = {
        "command": "python examples/benchmarks/bench_threads.py"
        + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
        "config": {
            "flow": 'build_flow("iresnet-2d", 2)',
            "data": "sample_toy('moons', 20000)",
            "batch_size": 256,
            "steps": args.steps,
            "rounds": args.rounds,
            "loader": "one process: torch.set_num_threads(1), tanh(a @ a.T) on 256 x 256, looped",
        },
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "torch_default_threads": torch.get_num_threads(),
            "loadavg_at_start": start_load,
            "loadavg_at_end": loadavg(),
            "git_commit": subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True
            ).stdout.strip(),
            "pyro_invres_from": rows[0]["pyro_invres"],
        },
        "summary": summary,
        "runs": rows,
        "total_wall_s": time.perf_counter() - started,
    }
    path = RESULTS if args.save else (Path(args.out) if args.out else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
    print(f"{payload['total_wall_s']:.0f} s in all")
    return payload


if __name__ == "__main__":
    main()
