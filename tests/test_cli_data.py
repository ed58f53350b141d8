"""The command line on the user's own data, and its hygiene (issue 17, items 1-3).

* ``fit --data FILE`` (.npy, .csv, .pt; any D) end to end: a seeded held-out split,
  standardisation stored in the checkpoint, ``sample`` in data units, ``evaluate`` and
  ``metrics.json`` in data units (standardised NLL + sum(log std)).
* Hygiene: no abbreviations, ``--version``, defaults and help for every option, choices,
  nothing created before every option is checked, one-line errors, clamps said aloud,
  ``--help`` without torch.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_invres import cli
from pyro_invres.checkpoint import load_standardization, save_checkpoint
from pyro_invres.cli import DEFAULTS, main
from pyro_invres.data_files import Standardization, check_table, load_data, split_data
from pyro_invres.evaluation import evaluate_nll, make_density
from pyro_invres.flows import build_flow
from pyro_invres.train import fit_density, load_checkpoint, load_flow
from tests.helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "8", "--num-blocks", "1", "--hidden", "8", "--quiet", "--eval-every", "4"]
#: 5-D data far from 0 and 1 in every column: a sample in standardised units is obviously wrong
MEAN = np.array([100.0, -50.0, 3.0, 0.0, 1000.0])
SCALE = np.array([2.0, 15.0, 300.0, 0.2, 12.0])


def five_d(n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.eye(5) + 0.3 * rng.normal(size=(5, 5))
    return (rng.normal(size=(n, 5)) @ mixing) * SCALE + MEAN


class Figures:
    """Records every figure the command line saves (its title, axes, colour-bar label)."""

    def __init__(self) -> None:
        self.saved: dict[str, object] = {}

    def __call__(self, path: Path, figure) -> None:
        self.saved[Path(path).name] = figure
        cli._write(Path(path), lambda handle: handle.write(b"\x89PNG recorded"))

    def title(self, name: str) -> str:
        figure = self.saved[name]
        return figure._suptitle.get_text() if figure._suptitle else figure.axes[0].get_title()


@pytest.fixture
def figures(monkeypatch) -> Figures:
    pytest.importorskip("matplotlib")
    record = Figures()
    monkeypatch.setattr(cli, "_save_figure", record)
    return record


@pytest.fixture
def quick_plots(monkeypatch):
    """Stand-in plots (drawing them takes most of a few-step fit's time)."""

    def plot(path, *args, **kwargs):
        cli._write(path, lambda handle: handle.write(b"\x89PNG stand-in"))

    for name in ("_plot_density", "_plot_samples", "_plot_loss"):
        monkeypatch.setattr(cli, name, plot)


@pytest.fixture(scope="module")
def npy_run(tmp_path_factory):
    """A 5-D .npy file fitted for a few steps; plots drawn for real."""
    pytest.importorskip("matplotlib")
    root = tmp_path_factory.mktemp("npy")
    np.save(root / "x.npy", five_d())
    out = root / "run"
    assert main(["fit", "--data", str(root / "x.npy"), *SMALL, "--out", str(out)]) == 0
    return root, out


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """A 3-column .csv with a header row, fitted for a few steps."""
    pytest.importorskip("matplotlib")
    root = tmp_path_factory.mktemp("csv")
    header = "height,weight,age"
    np.savetxt(root / "x.csv", five_d()[:, :3], delimiter=",", header=header, comments="")
    out = root / "run"
    argv = ["fit", "--data", str(root / "x.csv"), *SMALL, "--out", str(out)]
    assert main([*argv, "--test-fraction", "0.25", "--test-seed", "3"]) == 0
    return root, out


# -- the registries the parser mirrors (it imports no torch to build) -------------------------
def test_choices_and_defaults_mirror_the_library():
    from pyro_invres.data_files import DATA_SUFFIXES
    from pyro_invres.datasets import TOY_DATASETS
    from pyro_invres.flows import FLOWS, PRESETS
    from pyro_invres.nn.activations import ACTIVATIONS
    from pyro_invres.nn.lipschitz_mlp import SPLITS
    from pyro_invres.ops.fixed_point import SolverName
    from pyro_invres.train import FIT_DEFAULTS

    assert cli._FLOWS == FLOWS and cli._TOY_DATASETS == TOY_DATASETS
    assert set(cli._ACTIVATIONS) == set(ACTIVATIONS) and cli._SPLITS == SPLITS
    assert set(cli._SOLVERS) == set(typing.get_args(SolverName))
    assert cli._DATA_SUFFIXES == DATA_SUFFIXES
    for key in ("steps", "batch_size", "lr", "lr_final", "eval_every"):
        assert DEFAULTS[key] == FIT_DEFAULTS[key], key
    preset = PRESETS["iresnet-2d"]
    options = {k: v for k, v in cli.flow_options().items()}
    assert options["hidden_dims"] == list(preset["hidden_dims"])
    for key in ("num_blocks", "activation", "lipschitz", "split", "solver"):
        assert options[key] == preset[key], key
    assert options["activation_kwargs"] == dict(preset["activation_kwargs"])


def test_help_needs_no_torch():
    """Building the parser and printing help imports no torch, Pyro, NumPy or matplotlib
    (the package's own __init__ is bypassed: it imports torch for the Python API)."""
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('pyro_invres'); pkg.__path__ = [{str(ROOT / 'pyro_invres')!r}]\n"
        "sys.modules['pyro_invres'] = pkg\n"
        "from pyro_invres.cli import main\n"
        "for argv in (['--help'], ['fit', '--help'], ['sample', '--help'], "
        "['evaluate', '--help']):\n"
        "    assert main(argv) == 0\n"
        "heavy = [m for m in ('torch', 'pyro', 'numpy', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--data FILE" in done.stdout and "(default: 1200)" in done.stdout


# -- hygiene -----------------------------------------------------------------------------------
def test_every_option_has_help_and_says_its_default(capsys):
    parser = cli._parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them there
    for name, sub in commands.items():
        assert not sub.allow_abbrev, name
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            text = sub.formatter_class(prog="x")._get_help_string(action)
            if action.default is not None and action.default is not False:
                assert "(default: %(default)s)" in text, (name, action.option_strings)
            elif action.default is None and not action.required and action.nargs != 0:
                if action.dest not in ("data", "device"):
                    assert "default" in text, (name, action.option_strings)
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    for needle in ("(default: 1200)", "--force", "{equal,learned}", "(default: sine)"):
        assert needle in out, needle


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    from pyro_invres import __version__

    assert out.startswith(f"pyro-invres {__version__} (torch {torch.__version__.split('+')[0]}")
    assert "pyro-ppl" in out and "Python" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["fit", "--dat", "x.npy"], "did you mean --data or --dataset?"),  # was --dataset
        (["fit", "--data-set", "moons"], "--data-set"),
        (["fit", "--step", "5"], "--step"),
        (["evaluate", "--check", "c.pt"], "required: --checkpoint"),
        (["sample", "--checkpoint", "c.pt", "--ou", "s.npy"], "required: --out"),
        (["sample", "--checkpoint", "c.pt", "--out", "s.npy", "--se", "1"], "did you mean --seed?"),
    ],
)
def test_abbreviations_are_refused(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, argv, needle, "see 'pyro-invres", status=2)
    assert list(tmp_path.iterdir()) == []


def test_data_is_not_a_data_set_name(tmp_path, capsys):
    out = tmp_path / "out"
    one_line_error(capsys, ["fit", "--data", "moons", "--out", str(out)], "moons", ".npy")
    one_line_error(
        capsys, ["fit", "--dataset", "moons", "--data", "x.npy"], "not allowed", status=2
    )
    assert not out.exists()


def refused(tmp_path: Path, data: Path) -> list[tuple[list[str], str]]:
    return [
        (["--beta", "3"], "--beta applies to --activation lipswish or clipswish"),
        (["--omega", "3", "--activation", "elu"], "--omega applies to --activation sine"),
        (["--flow", "revnet", "--activation", "elu"], "--activation applies to --flow iresnet"),
        (["--lipschitz", "1.5"], "--lipschitz"),
        (["--hidden", "8,x"], "--hidden"),
        (["--steps", "0"], "--steps"),
        (["--eval-every", "0"], "--eval-every"),
        (["--device", "meta"], "meta"),
        (["--data", str(data), "--n-train", "50"], "--n-train applies to --dataset only"),
        (["--data", str(data), "--test-fraction", "1.5"], "--test-fraction"),
        (["--test-seed", "1"], "--test-seed applies to --data only"),
        (["--test-fraction", "0.1"], "--test-fraction applies to --data only"),
        (["--data", str(tmp_path / "missing.npy")], "no data file"),
        (["--data", str(tmp_path / "x.txt")], ".npy, .csv, .pt"),
        (["--data", str(tmp_path / "bad.npy")], "NaN"),
        (["--data", str(tmp_path / "flat.npy")], "shape (50,)"),
        (["--data", str(tmp_path / "one.npy"), "--flow", "revnet"], "input_dim >= 2"),
    ]


def test_a_refused_fit_leaves_no_directory(tmp_path, capsys):
    data = tmp_path / "x.npy"
    np.save(data, five_d(50))
    bad = five_d(50)
    bad[7, 2] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    np.save(tmp_path / "flat.npy", five_d(50)[:, 0])
    np.save(tmp_path / "one.npy", five_d(50)[:, :1])
    (tmp_path / "x.txt").write_text("1 2\n")
    for extra, needle in refused(tmp_path, data):
        out = tmp_path / "out" / "nested"
        one_line_error(capsys, ["fit", *SMALL, *extra, "--out", str(out)], needle)
        assert not (tmp_path / "out").exists(), extra


def test_force_is_overwrite(tmp_path, capsys, quick_plots):
    out = tmp_path / "run"
    np.save(tmp_path / "x.npy", five_d(100))
    argv = ["fit", "--data", str(tmp_path / "x.npy"), *SMALL, "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    one_line_error(capsys, argv, "already holds a run", "--force")
    assert main([*argv, "--force", "--seed", "4"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["config"]["metadata"]["seed"] == 4


def test_resume_with_another_flow_is_one_short_line(npy_run, tmp_path, capsys):
    root, run = npy_run
    out = tmp_path / "again"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    argv = ["fit", "--data", str(root / "x.npy"), *SMALL, "--out", str(out), "--resume"]
    err = one_line_error(capsys, [*argv, "--flow", "revnet"], "--flow iresnet (now revnet)")
    assert len(err) < 300 and "state_dict" not in err and "Missing key" not in err
    np.save(tmp_path / "other.npy", five_d(seed=1))
    other = [*argv[:2], str(tmp_path / "other.npy"), *argv[3:]]
    one_line_error(capsys, other, "content differs")
    one_line_error(capsys, ["fit", *SMALL, "--out", str(out), "--resume"], "--dataset moons")
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 8  # untouched


def test_batch_size_clamp_is_said(tmp_path, capsys, quick_plots):
    np.save(tmp_path / "x.npy", five_d(100))
    argv = ["fit", "--data", str(tmp_path / "x.npy"), *SMALL, "--steps", "2"]
    assert main([*argv, "--batch-size", "100000", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "note: --batch-size 100000 is more than the 80 training rows" in err
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["fit"]["batch_size"] == 80


# -- --data end to end ---------------------------------------------------------------------------
def test_npy_5d_end_to_end(npy_run, tmp_path, capsys):
    root, out = npy_run
    data = np.load(root / "x.npy")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint.pt", "density.png", "loss.png", "metrics.json", "samples.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    state = load_checkpoint(out / "checkpoint.pt")
    meta = state["config"]["metadata"]
    assert meta["data"] == str((root / "x.npy").resolve()) and meta["rows"] == 400
    assert meta["n_train"] == 320 and (meta["test_fraction"], meta["test_seed"]) == (0.2, 0)
    train, test = split_data(torch.from_numpy(data), 0.2, 0)
    scale = Standardization.from_dict(meta["standardization"], 5)
    assert torch.allclose(scale.mean, train.mean(0)) and torch.allclose(
        scale.std, train.std(0, correction=0)
    )

    # evaluate: by default the held-out rows, in data units, as fit reported them
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == "held-out" and report["n"] == 80 and report["units"] == "data"
    assert report["nll"] == pytest.approx(metrics["test_nll"], abs=1e-6)
    flow = load_flow(state)
    standardised = evaluate_nll(flow, scale.encode(test).float())
    assert report["nll_standardized"] == pytest.approx(standardised, abs=1e-6)
    assert report["nll"] == pytest.approx(
        standardised + float(train.std(0, correction=0).log().sum()), abs=1e-6
    )
    # in data units the NLL is far from the standardised one (columns of std 0.2 to 300)
    assert abs(report["nll"] - standardised) > 5

    # the same file given explicitly: still only its held-out rows; another file: all rows
    assert (
        main(
            ["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(root / "x.npy")]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["nll"] == report["nll"]
    np.save(tmp_path / "fresh.npy", five_d(60, seed=9))
    argv = [
        "evaluate",
        "--checkpoint",
        str(out / "checkpoint.pt"),
        "--data",
        str(tmp_path / "fresh.npy"),
    ]
    assert main(argv) == 0
    fresh = json.loads(capsys.readouterr().out)
    assert fresh["rows"] == "all" and fresh["n"] == 60 and math.isfinite(fresh["nll"])

    # sample: data units, so near the data's mean and spread, nowhere near 0 and 1
    samples_path = tmp_path / "s.npy"
    argv = [
        "sample",
        "--checkpoint",
        str(out / "checkpoint.pt"),
        "--n",
        "4000",
        "--out",
        str(samples_path),
    ]
    assert main(argv) == 0
    samples = np.load(samples_path)
    assert samples.shape == (4000, 5)
    assert np.all(np.abs(samples.mean(0) - data.mean(0)) < 0.5 * data.std(0))
    ratio = samples.std(0) / data.std(0)
    assert np.all((ratio > 0.6) & (ratio < 1.6)), ratio
    assert abs(samples[:, 4].mean() - 1000) < 20 and samples[:, 2].std() > 100


def test_python_loads_the_flow_in_data_units(npy_run, tmp_path, capsys):
    root, out = npy_run
    _, test = split_data(torch.from_numpy(np.load(root / "x.npy")), 0.2, 0)
    flow = load_flow(out / "checkpoint.pt", data_units=True)
    density = make_density(flow, (5,))
    with torch.no_grad():
        nll = -float(density.log_prob(test.float()).mean())
    assert nll == pytest.approx(
        json.loads((out / "metrics.json").read_text())["test_nll"], abs=1e-3
    )
    with torch.no_grad():
        assert abs(float(density.sample((2000,))[:, 4].mean()) - 1000) < 20
    assert load_standardization(out / "checkpoint.pt").dim == 5
    # a damaged record is an error, never a silent rescale
    state = load_checkpoint(out / "checkpoint.pt")
    state["config"]["metadata"]["standardization"]["std"][1] = -1.0
    path = save_checkpoint(tmp_path / "damaged.pt", state)
    one_line_error(capsys, ["evaluate", "--checkpoint", str(path)], "standardisation is damaged")
    argv = ["sample", "--checkpoint", str(path), "--out", str(tmp_path / "s.npy")]
    one_line_error(capsys, argv, "standardisation is damaged")
    assert not (tmp_path / "s.npy").exists()


def test_metrics_hold_the_history_in_data_units(npy_run):
    _, out = npy_run
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert history["units"] == "data" and history["step"] == list(range(1, 9))
    assert history["eval_step"] == [4, 8] and len(history["loss"]) == 8
    shift = metrics["standardized"]["log_scale"]
    assert history["eval_nll"][-1] == pytest.approx(metrics["test_nll"], abs=1e-6)
    assert metrics["test_nll"] == pytest.approx(metrics["standardized"]["test_nll"] + shift)
    assert metrics["final_loss"] == pytest.approx(history["loss"][-1])
    assert metrics["dim"] == 5 and metrics["data"].endswith("x.npy") and metrics["dataset"] is None


def test_csv_end_to_end(csv_run, tmp_path, capsys):
    root, out = csv_run
    table = load_data(root / "x.csv")
    assert table.columns == ["height", "weight", "age"] and table.data.shape == (400, 3)
    meta = load_checkpoint(out / "checkpoint.pt")["config"]["metadata"]
    assert meta["columns"] == table.columns and (meta["test_fraction"], meta["test_seed"]) == (
        0.25,
        3,
    )
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 100
    metrics = json.loads((out / "metrics.json").read_text())
    assert report["nll"] == pytest.approx(metrics["test_nll"], abs=1e-6)
    samples_path = tmp_path / "s.csv"
    argv = [
        "sample",
        "--checkpoint",
        str(out / "checkpoint.pt"),
        "--n",
        "3000",
        "--out",
        str(samples_path),
    ]
    assert main(argv) == 0
    assert samples_path.read_text().splitlines()[0] == "height,weight,age"
    samples = load_data(samples_path).data.numpy()
    data = table.data.numpy()
    assert np.all(np.abs(samples.mean(0) - data.mean(0)) < 0.5 * data.std(0))
    assert np.all(np.abs(np.log(samples.std(0) / data.std(0))) < 0.5)
    # the same columns in another order are refused, not scored as if they matched
    np.savetxt(
        root / "swapped.csv",
        data[:, [1, 0, 2]],
        delimiter=",",
        header="weight,height,age",
        comments="",
    )
    argv = [
        "evaluate",
        "--checkpoint",
        str(out / "checkpoint.pt"),
        "--data",
        str(root / "swapped.csv"),
    ]
    one_line_error(capsys, argv, "same order")


def test_pt_file_and_plots(tmp_path, capsys, figures):
    data = torch.from_numpy(five_d(200)[:, :2]).float()
    torch.save(data, tmp_path / "x.pt")
    out = tmp_path / "run"
    argv = ["fit", "--data", str(tmp_path / "x.pt"), *SMALL, "--out", str(out), "--log-density"]
    assert main(argv) == 0
    test_nll = json.loads((out / "metrics.json").read_text())["test_nll"]
    density = figures.saved["density.png"]
    assert figures.title("density.png") == f"iresnet on x.pt: test NLL {test_nll:.3f}"
    assert density.axes[-1].get_ylabel() == "log density"  # the colour bar
    assert density.axes[0].get_xlabel() == "x0" and density.axes[0].get_ylabel() == "x1"
    loss = figures.saved["loss.png"].axes[0]
    assert loss.get_xlabel() == "step" and "NLL" in loss.get_ylabel()
    assert set(figures.saved) == {"density.png", "samples.png", "loss.png"}


def test_pair_plot_above_two_dimensions(npy_run, tmp_path, figures):
    root, _ = npy_run
    out = tmp_path / "run"
    assert (
        main(["fit", "--data", str(root / "x.npy"), *SMALL, "--steps", "2", "--out", str(out)]) == 0
    )
    assert len(figures.saved["density.png"].axes) == 5 * 6 // 2  # lower triangle + diagonal
    assert figures.title("density.png").startswith("iresnet on x.npy: test NLL")


def test_one_dimensional_data(tmp_path, capsys, figures):
    np.save(tmp_path / "x.npy", five_d(200)[:, 4:])
    out = tmp_path / "run"
    assert main(["fit", "--data", str(tmp_path / "x.npy"), *SMALL, "--out", str(out)]) == 0
    assert set(figures.saved) == {"density.png", "loss.png"}
    assert figures.saved["density.png"].axes[0].get_ylabel() == "density"
    argv = [
        "sample",
        "--checkpoint",
        str(out / "checkpoint.pt"),
        "--n",
        "500",
        "--out",
        str(tmp_path / "s.npy"),
    ]
    assert main(argv) == 0
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (500, 1) and abs(samples.mean() - 1000) < 20


# -- evaluate on checkpoints from elsewhere -----------------------------------------------------
def test_evaluate_a_checkpoint_trained_from_python(tmp_path, capsys):
    torch.manual_seed(0)
    rows = torch.from_numpy(five_d(200)[:, :3]).float()
    flow = build_flow("iresnet", 3, num_blocks=1, hidden_dims=[8])
    fit_density(
        flow, rows, steps=2, batch_size=64, checkpoint_path=tmp_path / "c.pt", progress=False
    )
    argv = ["evaluate", "--checkpoint", str(tmp_path / "c.pt")]
    one_line_error(capsys, argv, "records no data", "--data FILE", "N x 3", "--dataset")
    np.save(tmp_path / "rows.npy", rows.numpy())
    assert main([*argv, "--data", str(tmp_path / "rows.npy")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == "all" and "nll_standardized" not in report
    assert report["nll"] == pytest.approx(evaluate_nll(flow, rows), abs=1e-5)
    one_line_error(capsys, [*argv, "--dataset", "moons"], "2-D", "3 dimensions")


def test_evaluate_when_the_data_file_moved_or_changed(npy_run, tmp_path, capsys):
    root, out = npy_run
    moved = tmp_path / "copy"
    moved.mkdir()
    checkpoint = moved / "checkpoint.pt"
    state = load_checkpoint(out / "checkpoint.pt")
    state["config"]["metadata"]["data"] = str(moved / "x.npy")
    torch.save(state, checkpoint)
    one_line_error(capsys, ["evaluate", "--checkpoint", str(checkpoint)], "not there any more")
    np.save(moved / "x.npy", five_d(seed=2))
    one_line_error(capsys, ["evaluate", "--checkpoint", str(checkpoint)], "changed since the fit")
    one_line_error(capsys, ["evaluate", "--checkpoint", str(checkpoint), "--n", "5"], "--n applies")


# -- data_files ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, needle",
    [
        ("a,b\n1,2\n3,x\n", "line 3, column 2: 'x' is not a number"),
        ("1,2\n3\n", "line 2 has 1 cells, expected 2"),
        ("a,b\n", "a header row and no data"),
        ("1,2\n3,nan\n5,6\n", "row 1, column 1 'x1'"),
        ("a,b\n1,5\n2,5\n3,5\n", "column 1 'b' is constant"),
        ("a\n1\n", "1 row(s)"),
    ],
)
def test_csv_errors_name_the_place(tmp_path, text, needle):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match="bad.csv") as info:
        load_data(path)
    assert needle in str(info.value)


def test_loaders_refuse_what_is_not_a_table(tmp_path):
    torch.save({"x": torch.ones(3, 2)}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="got dict"):
        load_data(tmp_path / "d.pt")
    np.save(tmp_path / "cube.npy", np.zeros((4, 3, 2)))
    with pytest.raises(ValueError, match="flatten"):
        load_data(tmp_path / "cube.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="numeric"):
        load_data(tmp_path / "obj.npy")
    with pytest.raises(ValueError, match="real numbers"):
        check_table(np.ones((3, 2), dtype=bool))
    with pytest.raises(ValueError, match="inf"):
        check_table(np.array([[1.0, 2.0], [np.inf, 1.0], [0.0, 3.0]]))
    # comments and blank lines are skipped; a header is optional
    (tmp_path / "ok.csv").write_text("# made by hand\n\n1,2\n3,5\n")
    table = load_data(tmp_path / "ok.csv")
    assert table.columns == ["x0", "x1"] and not table.has_header
    assert table.data.tolist() == [[1.0, 2.0], [3.0, 5.0]]


def test_split_is_seeded_disjoint_and_complete():
    rows = torch.arange(50.0).unsqueeze(1)
    train, test = split_data(rows, 0.2, seed=7)
    assert (len(train), len(test)) == (40, 10)
    assert sorted(torch.cat([train, test]).flatten().tolist()) == list(range(50))
    assert torch.equal(split_data(rows, 0.2, seed=7)[1], test)
    assert not torch.equal(split_data(rows, 0.2, seed=8)[1], test)
    with pytest.raises(ValueError, match="too few"):
        split_data(rows[:2], 0.5, seed=0)


def test_standardization_density_is_the_data_density():
    """log p_x(x) = log p_z((x - mean) / std) - sum(log std), three ways."""
    torch.manual_seed(0)
    flow = build_flow("iresnet", 3, num_blocks=1, hidden_dims=[8]).double()
    scale = Standardization(torch.tensor([100.0, -5.0, 0.0]), torch.tensor([20.0, 0.5, 3.0]))
    x = scale.decode(torch.randn(64, 3, dtype=torch.float64))
    inside = make_density(flow, (3,), dtype=torch.float64).log_prob(scale.encode(x))
    wrapped = make_density(scale.wrap(flow), (3,), dtype=torch.float64).log_prob(x)
    torch.testing.assert_close(wrapped, inside - scale.log_scale)
    nll_std = evaluate_nll(flow, scale.encode(x))
    expected = float(-(inside - scale.log_scale).mean().detach())
    assert nll_std + scale.log_scale == pytest.approx(expected)
    assert scale.log_scale == pytest.approx(math.log(20.0 * 0.5 * 3.0))
    again = Standardization.from_dict(scale.to_dict(), 3)
    assert torch.equal(again.mean, scale.mean) and torch.equal(again.std, scale.std)
    with pytest.raises(ValueError, match="2 dimensions"):
        Standardization.from_dict(scale.to_dict(), 2)
    with pytest.raises(ValueError, match="positive"):
        Standardization(torch.zeros(2), torch.tensor([1.0, 0.0]))
