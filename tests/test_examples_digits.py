"""The digits example (examples/digits.py): a smoke run and the bits/dim accounting."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits.py"


@pytest.fixture(scope="module")
def digits():
    spec = importlib.util.spec_from_file_location("examples_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_uniform_model_scores_log2_17(digits):
    # the uniform density on [0, 1]^64, written in logit space with Pyro's transforms,
    # through the script's log-Jacobian and bits_per_dim: exactly log2(17) bits/dim
    y = digits.load_digits("test", dequantize=True, seed=1)
    assert digits.uniform_sanity_check(y) == pytest.approx(math.log2(17), abs=1e-9)


def test_logit_jacobian_matches_autograd(digits):
    y = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    _, ladj = digits.to_logit(y)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: digits.to_logit(v)[0], y[i : i + 1])
        expected = torch.linalg.slogdet(jac.reshape(64, 64)).logabsdet
        assert float(ladj[i]) == pytest.approx(float(expected), abs=1e-9)
    assert torch.allclose(digits.from_logit(digits.to_logit(y)[0]), y, atol=1e-12)


def test_histogram_continuous_equals_discrete(digits):
    # a density constant on the 17^64 bins: the continuous bits/dim is the discrete one
    hist = digits.PixelHistogram(digits.load_digits("train", dequantize=False))
    y = digits.load_digits("test", dequantize=True, seed=3).double()
    continuous = digits.bpd_of(digits.log_prob_y(hist.log_prob_z, y))
    discrete = float(-hist.log_prob_levels(y).mean() / (64 * math.log(2.0)))
    assert continuous == pytest.approx(discrete, abs=1e-9)
    assert 1.0 < discrete < math.log2(17)


def test_quick_run_writes_every_model(digits, tmp_path):
    result = digits.main(["--quick", "--steps", "4", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "examples" / "results" / "digits.json").read_text())
    assert set(saved["models"]) == set(digits.MODELS)
    for name, row in saved["models"].items():
        assert math.isfinite(row["test_bpd"]), name
        assert 0.0 < row["test_bpd"] < 20.0, name
        assert row["steps"] == 4
        assert row["train_s"] > 0 and row["eval_s"] > 0
    assert saved["models"]["residual_flow"]["logdet_test"] == "exact"
    checks = saved["sanity_checks"]
    assert checks["uniform_bpd"] == pytest.approx(math.log2(17), abs=1e-9)
    assert checks["histogram_bpd_continuous"] == pytest.approx(
        checks["histogram_bpd_discrete"], abs=1e-9
    )
    assert result["models"].keys() == saved["models"].keys()
    doc = (tmp_path / "docs" / "digits.md").read_text()
    for name in digits.MODELS:
        assert f"{saved['models'][name]['test_bpd']:.3f}" in doc
    assert "python examples/digits.py --quick" in doc
    figures = tmp_path / "docs" / "_static" / "figures"
    assert (figures / "digits_samples.png").stat().st_size > 0
    assert (figures / "digits_training.png").stat().st_size > 0
