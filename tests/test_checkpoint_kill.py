"""A training process killed in the middle of writing a checkpoint loses nothing."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pyro_invres.train import load_checkpoint, load_flow

CHILD = textwrap.dedent(
    """
    import io, sys, time
    import torch
    from pyro_invres.datasets import sample_toy
    from pyro_invres.train import build_flow, fit_density

    real_save = torch.save
    calls = {"n": 0}

    def slow_second_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_save(obj, f, *args, **kwargs)
        # the second checkpoint is written slowly, byte range by byte range, so the
        # parent can kill the process while the file is half written
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        for start in range(0, len(data), 512):
            f.write(data[start : start + 512])
            f.flush()
            print("WRITING", flush=True)
            time.sleep(0.2)

    torch.save = slow_second_save
    torch.set_num_threads(1)
    flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8])
    data = sample_toy("moons", 512, seed=0)
    fit_density(flow, data, steps=40, batch_size=64, checkpoint_path=sys.argv[1],
                checkpoint_every=10, progress=False)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "WRITING" not in line:
            line = child.stdout.readline()
            assert line or child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "the child never started its second save"
        child.send_signal(signal.SIGKILL)  # no handler, no cleanup: as in a crash
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    leftovers = [p for p in Path(tmp_path).iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the kill should have landed mid-write"
    state = load_checkpoint(path)  # the previous, complete checkpoint
    assert state["step"] == 10
    flow = load_flow(state)
    assert torch.isfinite(flow(torch.randn(4, 2))).all()
