"""merge_posteriors.py and plot_posteriors.py on small runs of bench_posteriors.py."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import restored_threads_and_param_store  # noqa: F401  (the fixture)

BENCH = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_posteriors as bp  # noqa: E402
import merge_posteriors as mp  # noqa: E402
import plot_posteriors as pp  # noqa: E402

pytestmark = pytest.mark.usefixtures("restored_threads_and_param_store")


def quick_run(path: Path, guides: list[str], steps: int = 3) -> Path:
    argv = ["--quick", "--models", "funnel", "eight_schools_centered", "--guides", *guides]
    argv += ["--steps", str(steps), "--draws", "200", "--save-draws", "120", "--no-equal-time"]
    bp.main(argv + ["--out", str(path)])
    return path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return quick_run(tmp / "a.json", ["normal"]), quick_run(tmp / "b.json", ["iaf"])


def test_merge_joins_guides_and_draws_and_refuses_what_does_not_compare(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "merged.json"
    mp.main([str(a), str(b), "--out", str(out)])
    merged = json.loads(out.read_text())
    for model in ("funnel", "eight_schools_centered"):
        assert list(merged["models"][model]["guides"]) == ["normal", "iaf"]
    assert [m["file"] for m in merged["merged_from"]] == [str(a), str(b)]
    draws = np.load(tmp_path / merged["settings"]["draws_file"])
    assert draws["funnel/iaf"].shape == (120, 10) and draws["funnel/normal"].shape == (120, 10)
    with pytest.raises(SystemExit):  # the same guide twice
        mp.main([str(a), str(a), "--out", str(tmp_path / "twice.json")])
    runs = [json.loads(a.read_text()), json.loads(b.read_text())]
    runs[1]["settings"]["lr_schedule"] = ["0.01 constant"]
    with pytest.raises(ValueError, match="lr_schedule"):
        mp.merge(runs)


def test_plots_and_the_neutra_table_are_written(two_runs, tmp_path):
    a, _ = two_runs
    neutra = {
        "models": {
            "funnel": {
                "neutra": {
                    "nuts": {
                        "min_bulk_ess": 40.0,
                        "ess_per_grad": 4e-4,
                        "ess_per_s": 0.5,
                        "divergences": 3,
                        "max_rhat": 1.01,
                        "neck": {"v": {"sd": 2.5, "ref_sd": 3.0}},
                    },
                    "neutra-iaf": {"error": "guide not trained"},
                }
            }
        }
    }
    nfile = tmp_path / "neutra.json"
    nfile.write_text(json.dumps(neutra))
    figs = tmp_path / "figs"
    pp.main(["--json", str(a), "--neutra-json", str(nfile), "--out-dir", str(figs)])
    for name in ("posterior_pairs_eight_schools.png", "posterior_pairs_funnel.png"):
        assert (figs / name).stat().st_size > 1000
    assert (figs / "neutra_ess.png").exists()
    table = (figs / "neutra_ess_table.md.txt").read_text()
    assert "| funnel | nuts | 40 | 0.40 | 0.50 | 3 | 1.010 | v 2.50 (3.00) |" in table
    assert "failed: guide not trained" in table


def test_a_run_without_saved_draws_is_refused(tmp_path):
    run = tmp_path / "none.json"
    run.write_text(json.dumps({"settings": {"draws_file": None}, "models": {}}))
    with pytest.raises(SystemExit):
        pp.main(["--json", str(run), "--out-dir", str(tmp_path)])


def _neutra_run(guide: str, rows: list[str], chains: int = 4) -> dict:
    return {
        "settings": {"steps": 5, "neutra": {"chains": chains, "warmup": 3, "draws": 3}},
        "models": {"m": {"guides": {guide: {}}, "neutra": {r: {"ok": r} for r in rows}}},
    }


def test_merge_joins_neutra_rows_of_a_run_without_plain_nuts():
    runs = [_neutra_run("iaf", ["nuts", "neutra-iaf"]), _neutra_run("residual", ["neutra-r"])]
    merged = mp.merge(runs[::-1])
    assert list(merged["models"]["m"]["neutra"]) == ["nuts", "neutra-r", "neutra-iaf"]
    assert "neutra" not in mp.merge(runs, drop_neutra=True)["models"]["m"]
    with pytest.raises(ValueError, match="neutra"):  # different chains do not compare
        mp.merge([runs[0], _neutra_run("residual", ["neutra-r"], chains=2)])
    with pytest.raises(ValueError, match="two runs"):
        mp.merge([runs[0], _neutra_run("residual", ["neutra-iaf"])])
