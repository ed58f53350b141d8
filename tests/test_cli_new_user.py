"""What a new user met trying the command line: threads, header-less fits, tiny tables."""

from __future__ import annotations

import json

import numpy as np
import torch

from pyro_invres.cli import main

SMALL = ["--steps", "8", "--num-blocks", "1", "--hidden", "8", "--quiet", "--eval-every", "4"]


def _table(n: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 100 + 10 * rng.normal(size=(n, 3))


def test_sample_and_evaluate_run_on_the_requested_threads_and_restore_them(tmp_path, capsys):
    np.save(tmp_path / "x.npy", _table())
    out = tmp_path / "run"
    assert main(["fit", "--data", str(tmp_path / "x.npy"), *SMALL, "--out", str(out)]) == 0
    seen = []
    real = torch.set_num_threads

    def spy(n: int) -> None:
        seen.append(n)
        real(n)

    before = torch.get_num_threads()
    torch.set_num_threads = spy
    try:
        ckpt = str(out / "checkpoint.pt")
        assert (
            main(["sample", "--checkpoint", ckpt, "--n", "5", "--out", str(tmp_path / "s.npy")])
            == 0
        )
        assert main(["evaluate", "--checkpoint", ckpt]) == 0
    finally:
        torch.set_num_threads = real
    assert seen[0] == 1 and seen[1] == before  # sample: one thread, then restored
    assert seen[2] == 1 and seen[3] == before  # evaluate: the same
    assert torch.get_num_threads() == before


def test_a_headerless_fit_scores_a_csv_with_a_header_by_position(tmp_path, capsys):
    data = _table()
    np.save(tmp_path / "x.npy", data)
    out = tmp_path / "run"
    assert main(["fit", "--data", str(tmp_path / "x.npy"), *SMALL, "--out", str(out)]) == 0
    np.savetxt(tmp_path / "y.csv", data[:50], delimiter=",", header="a,b,c", comments="")
    capsys.readouterr()
    ckpt = str(out / "checkpoint.pt")
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(tmp_path / "y.csv")]) == 0
    assert "nll" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_table_too_small_to_fit_is_refused_before_out_exists(tmp_path, capsys):
    np.save(tmp_path / "x.npy", _table(n=6))
    out = tmp_path / "run"
    assert main(["fit", "--data", str(tmp_path / "x.npy"), *SMALL, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "too few to fit a density" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_resume_with_fewer_steps_than_done_names_the_option(tmp_path, capsys):
    np.save(tmp_path / "x.npy", _table())
    out = tmp_path / "run"
    argv = ["fit", "--data", str(tmp_path / "x.npy"), *SMALL, "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv[:-2], "--steps", "4", "--resume", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1]
    assert "past --steps 4" in errors[0] and "--steps 8 or more" in errors[0]


def test_sample_refuses_to_replace_a_file_unless_forced(tmp_path, capsys):
    np.save(tmp_path / "x.npy", _table())
    out = tmp_path / "run"
    assert main(["fit", "--data", str(tmp_path / "x.npy"), *SMALL, "--out", str(out)]) == 0
    target = tmp_path / "s.npy"
    np.save(target, np.zeros(3))
    argv = ["sample", "--checkpoint", str(out / "checkpoint.pt"), "--n", "5", "--out", str(target)]
    capsys.readouterr()
    assert main(argv) == 1
    assert "--force" in capsys.readouterr().err
    assert np.load(target).shape == (3,)  # untouched
    assert main([*argv, "--force"]) == 0
    assert np.load(target).shape == (5, 3)
