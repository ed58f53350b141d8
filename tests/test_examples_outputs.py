"""The example scripts write result files only where asked (``--save`` or ``--out DIR``)."""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


@pytest.fixture(scope="module")
def common():
    return load("examples_common", EXAMPLES / "_common.py")


def outputs_for(common, argv, results):
    parser = argparse.ArgumentParser()
    common.add_run_arguments(parser, results)
    return common.run_outputs(parser, parser.parse_args(argv), results, "figure.png")


@pytest.mark.parametrize("argv", [[], ["--quick"], ["--seed", "3", "--threads", "2"]])
def test_without_save_or_out_nothing_is_written(common, argv):
    results = EXAMPLES / "results" / "example.json"
    assert outputs_for(common, argv, results) is None


def test_out_puts_figure_and_json_under_it_with_quick_too(common, tmp_path):
    results = EXAMPLES / "results" / "example.json"
    outputs = outputs_for(common, ["--quick", "--out", str(tmp_path)], results)
    assert outputs.figure == tmp_path / "figure.png"
    assert outputs.results == tmp_path / "example.json"


def test_save_records_where_the_docs_read(common):
    results = EXAMPLES / "results" / "example.json"
    outputs = outputs_for(common, ["--save"], results)
    assert outputs.figure == ROOT / "docs" / "_static" / "figures" / "figure.png"
    assert outputs.results == results
    assert common.shown(outputs.figure) == "docs/_static/figures/figure.png"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--save", "--quick"], "a --quick smoke test is not one"),
        (["--save", "--out", "x"], "not allowed with argument"),
    ],
)
def test_save_is_refused_with_quick_or_out(common, capsys, argv, message):
    with pytest.raises(SystemExit):
        outputs_for(common, argv, EXAMPLES / "results" / "example.json")
    assert message in capsys.readouterr().err


def test_write_results_without_outputs_says_so_and_writes_nothing(common, capsys, tmp_path):
    assert common.write_results(None, {"a": 1}, 2.0) is None
    assert "nothing written" in capsys.readouterr().out
    written = common.write_results(
        common.Outputs(tmp_path / "f.png", tmp_path / "sub" / "r.json"), {"a": 1}, 2.0
    )
    assert written.read_text() == '{\n  "a": 1\n}\n'


def test_digits_refuses_save_with_quick(capsys):
    pytest.importorskip("sklearn")
    digits = load("examples_digits_outputs", EXAMPLES / "digits.py")
    with pytest.raises(SystemExit):
        digits.parse_args(["--save", "--quick"])
    assert "--quick smoke run is not one" in capsys.readouterr().err
    assert not digits.parse_args(["--quick"]).save


def repo_state():
    """The tracked result files' modification times (what an example could rewrite)."""
    paths = [*(EXAMPLES / "results").glob("*"), *(ROOT / "docs" / "_static" / "figures").glob("*")]
    return {p: p.stat().st_mtime_ns for p in paths}


@pytest.mark.slow
def test_vi_posteriors_quick_writes_nothing_and_states_its_targets(tmp_path):
    before = repo_state()
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "vi_posteriors.py"), "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "NOT met" not in run.stdout
    assert "ELBO gain over AutoNormal: target >= 0.1, got " in run.stdout
    assert "|log Z error|: target <= 0.05, got " in run.stdout
    assert "nothing written" in run.stdout
    assert repo_state() == before
    assert not any(tmp_path.iterdir())
