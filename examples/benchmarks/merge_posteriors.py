"""Merge bench_posteriors.py runs that trained different guides on the same models.

    python examples/benchmarks/merge_posteriors.py A.json B.json --out merged.json

A run can be split by guide (``--guides``) so that parts run at different times, e.g.
Pyro's guides while the project's own guide is still changing. The merge refuses runs whose
training and scoring settings differ (steps, draws, particles, seed, learning-rate schedule,
equal-time column, metric backend): their numbers would not be comparable. A guide that two
runs both trained is refused too. Wall and CPU times come from different moments of a shared
machine: compare them within one run only (``merged_from`` lists each run's command, date,
commit and load). The side files of draws (``<run>_draws.npz``) are merged the same way.

Example:
    >>> a = {"settings": {"steps": 5}, "models": {"m": {"guides": {"x": {}}}}}
    >>> b = {"settings": {"steps": 5}, "models": {"m": {"guides": {"y": {}}}}}
    >>> sorted(merge([a, b])["models"]["m"]["guides"])
    ['x', 'y']
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402

#: settings that must agree for two runs' metrics to sit in one table
#: (the NeuTra rows of runs made with --no-nuts join a run that has plain NUTS)
SAME = (
    "optimizer",
    "lr_schedule",
    "particles",
    "steps",
    "draws",
    "seed",
    "equal_time",
    "metric_backend",
    "log_q",
    "saved_draws",
)


#: NeuTra settings that must agree where two runs both ran NUTS
NEUTRA_SAME = ("chains", "warmup", "draws", "max_tree_depth")


def merge(
    runs: list[dict[str, Any]], names: list[str] | None = None, drop_neutra: bool = False
) -> dict[str, Any]:
    """One result dict with every run's guides per model (see the module docstring)."""
    if not runs:
        raise ValueError("nothing to merge")
    names = names or [f"run {k}" for k in range(len(runs))]
    first = runs[0].get("settings", {})
    for name, run in zip(names[1:], runs[1:]):
        settings = run.get("settings", {})
        differ = [k for k in SAME if settings.get(k) != first.get(k)]
        mcmc = [settings.get("neutra"), first.get("neutra")]
        if all(mcmc) and any(mcmc[0].get(k) != mcmc[1].get(k) for k in NEUTRA_SAME):
            differ.append("neutra")
        if differ:
            raise ValueError(f"{name}: settings differ from {names[0]}'s: {differ}")
    out = copy.deepcopy(runs[0])
    out["command"] = " ; ".join(run.get("command", "?") for run in runs)
    out["partial"] = any(run.get("partial") for run in runs)
    out["merged_from"] = [
        {
            "file": name,
            "command": run.get("command"),
            "date": run.get("date"),
            "git": run.get("git"),
            "loadavg_at_start": run.get("env", {}).get("loadavg_at_start"),
            "wall_s": run.get("wall_s"),
        }
        for name, run in zip(names, runs)
    ]
    for name, run in zip(names[1:], runs[1:]):
        for model, res in run.get("models", {}).items():
            have = out["models"].get(model)
            if have is None or "guides" not in have:  # new here, or skipped before
                out["models"][model] = copy.deepcopy(res)
                continue
            if "guides" not in res:  # skipped in this run
                continue
            both = set(have["guides"]) & set(res["guides"])
            if both:
                raise ValueError(f"{name}: guides {sorted(both)} on {model} are in two runs")
            have["guides"].update(copy.deepcopy(res["guides"]))
            both = set(have.get("neutra", {})) & set(res.get("neutra", {}))
            if both:
                raise ValueError(f"{name}: NeuTra rows {sorted(both)} on {model} are in two runs")
            if "neutra" in res:
                have.setdefault("neutra", {}).update(copy.deepcopy(res["neutra"]))
    neutra = next((r["settings"]["neutra"] for r in runs if r["settings"].get("neutra")), None)
    out["settings"]["neutra"] = None if drop_neutra else neutra
    for res in out["models"].values():
        if drop_neutra:
            res.pop("neutra", None)
        elif "nuts" in res.get("neutra", {}):  # plain NUTS first, as bench_posteriors writes
            res["neutra"] = {"nuts": res["neutra"].pop("nuts"), **res["neutra"]}
    return out


def merge_draws(paths: list[Path]) -> dict[str, np.ndarray]:
    """The side files' arrays together; a guide's draws may come from one file only."""
    merged: dict[str, np.ndarray] = {}
    for path in paths:
        with np.load(path) as got:
            for key in got.files:
                if key in merged and not key.endswith("/names"):
                    raise ValueError(f"{path}: {key} is in two draw files")
                merged[key] = got[key]
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="result JSON files of bench_posteriors.py")
    p.add_argument("--out", required=True, help="merged JSON (its draws go next to it)")
    p.add_argument("--drop-neutra", action="store_true", help="variational results only")
    p.add_argument("--no-draws", action="store_true", help="leave the guide draws out")
    args = p.parse_args(argv)
    paths = [Path(r) for r in args.runs]
    try:
        runs = [json.loads(path.read_text()) for path in paths]
        data = merge(runs, [str(x) for x in paths], args.drop_neutra)
        out = Path(args.out)
        sides = [x.with_name(x.stem + "_draws.npz") for x in paths]
        draws = {} if args.no_draws else merge_draws([x for x in sides if x.exists()])
    except (ValueError, OSError) as err:
        p.error(str(err))
    data["settings"]["draws_file"] = None
    if draws:
        side = out.with_name(out.stem + "_draws.npz")
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(side, **draws)
        data["settings"]["draws_file"] = side.name
    print(f"wrote {write_json(data, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
