"""Write ``docs/benchmark_results.md`` from the benchmarks' JSON results.

The page only restates what ``bench_residual_flow.py``, ``bench_reversible.py``,
``bench_equal_time.py`` and ``bench_exact_logdet.py`` wrote to
``results/<name>_<device>.json``; rerun those, then this::

    python examples/benchmarks/summarize.py            # CPU results
    python examples/benchmarks/summarize.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SOLVERS = ("fixed_point", "anderson", "newton")
TARGETS = {
    "time": 0.6,  # ours / normflows, training step (issue 18)
    "memory": 1.0,  # ours (memory-saving mode) / normflows reduce_memory
    "inverse": 10,  # evaluations of g, c = 0.9 block, 1e-6
    "inverse_trained": 5,  # median per block solve on a trained toy flow
    "rev_memory": 1.25,  # 64 blocks / 4 blocks
    "rev_time": 1.4,  # ours / plain autograd
    "rev_drift": 1e-4,  # float32, depth 256
}


def _env(result: dict[str, Any]) -> str:
    env = result.get("env", {})
    bits = [env.get("device_name") or env.get("cpu"), f"torch {env.get('torch')}"]
    if env.get("torch_threads"):
        bits.append(f"{env['torch_threads']} thread(s)")
    return ", ".join(str(b) for b in bits if b)


def _lipschitz_iters(result: dict[str, Any]) -> int:
    """normflows' power iterations behind the headline ratios (the first timed count)."""
    iters = result.get("settings", {}).get("lipschitz_iters", 50)
    return int(iters[0] if isinstance(iters, list) else iters)


def residual_flow_section(result: dict[str, Any]) -> list[str]:
    nan = float("nan")
    out = ["## Residual flows against normflows", ""]
    out.append(f"`{result.get('command', 'bench_residual_flow.py')}`; {_env(result)}.")
    load = result.get("env", {}).get("loadavg_at_start")
    cpus = result.get("env", {}).get("cpu_count")
    if load and cpus and load[0] > cpus:
        out.append("")
        out.append(
            f"Measured on a shared machine (load average {load[0]:.0f} at the start on {cpus} "
            "cores: other jobs ran throughout), so the absolute times are several times the "
            "unloaded ones and the wall-time columns of the inversion table are noise; the "
            "time ratios come from interleaved rounds and are the numbers to quote."
        )
    out.append("")
    rows = []
    for config, entry in result.get("training", {}).items():
        timing = entry["timing_seconds"]["impls"]
        memory = entry.get("peak_memory", {})
        ratios = entry["time_ratios"]
        for impl in ("ours", "ours_forward", "nf_reduce_memory", "nf_plain"):
            if impl not in timing:
                continue
            mem = memory.get(impl, {}).get("median_bytes")
            rows.append(
                [
                    config,
                    impl,
                    1e3 * timing[impl]["total"]["median"],
                    "-" if mem is None else mem / 2**20,
                ]
            )
        r = ratios.get("ours/nf_reduce_memory", {})
        m = memory.get("ratios", {})
        rows.append(
            [
                config,
                "**ours / nf_reduce_memory**",
                f"{r.get('of_medians', nan):.2f} (paired {r.get('median_of_paired', nan):.2f})",
                f"{m.get('ours/nf_reduce_memory', nan):.2f}",
            ]
        )
        rf = ratios.get("ours_forward/nf_reduce_memory", {})
        rows.append(
            [
                config,
                "**ours_forward / nf_reduce_memory**",
                f"{rf.get('of_medians', nan):.2f}",
                f"{m.get('ours_forward/nf_reduce_memory', nan):.2f}",
            ]
        )
    if rows:
        out.append(
            f"Training step (targets: time at most {TARGETS['time']}x normflows, memory of the "
            f"memory-saving modes at most {TARGETS['memory']}x). normflows' step includes the "
            "`update_lipschitz` call its users must make "
            f"({_lipschitz_iters(result)} power iterations; how closely "
            "each side's training-time estimate tracks the norm: {doc}`tradeoffs`); "
            "`ours_forward` is "
            '`gradient="forward"`, our memory-saving mode.'
        )
        out.append("")
        out.append(markdown_table(["config", "impl", "step ms / ratio", "peak MiB / ratio"], rows))
        out.append("")
    by_iters = [
        [
            config,
            n,
            *(f"{r.get(f'ours/{peer}', nan):.2f}" for peer in ("nf_reduce_memory", "nf_plain")),
        ]
        for config, entry in result.get("training", {}).items()
        for n, r in entry.get("time_ratios_by_lipschitz_iters", {}).items()
    ]
    if by_iters:
        out.append(
            "ours / normflows (medians of interleaved rounds) by the power iterations normflows "
            f"runs per step, `update_lipschitz(model, n)` (target {TARGETS['time']} at n = 5):"
        )
        out.append("")
        out.append(
            markdown_table(["config", "n", "ours / nf_reduce_memory", "ours / nf_plain"], by_iters)
        )
        out.append("")
    inverse = result.get("inverse", {})
    rows = []
    for key, r in inverse.items():
        if not key.startswith("random_block"):
            continue
        b, p = r["batch_solve"], r["per_sample"]
        for m in SOLVERS:
            if m not in b:
                continue
            rows.append(
                [
                    f"D={r['dim']}",
                    m,
                    b[m]["iterations"],
                    p[m]["iterations_median"],
                    p[m]["oracle_iterations_median"],
                    b[m]["forward_pass_equivalents"],
                ]
            )
    if rows:
        out.append(
            f"Inverting a random c = 0.9 block to 1e-6 (target: at most {TARGETS['inverse']} "
            "evaluations of `g`; the wall time is also given in forward passes of `g`, which "
            "counts Anderson's least-squares work and the Jacobian each Newton evaluation "
            "carries):"
        )
        out.append("")
        out.append(
            markdown_table(
                [
                    "block",
                    "solver",
                    "batch evaluations",
                    "per-sample median",
                    "oracle median",
                    "batch wall time / forward",
                ],
                rows,
            )
        )
        out.append("")
    toy = inverse.get("trained_toy_flow")
    if toy:
        solvers = [m for m in SOLVERS if m in toy]
        sampling = toy.get("batch_sampling", {})
        rows = [
            [
                m,
                toy[m]["iterations_per_block_solve_median"],
                toy[m]["iterations_per_sample_median"],
                sampling.get(m, {}).get("explicit_pass_equivalents", "-"),
                toy[m]["reconstruction_rel_error_max"],
            ]
            for m in solvers
        ]
        out.append(
            f"Sampling the flow `pyro-invres fit` trains ({toy['training']['steps']} steps; "
            f"target: median evaluations per block solve at most {TARGETS['inverse_trained']}; "
            "wall time of sampling a batch of "
            f"{sampling.get('batch_size', '-')} in explicit passes of the flow):"
        )
        out.append("")
        out.append(
            markdown_table(
                [
                    "solver",
                    "per block solve (median)",
                    "per sample, all blocks (median)",
                    "batch sampling / explicit pass",
                    "max rel error",
                ],
                rows,
            )
        )
        out.append("")
        rules = toy["anderson"].get("stopping_rules_per_block_solve")
        if rules:
            out.append(
                f"Replaying the {rules['n_solves']} Anderson block solves: the first iterate "
                f"within rtol of the exact answer comes at evaluation {rules['oracle_median']:g} "
                f"(median; mean {rules['oracle_mean']:.2f}); the guaranteed Banach stop, "
                f"c / (1 - c) x step <= rtol, comes at {rules['banach_median']:g} "
                f"(mean {rules['banach_mean']:.2f}). Stopping on the observed contraction "
                f"instead would stop at {rules['observed_rate_median']:g}, but "
                f"{rules['observed_rate_violations']} of those solves would end above rtol "
                f"(worst {rules['observed_rate_worst_rel_error']:.2g}), so the library keeps "
                "the guaranteed rule."
            )
        out.append("")
    return out


def reversible_section(result: dict[str, Any]) -> list[str]:
    out = ["## Reversible back-propagation", ""]
    out.append(f"`bench_reversible.py`; {_env(result)}; config {result.get('config')}.")
    out.append("")
    depths = result.get("depths", {})
    rows = []
    for depth, entry in depths.items():
        ratios = entry.get("time_ratio_vs_plain", {})
        saved = entry.get("memory", {})
        for impl in ("plain", "ours", "checkpoint", "memcnn"):
            if impl in ratios:
                nbytes = saved.get(impl, {}).get("saved_tensor_bytes")
                rows.append(
                    [
                        depth,
                        impl,
                        ratios[impl]["of_medians"],
                        ratios[impl]["median_of_paired"],
                        "-" if nbytes is None else nbytes / 2**20,
                    ]
                )
    if rows:
        out.append(
            f"Training step of a RevNet stack: time / plain autograd (target at most "
            f"{TARGETS['rev_time']}x) and the bytes autograd saves (memcnn keeps its "
            "activations outside autograd's saved tensors, so its count misses one per step):"
        )
        out.append("")
        out.append(
            markdown_table(["depth", "impl", "time / plain", "paired rounds", "saved MiB"], rows)
        )
        out.append("")
    small, large = depths.get("4", {}).get("memory", {}), depths.get("64", {}).get("memory", {})
    if small and large:
        parts = [
            f"{impl} {large[impl]['saved_tensor_bytes'] / small[impl]['saved_tensor_bytes']:.2f}x"
            for impl in ("ours", "checkpoint", "plain")
            if impl in small and impl in large
        ]
        out.append(
            f"Saved memory at depth 64 / depth 4 (target at most {TARGETS['rev_memory']}x): "
            + ", ".join(parts)
            + "."
        )
        out.append("")
    drift = result.get("drift")
    if drift:
        errors = drift["reconstruction_max_rel_error"]
        out.append(
            f"float32 reconstruction at depth {drift['depth']} (activations grow "
            f"{drift['activation_growth']:.0f}x; target below {TARGETS['rev_drift']:g}): "
            + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
            + "."
        )
        out.append("")
    return out


def equal_time_section(result: dict[str, Any]) -> list[str]:
    out = ["## Density quality at equal wall-clock", ""]
    out.append(
        f"`bench_equal_time.py`: {result['seconds_per_model']:g} s of training per model, "
        f"test NLL in nats with the exact log-det; {_env(result)}."
    )
    out.append("")

    def nll(r: dict[str, Any]) -> Any:
        if r["test_nll"] is None:
            return "diverged"
        if r.get("diverged"):
            return (
                f"{r['test_nll']:.3g} (diverged at step {r['diverged_at_step']}; "
                f"parameters of step {r['scored_at_step']})"
            )
        return r["test_nll"]

    rows = [
        [dataset, name, r["steps"], nll(r)]
        for dataset, entry in result.get("datasets", {}).items()
        for name, r in entry.items()
    ]
    out.append(markdown_table(["data set", "model", "steps", "test NLL"], rows))
    out.append("")
    return out


def exact_logdet_section(result: dict[str, Any]) -> list[str]:
    out = ["## Exact log-det: carried Jacobian against vector-Jacobian products", ""]
    out.append(
        "`bench_exact_logdet.py`: one training step (`-log p`, backward, Adam) with the "
        f"exact log-det, interleaved in one process; {_env(result)}."
    )
    out.append("")
    rows = []
    for name, r in result.get("configs", {}).items():
        t, ratio, agree = r["timing"], r["ratio_carried_over_vjp"], r["agreement_float64"]
        rows.append(
            [
                name,
                1e3 * t["carried"]["total"]["median"],
                1e3 * t["vjp"]["total"]["median"],
                f"{ratio['of_medians']:.2f} (paired {ratio['median_of_paired']:.2f})",
                f"{agree['log_prob_max_abs_diff']:.1e}",
                f"{agree['grad_max_rel_diff']:.1e}",
            ]
        )
    header = ["flow", "carried ms", "vjp ms", "carried / vjp", "max d log p", "max rel d grad"]
    out.append(markdown_table(header, rows))
    out.append("")
    out.append("The last two columns compare both paths in float64 on the same weights.")
    out.append("")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmark_results.md"))
    args = parser.parse_args()
    lines = [
        f"# Benchmark results ({args.device})",
        "",
        "Written by `python examples/benchmarks/summarize.py` from the JSON files in",
        "`examples/benchmarks/results/`; rerun the benchmarks and then it to refresh. The",
        "toy-density comparison with Pyro's flows has its own page, {doc}`toy_nll`.",
        "",
    ]
    for name, section in (
        ("residual_flow", residual_flow_section),
        ("reversible", reversible_section),
        ("equal_time", equal_time_section),
        ("exact_logdet", exact_logdet_section),
    ):
        path = RESULTS_DIR / f"{name}_{args.device}.json"
        if path.is_file():
            lines += section(json.loads(path.read_text()))
        else:
            lines += [f"No `{path.name}` yet.", ""]
    Path(args.out).write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
