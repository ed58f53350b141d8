"""Write docs/posterior_results.md from bench_posteriors.py's result JSON.

    python examples/benchmarks/render_posteriors.py [--json PATH ...] [--doc PATH]

The tables are bench_posteriors.py's own (``vi_table``, ``neutra_table``); the page adds
the run's settings, its command and whether it was complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_posteriors as bench  # noqa: E402

HEADER = """# Variational posteriors: measured

Written by `python examples/benchmarks/render_posteriors.py` from
`{json}`, the result of

    {command}

Settings: {settings}. Run on {cpu} ({threads} torch thread(s); load average at start
{load}), commit `{commit}`{modified}.{partial}

Columns: `equal_steps` gives every guide the same SVI steps; {equal_time}. IW log Z is
the importance-weighted log-evidence from 10,000 guide draws with its Monte-Carlo
standard error; k-hat is the PSIS Pareto shape of the importance weights (below 0.7 is
the usual bar); mean and sd errors are in reference standard deviations (maximum over
the latents); the neck is the funnel's `v` or eight schools' `log tau` (guide sd, with
the reference's in brackets).
Every guide's log q is exact (the i-ResNet blocks score with the exact log-det).
"""


def _run_line(part: dict) -> str:
    """One bullet for a run that a merged result came from."""
    git = part.get("git") or {}
    local = ", pyro_invres with local changes" if git.get("pyro_invres_modified") else ""
    load = ", ".join(f"{x:.1f}" for x in part.get("loadavg_at_start") or [])
    commit = str(git.get("commit"))[:10]
    return f"* `{part.get('command')}` ({part.get('date')}, commit `{commit}`{local}, load {load})"


def render(data: dict, json_name: str) -> str:
    settings = data.get("settings", {})
    env = data.get("env", {})
    git = data.get("git", {})
    shown = ", ".join(
        f"{k} {settings[k]}"
        for k in ("optimizer", "lr_schedule", "particles", "steps", "draws", "seed")
        if k in settings
    )
    partial = (
        "\n\n**Partial run**: the models below finished; the others had not when this page "
        "was written."
        if data.get("partial")
        else ""
    )
    text = HEADER.format(
        json=json_name,
        command=data.get("command", "?"),
        settings=shown,
        cpu=env.get("cpu", "?"),
        threads=env.get("torch_threads", "?"),
        load=", ".join(f"{x:.1f}" for x in env.get("loadavg_at_start", [])),
        commit=str(git.get("commit", "?"))[:10],
        modified=" with local changes" if git.get("pyro_invres_modified") else "",
        partial=partial,
        equal_time=(
            f"`equal_time` gives every guide the CPU time the `{settings.get('time_ref', '?')}` "
            "guide took"
            if settings.get("equal_time", True)
            else "this run has no equal-time column (`--no-equal-time`)"
        ),
    )
    parts = [text]
    if data.get("merged_from"):  # split by guide, joined by merge_posteriors.py
        runs = "\n".join(_run_line(m) for m in data["merged_from"])
        parts.append(
            "The tables join runs made apart by `merge_posteriors.py` (same settings, "
            "different guides); times come from different moments of a shared machine, so "
            f"compare times within one run only:\n\n{runs}"
        )
    for name, res in data.get("models", {}).items():
        if "guides" not in res:  # skipped (e.g. no reference yet): say so
            why = res.get("skipped") or res.get("error") or "no results"
            parts.append(f"## {name}\n\nSkipped: {why}")
            continue
        # the page's sections are level 2 (the benchmark prints level-3 headings)
        parts.append(bench.vi_table(name, res["guides"]).replace("### ", "## ", 1))
        kept = {
            guide: row.get("equal_steps", {}).get("train", {}).get("schedule")
            for guide, row in res["guides"].items()
        }
        if len({v for v in kept.values() if v}) > 1:  # an --lr-grid run: say what each kept
            parts.append(
                "Schedule each guide kept (best ELBO on fresh draws): "
                + ", ".join(f"{g} {v}" for g, v in kept.items() if v)
                + "."
            )
        if "neutra" in res:
            parts.append(bench.neutra_table(name, res["neutra"]).replace("### ", "## ", 1))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--json",
        nargs="+",
        default=[
            str(HERE / "results" / "posteriors_grid_cpu.json"),
            str(HERE / "results" / "posteriors_lr_cpu.json"),
            str(HERE / "results" / "posteriors_lr_neutra_cpu.json"),
            str(HERE / "results" / "posteriors_cpu.json"),
            str(HERE / "results" / "posteriors_neutra_schools_cpu.json"),
            str(HERE / "results" / "posteriors_neutra_funnel_cpu.json"),
        ],
        help="result files, one section each (the first gives the page its title)",
    )
    p.add_argument("--doc", default=str(HERE.parent.parent / "docs" / "posterior_results.md"))
    args = p.parse_args(argv)
    pages = []
    for k, file in enumerate(args.json):
        path = Path(file)
        data = json.loads(path.read_text())
        try:
            name = str(path.resolve().relative_to(HERE.parent.parent))
        except ValueError:
            name = str(path)
        text = render(data, name)
        if k:  # later runs become sections of the first page
            title = "## A further run"
            if "lr_schedule" not in data.get("settings", {}):
                title += " (earlier: constant Adam rate, before the decaying schedule)"
            text = text.replace("# Variational posteriors: measured", title, 1)
            text = text.replace("\n## ", "\n### ").replace("### A further run", "## A further run")
        pages.append(text)
    Path(args.doc).write_text("\n".join(pages))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
