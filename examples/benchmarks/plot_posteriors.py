"""Figures of bench_posteriors.py's results: guide draws over the reference, and NeuTra's ESS.

    python examples/benchmarks/plot_posteriors.py [--json RUN.json] [--neutra-json A.json ...]

Reads the guide draws a run saved next to its JSON (``<run>_draws.npz``, unconstrained
coordinates) and the stored reference draws (``results/posterior_refs/``); nothing is
retrained. Writes, under ``--out-dir`` (default ``docs/_static/figures/``):

* ``posterior_pairs_eight_schools.png``: centred eight schools, one row per guide, the
  pairs ``(mu, log tau)``, ``(theta[0], log tau)``, ``(mu, theta[0])``: the guide's draws
  (colour) over the reference's (grey), with the guide's PSIS k-hat and ``log tau`` sd;
* ``posterior_pairs_funnel.png``: Neal's funnel, ``v`` against ``x_1``, one panel per guide;
* ``neutra_ess.png`` and ``neutra_ess_table.md.txt``: NeuTra-HMC against plain NUTS on each
  model of the ``--neutra-json`` files: minimum bulk ESS per 1,000 gradient evaluations,
  divergences, R-hat and the recovered neck scale (the table is Markdown, included by the
  tutorial; the ``.txt`` suffix keeps Sphinx from building it as a page of its own).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import markdown_table  # noqa: E402
from posterior_reference import load_reference  # noqa: E402

RESULTS = HERE / "results"
FIGURES = HERE.parent.parent / "docs" / "_static" / "figures"
SCHOOLS_PAIRS = [("mu", "log_tau"), ("theta[0]", "log_tau"), ("mu", "theta[0]")]
FUNNEL_PAIR = ("x[0]", "v")
LABELS = {"log_tau": "log tau", "theta[0]": "theta[0]", "x[0]": "x_1", "mu": "mu", "v": "v"}
#: each model's plotted window (reference draws beyond it are few and would squash the rest)
LIMITS = {
    "mu": (-12, 22),
    "log_tau": (-5, 4.5),
    "theta[0]": (-20, 45),
    "v": (-10, 10),
    "x[0]": (-30, 30),
}


def load_draws(run_json: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The run's results and the guide draws saved beside it."""
    data = json.loads(run_json.read_text())
    name = data.get("settings", {}).get("draws_file")
    if not name:
        raise FileNotFoundError(f"{run_json} saved no guide draws (run with --save-draws > 0)")
    with np.load(run_json.with_name(name)) as got:
        return data, {key: got[key] for key in got.files}


def _khat(res: dict, guide: str) -> float | None:
    return res["guides"][guide]["equal_steps"].get("metrics", {}).get("khat")


def _neck_sd(res: dict, guide: str, name: str) -> float | None:
    neck = res["guides"][guide]["equal_steps"].get("metrics", {}).get("neck", {})
    return neck.get(name, {}).get("sd")


def _scatter(ax: Any, ref: np.ndarray, got: np.ndarray, ix: int, iy: int, points: int) -> None:
    ax.scatter(ref[:points, ix], ref[:points, iy], s=2, c="0.7", lw=0, rasterized=True)
    ax.scatter(got[:points, ix], got[:points, iy], s=2, c="C3", alpha=0.5, lw=0, rasterized=True)


def _title(guide: str, res: dict, neck: str) -> str:
    khat, sd = _khat(res, guide), _neck_sd(res, guide, neck)
    parts = [guide]
    if khat is not None:
        parts.append(f"k-hat {khat:.2f}")
    if sd is not None:
        parts.append(f"{LABELS[neck]} sd {sd:.2f}")
    return ", ".join(parts)


def _saved(model: str, res: dict, draws: dict[str, np.ndarray]) -> tuple[Any, list[str], list[str]]:
    """The model's reference, the guides with saved draws (refusing none) and latent names."""
    guides = [g for g in res["guides"] if f"{model}/{g}" in draws]
    if not guides:
        raise ValueError(f"no saved draws for {model}")
    return load_reference(model), guides, [str(n) for n in draws[f"{model}/names"]]


def plot_schools(res: dict, draws: dict[str, np.ndarray], out: Path, points: int) -> Path:
    model = "eight_schools_centered"
    ref, guides, names = _saved(model, res, draws)
    fig, axes = plt.subplots(len(guides), 3, figsize=(7.5, 1.9 * len(guides)), squeeze=False)
    for row, guide in zip(axes, guides):
        got = draws[f"{model}/{guide}"]
        for ax, (x, y) in zip(row, SCHOOLS_PAIRS):
            _scatter(ax, ref.draws, got, names.index(x), names.index(y), points)
            ax.set_xlim(*LIMITS[x])
            ax.set_ylim(*LIMITS[y])
            ax.set_xlabel(LABELS[x], fontsize=7, labelpad=1)
            ax.set_ylabel(LABELS[y], fontsize=7, labelpad=1)
            ax.tick_params(labelsize=6, pad=1)
        row[1].set_title(_title(guide, res, "log_tau"), fontsize=8)
    ref_sd = ref.sd[ref.names.index("log_tau")]
    fig.suptitle(
        f"centred eight schools: guide draws (red) over the reference (grey; log tau sd "
        f"{ref_sd:.2f})",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985), h_pad=0.4, w_pad=0.4)
    path = out / "posterior_pairs_eight_schools.png"
    fig.savefig(path, dpi=60)  # seven rows of scatter: kept near 100 KB
    plt.close(fig)
    return path


def plot_funnel(res: dict, draws: dict[str, np.ndarray], out: Path, points: int) -> Path:
    model = "funnel"
    ref, guides, names = _saved(model, res, draws)
    cols = min(4, len(guides))
    rows = math.ceil(len(guides) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.3 * rows), squeeze=False)
    x, y = FUNNEL_PAIR
    for ax, guide in zip(axes.flat, guides):
        _scatter(ax, ref.draws, draws[f"{model}/{guide}"], names.index(x), names.index(y), points)
        ax.set_xlim(*LIMITS[x])
        ax.set_ylim(*LIMITS[y])
        ax.set_title(_title(guide, res, "v"), fontsize=7)
        ax.set_xlabel(LABELS[x], fontsize=7, labelpad=1)
        ax.set_ylabel(LABELS[y], fontsize=7, labelpad=1)
        ax.tick_params(labelsize=6, pad=1)
    for ax in list(axes.flat)[len(guides) :]:
        ax.axis("off")
    fig.suptitle("funnel (10-D): guide draws (red) over exact draws (grey; v sd 3)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=0.5, w_pad=0.4)
    path = out / "posterior_pairs_funnel.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def neutra_rows(files: list[Path]) -> list[dict[str, Any]]:
    """One row per (model, sampler) of the NeuTra results in ``files``."""
    rows = []
    for file in files:
        data = json.loads(file.read_text())
        for model, res in data.get("models", {}).items():
            for sampler, r in res.get("neutra", {}).items():
                rows.append({"model": model, "sampler": sampler, "file": file.name, **r})
    return rows


def neutra_table(rows: list[dict[str, Any]]) -> str:
    headers = ["model", "sampler", "min bulk ESS", "ESS / 1k grad", "ESS / CPU s"]
    headers += ["divergences", "max R-hat", "neck sd (ref)"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["model"], r["sampler"], "failed: " + r["error"]] + [""] * 5)
            continue
        neck = "; ".join(f"{k} {v['sd']:.2f} ({v['ref_sd']:.2f})" for k, v in r["neck"].items())
        lines.append(
            [
                r["model"],
                r["sampler"],
                f"{r['min_bulk_ess']:.0f}",
                f"{1000 * r['ess_per_grad']:.2f}",
                f"{r['ess_per_s']:.2f}",
                r["divergences"],
                f"{r['max_rhat']:.3f}",
                neck,
            ]
        )
    return markdown_table(headers, lines)


def plot_neutra(rows: list[dict[str, Any]], out: Path) -> Path:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 2.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and "error" not in r]
        values = [1000 * r["ess_per_grad"] for r in mine]
        bars = ax.bar(range(len(mine)), values, color=[f"C{k}" for k in range(len(mine))])
        for bar, r in zip(bars, mine):
            ax.annotate(
                f"{r['divergences']} div.",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xticks(range(len(mine)), [r["sampler"] for r in mine], fontsize=7, rotation=15)
        ax.set_ylabel("min bulk ESS / 1k gradients", fontsize=7)
        ax.set_title(model, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.margins(y=0.15)
    fig.tight_layout()
    path = out / "neutra_ess.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=str(RESULTS / "posteriors_lr_cpu.json"))
    p.add_argument(
        "--neutra-json",
        nargs="*",
        default=[str(RESULTS / "posteriors_lr_neutra_cpu.json")],
    )
    p.add_argument("--out-dir", default=str(FIGURES))
    p.add_argument("--points", type=int, default=800, help="draws per scatter (each side)")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        res, draws = load_draws(Path(args.json))
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    written = []
    models = res.get("models", {})
    if "guides" in models.get("eight_schools_centered", {}):
        written.append(plot_schools(models["eight_schools_centered"], draws, out, args.points))
    if "guides" in models.get("funnel", {}):
        written.append(plot_funnel(models["funnel"], draws, out, args.points))
    rows = neutra_rows([Path(f) for f in args.neutra_json])
    if rows:
        written.append(plot_neutra(rows, out))
        table = out / "neutra_ess_table.md.txt"
        files = dict.fromkeys(r["file"] for r in rows)
        sources = ", ".join(f"`examples/benchmarks/results/{f}`" for f in files)
        table.write_text(neutra_table(rows) + f"\n\nFrom {sources}.\n")
        written.append(table)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
