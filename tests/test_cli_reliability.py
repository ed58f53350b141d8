"""The command line and checkpoints never give a silent wrong answer (issue 13, items 8, 14-18).

* ``fit --seed S`` is reproducible bit for bit, in another process too.
* ``fit --resume`` honours new ``--steps`` / ``--lr`` / ``--lr-final`` and records them.
* A checkpoint whose config asks for more than it stores fails fast, before building.
* Every failure is one line on stderr, and every written file is whole or absent (full
  disk, read-only place, a later stage failing, two runs into one ``--out``).
* The DDP example gives up after its process-group timeout when a rank hangs.
"""

from __future__ import annotations

import copy
import errno
import importlib.util
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_invres import cli
from pyro_invres.cli import LOCK_NAME, main
from pyro_invres.datasets import sample_toy
from pyro_invres.optim import JointOptim
from pyro_invres.train import (
    CheckpointError,
    build_flow,
    fit_density,
    load_checkpoint,
    load_flow,
    save_checkpoint,
)
from tests.helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "6", "--num-blocks", "1", "--hidden", "8", "--n-train", "300"]
SMALL += ["--n-test", "100", "--quiet", "--checkpoint-every", "3"]
TIMINGS = {"wall_time_s", "eval_time_s", "total_time_s", "sample_time_s"}


def fit_argv(out: Path, *extra: str) -> list[str]:
    return ["fit", *SMALL, "--out", str(out), *extra]


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One finished small run."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("run")
    assert main(fit_argv(out, "--seed", "5")) == 0
    return out


@pytest.fixture
def quick_plots(monkeypatch):
    """Stand-in plots, written the same way (matplotlib takes most of a small fit's time)."""

    def plot(path, *args, **kwargs):
        cli._write(path, lambda handle: handle.write(b"\x89PNG stand-in"))

    monkeypatch.setattr(cli, "_plot_density", plot)
    monkeypatch.setattr(cli, "_plot_samples", plot)
    monkeypatch.setattr(cli, "_plot_loss", plot)


# -- item 14: the same seed, the same run ------------------------------------------------------
def assert_same_run(out: Path, reference: Path) -> None:
    """Bit-identical weights, losses, RNG states, metrics (but timings) and plots."""
    ours, theirs = (
        load_checkpoint(out / "checkpoint.pt"),
        load_checkpoint(reference / "checkpoint.pt"),
    )
    assert ours["flow_state"].keys() == theirs["flow_state"].keys()
    for key, value in theirs["flow_state"].items():
        assert torch.equal(ours["flow_state"][key], value), key
    assert ours["losses"] == theirs["losses"]
    assert torch.equal(ours["rng"]["torch"], theirs["rng"]["torch"])
    mine, other = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert {k: v for k, v in mine.items() if k not in TIMINGS} == {
        k: v for k, v in other.items() if k not in TIMINGS
    }
    assert (out / "samples.png").read_bytes() == (reference / "samples.png").read_bytes()


def test_fit_with_the_same_seed_is_bit_identical(run, tmp_path):
    # the flow's initial weights come from the seed, not from whatever the process drew before
    torch.manual_seed(987)
    random.seed(987)
    np.random.seed(987)
    again = tmp_path / "again"
    assert main(fit_argv(again, "--seed", "5")) == 0
    assert_same_run(again, run)


@pytest.mark.slow
def test_fit_with_the_same_seed_is_bit_identical_in_another_process(run, tmp_path):
    other = tmp_path / "other"
    argv = fit_argv(other, "--seed", "5")
    code = f"import sys; from pyro_invres.cli import main; sys.exit(main({argv!r}))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # its own string hashes and RNG state
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_run(other, run)


# -- item 15: resume honours the new schedule --------------------------------------------------
def test_resume_uses_and_records_the_new_schedule(tmp_path, monkeypatch):
    data = sample_toy("moons", 256, seed=0)
    path = tmp_path / "checkpoint.pt"
    torch.manual_seed(0)
    flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8])
    options = dict(batch_size=64, checkpoint_path=path, progress=False)
    fit_density(flow, data, steps=6, lr=1e-2, lr_final=0.5, **options)

    used: list[float] = []
    real_call = JointOptim.__call__

    def recording(self, params, *args, **kwargs):
        used.append(self.optimizer.param_groups[0]["lr"] if self.optimizer else math.nan)
        return real_call(self, params, *args, **kwargs)

    monkeypatch.setattr(JointOptim, "__call__", recording)
    resumed = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8])
    result = fit_density(resumed, data, steps=12, lr=2e-2, lr_final=0.1, resume=True, **options)

    # steps 7..12 use the rates a run started with lr 2e-2, lr_final 0.1, 12 steps would use
    gamma = 0.1 ** (1 / 12)
    expected = [2e-2 * gamma**k for k in range(6, 12)]
    assert result.start_step == 6 and len(used) == 6
    # the first rate is read before the optimiser exists; the rest from it
    np.testing.assert_allclose(np.array(used[1:], dtype=np.float64), expected[1:], rtol=1e-12)
    state = load_checkpoint(path)
    scheduler = state["optim_state"]["scheduler"]
    assert scheduler["gamma"] == pytest.approx(gamma, rel=1e-15)
    assert state["optim_state"]["groups"][0]["lr"] == pytest.approx(2e-2 * gamma**12, rel=1e-12)
    fit = state["config"]["fit"]
    assert (fit["steps"], fit["lr"], fit["lr_final"]) == (12, 2e-2, 0.1)
    assert [(s["from_step"], s["steps"], s["lr"], s["lr_final"]) for s in fit["segments"]] == [
        (0, 6, 1e-2, 0.5),
        (6, 12, 2e-2, 0.1),
    ]


def test_cli_resume_refuses_other_data_or_flow_and_reports_the_schedule(
    run, tmp_path, capsys, quick_plots
):
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    one_line_error(capsys, fit_argv(out, "--resume", "--seed", "6"), "--seed 5 (now 6)")
    one_line_error(
        capsys, fit_argv(out, "--resume", "--seed", "5", "--dataset", "rings"), "--dataset moons"
    )
    one_line_error(
        capsys, fit_argv(out, "--resume", "--seed", "5", "--hidden", "4"), "hidden_dims=[8]"
    )
    one_line_error(
        capsys, fit_argv(out, "--resume", "--seed", "5", "--steps", "3"), "--steps 6 or more"
    )
    assert main(fit_argv(out, "--resume", "--seed", "5", "--steps", "9", "--lr", "0.02")) == 0
    printed = capsys.readouterr().out
    assert "at step 6" in printed and "--steps 6 -> 9" in printed and "--lr 0.01 -> 0.02" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 6 and metrics["steps"] == 9
    assert metrics["config"]["fit"]["lr"] == 0.02
    assert [s["lr"] for s in metrics["config"]["fit"]["segments"]] == [0.01, 0.02]


# -- item 16: a checkpoint may ask only for what it stores --------------------------------------
@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("num_blocks", 20_000, "20000 blocks"),
        ("hidden_dims", [30_000], "30000"),
        ("hidden_dims", [30_000, 30_000], "shape"),
        ("hidden_dims", [8, 9], "shape"),
        ("num_blocks", 2, "does not store"),
        ("input_dim", 3, "shape"),
        ("num_blocks", 1 << 40, "limit"),
        ("hidden_dims", "many", "hidden_dims"),
    ],
)
def test_a_doctored_config_fails_fast_before_building(run, tmp_path, capsys, option, value, needle):
    state = load_checkpoint(run / "checkpoint.pt")
    state["config"]["flow"][option] = value
    with pytest.raises(CheckpointError, match=needle):
        load_flow(copy.deepcopy(state))
    path = save_checkpoint(tmp_path / "doctored.pt", state)
    started = time.perf_counter()
    one_line_error(capsys, ["evaluate", "--checkpoint", str(path), "--n", "10"], needle)
    assert time.perf_counter() - started < 1.0
    one_line_error(
        capsys,
        ["sample", "--checkpoint", str(path), "--out", str(tmp_path / "s.npy")],
        needle,
    )
    assert not (tmp_path / "s.npy").exists()


BOTH = ("evaluate", "sample")


@pytest.mark.parametrize(
    "edit, commands",
    [
        (lambda s: s.__setitem__("config", "garbage"), BOTH),
        (lambda s: s["config"].__setitem__("flow", [1, 2]), BOTH),
        (lambda s: s["config"].__setitem__("metadata", "moons"), BOTH),
        (lambda s: s.__setitem__("step", "six"), BOTH),
        (lambda s: s.__setitem__("flow_state", {"w": 1.0}), BOTH),
        (lambda s: s["config"]["flow"].__setitem__("name", ["iresnet"]), BOTH),
        # only evaluate reads the fit's seed (it scores fresh data drawn from seed + 1)
        (lambda s: s["config"]["metadata"].__setitem__("seed", "x"), ("evaluate",)),
    ],
)
def test_a_malformed_checkpoint_is_a_one_line_error(run, tmp_path, capsys, edit, commands):
    state = load_checkpoint(run / "checkpoint.pt")
    edit(state)
    path = save_checkpoint(tmp_path / "malformed.pt", state)
    if "evaluate" in commands:
        one_line_error(capsys, ["evaluate", "--checkpoint", str(path), "--n", "10"])
    if "sample" in commands:
        out = tmp_path / "s.pt"
        one_line_error(capsys, ["sample", "--checkpoint", str(path), "--out", str(out)])
        assert not out.exists()


# -- item 17: one-line errors ------------------------------------------------------------------
def test_bad_arguments_and_places_are_one_line_errors(run, tmp_path, capsys):
    checkpoint = str(run / "checkpoint.pt")
    one_line_error(capsys, fit_argv(tmp_path / "a", "--lr-final", "-1"), "--lr-final")
    one_line_error(capsys, fit_argv(tmp_path / "a", "--lr", "inf"), "--lr")
    one_line_error(capsys, fit_argv(tmp_path / "a", "--device", "meta"), "meta")
    one_line_error(capsys, fit_argv(tmp_path / "a", "--checkpoint-every", "0"), "checkpoint")
    assert not (tmp_path / "a").exists()  # refused before touching the disk
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, fit_argv(tmp_path / "file"), "directory")
    onto = tmp_path / "dir.npy"
    onto.mkdir()
    one_line_error(
        capsys, ["sample", "--checkpoint", checkpoint, "--out", str(onto)], "is a directory"
    )
    one_line_error(
        capsys, ["sample", "--checkpoint", checkpoint, "--device", "meta", "--out", "x.pt"]
    )
    # argparse's own usage error for flags that exclude each other: status 2, one line
    one_line_error(
        capsys,
        fit_argv(tmp_path / "b", "--resume", "--overwrite"),
        "argument --overwrite/--force: not allowed with argument --resume",
        status=2,
    )
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_sample_into_a_read_only_directory(run, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        argv = [
            "sample",
            "--checkpoint",
            str(run / "checkpoint.pt"),
            "--out",
            str(locked / "s.npy"),
        ]
        one_line_error(capsys, argv, "read-only")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_a_write_refused_by_the_file_system_is_one_line(run, tmp_path, capsys, monkeypatch):
    # as in a read-only place, even for root: the temporary file cannot be created
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("pyro_invres.checkpoint.tempfile.mkstemp", refuse)
    out = tmp_path / "s.npy"
    argv = ["sample", "--checkpoint", str(run / "checkpoint.pt"), "--n", "5", "--out", str(out)]
    one_line_error(capsys, argv, f"cannot write {out}", "Permission denied")
    assert list(tmp_path.iterdir()) == []


def full_disk(written: bytes = b"partial"):
    """A writer that gets some bytes out, then finds the disk full."""

    def write(obj, handle, *args, **kwargs):
        handle.write(written)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".csv", ".png"])
def test_sample_on_a_full_disk_leaves_no_file(run, tmp_path, capsys, monkeypatch, suffix):
    out = tmp_path / f"samples{suffix}"
    if suffix == ".npy":
        monkeypatch.setattr(np, "save", lambda h, *a, **k: full_disk()(None, h))
    elif suffix == ".pt":
        monkeypatch.setattr(torch, "save", full_disk())
    elif suffix == ".csv":
        monkeypatch.setattr(np, "savetxt", lambda h, *a, **k: full_disk()(None, h))
    else:
        from matplotlib.figure import Figure

        monkeypatch.setattr(Figure, "savefig", lambda self, h, **k: full_disk()(None, h))
    argv = ["sample", "--checkpoint", str(run / "checkpoint.pt"), "--n", "5", "--out", str(out)]
    one_line_error(capsys, argv, "No space left on device", str(out))
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one


def test_fit_on_a_full_disk_leaves_no_partial_file(tmp_path, capsys, monkeypatch, quick_plots):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", full_disk())
    one_line_error(capsys, fit_argv(out), "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == []  # no checkpoint, no lock, no temp


def test_fit_keeps_checkpoint_and_metrics_when_the_plots_hit_a_full_disk(
    tmp_path, capsys, monkeypatch
):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda self, h, **k: full_disk()(None, h))
    out = tmp_path / "run"
    one_line_error(capsys, fit_argv(out), "density.png failed", "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["failed"]) == {"density.png", "samples.png", "loss.png"}
    assert math.isfinite(metrics["test_nll"]) and metrics["sample_n"] == 2000


# -- item 8: a later stage failing keeps what the run produced ---------------------------------
def test_fit_keeps_its_outputs_when_sampling_fails(tmp_path, capsys, monkeypatch, quick_plots):
    pytest.importorskip("matplotlib")

    def singular(*args, **kwargs):
        raise RuntimeError("linalg.solve: The solver failed because the input matrix is singular.")

    monkeypatch.setattr(cli, "_sample", singular)
    out = tmp_path / "run"
    one_line_error(capsys, fit_argv(out), "sampling failed", "singular", "checkpoint.pt")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint.pt", "density.png", "loss.png", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "singular" in metrics["failed"]["sampling"] and math.isfinite(metrics["test_nll"])
    assert metrics["sample_n"] is None
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6


# -- item 17: one run per output directory ------------------------------------------------------
def test_an_existing_run_is_not_overwritten_silently(tmp_path, capsys, monkeypatch, quick_plots):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    small = fit_argv(Path("unused"))[:-2]  # the README's command: the default --out
    assert main(small) == 0
    capsys.readouterr()
    before = (tmp_path / "runs" / "fit" / "checkpoint.pt").read_bytes()
    one_line_error(capsys, small, "already holds a run", "--resume", "--overwrite", "--out")
    assert (tmp_path / "runs" / "fit" / "checkpoint.pt").read_bytes() == before
    assert main([*small, "--overwrite", "--seed", "1"]) == 0
    assert load_checkpoint("runs/fit/checkpoint.pt")["config"]["metadata"]["seed"] == 1
    assert not (tmp_path / "runs" / "fit" / LOCK_NAME).exists()


def test_a_busy_output_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        one_line_error(capsys, fit_argv(out), "in use", f"pid {sleeper.pid}", LOCK_NAME)
        assert (out / LOCK_NAME).read_text().split()[0] == str(sleeper.pid)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_is_taken_over(tmp_path, capsys, quick_plots):
    pytest.importorskip("matplotlib")
    out = tmp_path / "stale"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(f"{dead.pid} {socket.gethostname()}\n")
    assert main(fit_argv(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(cli._RUN_FILES)  # lock gone


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_two_fits_into_one_output_one_is_refused_and_a_killed_one_resumes(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "shared"
    argv = fit_argv(out, "--steps", "1000000", "--checkpoint-every", "2")
    code = f"import sys; from pyro_invres.cli import main; sys.exit(main({argv!r}))"
    first = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        one_line_error(capsys, fit_argv(out, "--resume"), "in use", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the lock stays behind
        first.wait()
    assert (out / LOCK_NAME).exists()
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert main(fit_argv(out, "--resume", "--steps", str(step + 2))) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step + 2
    assert not (out / LOCK_NAME).exists()


# -- item 18: the DDP example does not wait forever for a hung rank -----------------------------
def ddp_example():
    spec = importlib.util.spec_from_file_location("ddp_train", ROOT / "examples" / "ddp_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_example_gives_up_on_a_missing_rank_after_its_timeout(monkeypatch, capsys):
    example = ddp_example()
    assert example.parse_args(["--timeout", "2"]).timeout == 2.0
    with pytest.raises(SystemExit):
        example.parse_args(["--timeout", "0"])
    assert "--timeout must be a positive number" in capsys.readouterr().err
    for name, value in [("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")]:
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    started = time.monotonic()
    assert example.main(["--timeout", "0.5", "--steps", "2"]) == 1  # rank 1 never comes
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.startswith("ddp_train: error: rank 0 gave up after --timeout 0.5 s"), err
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_ddp_example_stops_when_a_rank_hangs_mid_training(tmp_path):
    port = free_port()
    ranks = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
        argv = ["--timeout", "3", "--steps", "1000000", "--log-every", "5"]
        argv += ["--checkpoint", str(tmp_path / "ddp.pt")]
        ranks.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "examples" / "ddp_train.py"), *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        assert ranks[0].stdout.readline().startswith("step"), ranks[0].stderr.read()
        os.kill(ranks[1].pid, signal.SIGSTOP)  # hung: alive, but never answers
        stopped = time.monotonic()
        ranks[0].wait(timeout=60)
        assert time.monotonic() - stopped < 30
        assert ranks[0].returncode == 1
        err = ranks[0].stderr.read()
        assert "ddp_train: error: rank 0 gave up after --timeout 3 s" in err
        assert "Traceback" not in err
    finally:
        for p in ranks:
            p.kill()
            p.wait()


def test_written_files_get_the_mode_an_ordinary_open_would(tmp_path):
    """Atomic writes go through a temporary file (created 0600): the result is chmodded to
    the umask's mode, so other users can read a checkpoint as they could before."""
    from pyro_invres.checkpoint import atomic_write

    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "x.bin", lambda h: h.write(b"1"))
    finally:
        os.umask(old)
    assert (os.stat(path).st_mode & 0o777) == 0o644
