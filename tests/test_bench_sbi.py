"""Smoke test of examples/benchmarks/bench_sbi.py --quick (needs sbibm and zuko)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark

pytest.importorskip("sbibm", reason="bench_sbi needs sbibm (pip install --no-deps sbibm)")
pytest.importorskip("zuko", reason="bench_sbi compares against zuko's flows")


def _load():
    return load_benchmark("bench_sbi")


def test_quick_mode_writes_scored_results(tmp_path: Path) -> None:
    bench = _load()
    out = tmp_path / "sbi.json"
    models = ["zuko_nsf", "ours_residual"]
    bench.main(["--quick", "--tasks", "two_moons", "--models", *models, "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["env"]["torch_threads"] >= 1
    assert {(r["task"], r["model"]) for r in data["results"]} == {("two_moons", m) for m in models}
    for record in data["results"]:
        assert record["budget"] == 300 and record["epochs"] <= 5
        assert 0.4 <= record["c2st_mean"] <= 1.0, record
        assert record["n_params"] > 0 and record["train_time_s"] > 0
        assert record["sampling_time_s"] > 0
        (obs,) = record["observations"]
        assert obs["observation"] == 1 and obs["non_finite"] == 0
        assert obs["outside_support"] == 0  # samples are mapped into the prior's box
    # results of several runs merge: a later file replaces an entry of the same key
    later = dict(
        data, results=[dict(data["results"][0], c2st_mean=0.5), {**data["results"][1], "seed": 7}]
    )
    other = tmp_path / "later.json"
    other.write_text(json.dumps(later))
    records = bench.merge_records([out, other])
    assert len(records) == 3
    replaced = [r for r in records if _same(r, data["results"][0])]
    assert [r["c2st_mean"] for r in replaced] == [0.5]
    table = bench.render(records)
    assert "two_moons" in table and "zuko_nsf" in table and "ours_residual" in table


def _same(a, b):
    return all(a[k] == b[k] for k in ("task", "budget", "model", "seed"))


def test_observation_ranges() -> None:
    bench = _load()
    assert bench.parse_observations("1-3") == [1, 2, 3]
    assert bench.parse_observations("2,5-6") == [2, 5, 6]
    with pytest.raises(SystemExit, match="1..10"):
        bench.parse_observations("0-11")
