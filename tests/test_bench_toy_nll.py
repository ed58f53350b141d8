"""The toy-NLL benchmark (examples/benchmarks/bench_toy_nll.py) and its floors (toy_entropy.py)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "examples" / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def entropy():
    return _load("toy_entropy")


@pytest.fixture(scope="module")
def bench():
    return _load("bench_toy_nll")


SLOW_DENSITY = pytest.mark.slow  # quadrature or root finding at 14,400 grid points: 2-10 s
SETS = [
    "8gaussians",
    "checkerboard",
    pytest.param("2spirals", marks=SLOW_DENSITY),
    "moons",
    "rings",
    pytest.param("pinwheel", marks=SLOW_DENSITY),
    "circles",
    "swissroll",
]


@pytest.mark.parametrize("name", SETS)
def test_each_log_density_integrates_to_one(entropy, name):
    # a wrong constant, a missing Jacobian or a lost mode moves the integral off 1
    edge, cells = 6.0, 120
    side = torch.linspace(-edge, edge, cells + 1, dtype=torch.float64)
    mid = (side[:-1] + side[1:]) / 2
    grid = torch.cartesian_prod(mid, mid)
    total = entropy.log_density(name, grid).exp().sum() * (2 * edge / cells) ** 2
    assert float(total) == pytest.approx(1.0, abs=1e-5)


def test_log_density_refuses_bad_input(entropy):
    with pytest.raises(ValueError, match="unknown toy data set 'ring'"):
        entropy.log_density("ring", torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"shape \(N, 2\), got \(3, 3\)"):
        entropy.log_density("rings", torch.zeros(3, 3))


@pytest.mark.slow
def test_floors_agree_with_independent_estimates(entropy):
    # independent Monte-Carlo values (other code, other samples), with their errors
    published = {
        "8gaussians": (2.834, 0.002),
        "rings": (2.624, 0.002),
        "circles": (3.267, 0.002),
        "moons": (2.393, 0.003),
        "swissroll": (2.666, 0.003),
        "2spirals": (2.646, 0.003),
        "pinwheel": (2.310, 0.02),
    }
    for name, (value, err) in published.items():
        floor = entropy.entropy_floor(name, n=20_000)
        tolerance = 4 * math.hypot(err, floor["stderr"])
        assert abs(floor["entropy"] - value) < tolerance, (name, floor, value)


def test_choose_takes_the_lowest_validation_nll_and_skips_failures(bench):
    runs = [
        {"lr": 1e-2, "status": "failed", "why": "non-finite loss"},
        {"lr": 5e-3, "status": "ok", "val_nll": 2.5, "test_nll": 2.4},
        {"lr": 2.5e-3, "status": "ok", "val_nll": 2.45, "test_nll": 2.47},
    ]
    assert bench.choose(runs)["lr"] == 2.5e-3  # validation decides, not the test score
    assert bench.choose(runs[:1]) is None


def _saved(bench, ours_nll: float) -> dict:
    def entry(*nlls):
        return {
            "runs": [
                {"lr": lr, "status": "ok", "val_nll": v, "test_nll": v, "wall_time": 1.0}
                for lr, v in zip((5e-3, 1e-2), nlls, strict=True)
            ]
        }

    return {
        "results": {
            "rings": {
                "ours": entry(ours_nll + 0.01, ours_nll),
                "pyro-affine x8": entry(3.4, 3.5),
                "pyro-spline x4": entry(2.9, 2.95),
            }
        },
        "floors": {"rings": {"entropy": 2.62, "p_test_nll": 2.624, "stderr": 0.002, "n": 50_000}},
        "default_lr": 1e-2,
        "lrs": [5e-3, 1e-2],
        "steps": 10,
        "batch_size": 256,
        "n_train": 100,
        "n_test": 100,
        "n_val": 100,
        "lr_final": 0.1,
        "commands": [[]],
        "date": "today",
        "commit": "abc",
        "environment": {"torch": "t", "pyro": "p", "threads": 1, "cpu": "c"},
    }


def test_page_reports_gaps_and_misses(bench):
    page = bench.render(_saved(bench, 2.774))
    row = next(line for line in page.splitlines() if line.startswith("| rings | 2.620 | 2.624"))
    assert "2.774 (+0.150)" in row and "2.900 (+0.276) @ 0.005" in row
    assert row.endswith("| -0.126 | no |")
    assert "misses the 0.03-nat goal on 1 of 1 sets: rings by 0.120" in page
    met = bench.render(_saved(bench, 2.650))
    assert "within 0.03 nats of the floor on every set" in met


def test_partial_runs_never_write_the_tracked_results(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "tracked.json")
    args = bench._parser().parse_args(["--quick"])
    out, doc = bench._destinations(args, full=False)
    assert out != bench.RESULTS and doc != bench.DOC
    args = bench._parser().parse_args(["--sets", "rings", "--merge"])
    assert bench._destinations(args, full=False)[0] == bench.RESULTS


@pytest.mark.slow
def test_quick_run_then_render_only(bench, tmp_path, monkeypatch):
    out, doc = tmp_path / "r.json", tmp_path / "r.md"
    fake = {"entropy": 2.4, "p_test_nll": 2.4, "n": 1}
    monkeypatch.setattr(bench, "floors", lambda sets, seed: {s: fake for s in sets})
    argv = ["--quick", "--sets", "moons", "--steps", "3", "--out", str(out), "--doc", str(doc)]
    saved = bench.main(argv)
    runs = saved["results"]["moons"]["ours"]["runs"]
    assert [r["lr"] for r in runs] == sorted({*bench.QUICK["lrs"], bench.DEFAULTS["lr"]})
    assert json.loads(out.read_text())["commands"] == [argv]
    page = doc.read_text()
    doc.unlink()
    bench.main(["--render-only", "--out", str(out), "--doc", str(doc)])
    assert doc.read_text() == page


@pytest.mark.slow
def test_ours_at_the_default_lr_is_the_pyro_invres_fit_run(bench, tmp_path):
    # the table's `pyro-invres fit` column must be that command's run, bit for bit
    from pyro_invres.cli import DEFAULTS
    from pyro_invres.cli import main as cli_main

    cli_main(["fit", "--out", str(tmp_path / "run"), "--steps", "8", "--quiet"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    run = bench.train_one("ours", DEFAULTS["dataset"], DEFAULTS["lr"], 8, DEFAULTS["seed"])
    assert run["test_nll"] == metrics["test_nll"]
