"""Data-parallel training (DistributedDataParallel, gloo on loopback) keeps ranks in sync.

Two processes train a small residual flow through DDP on rank-specific data. Afterwards
every entry of their state dicts -- parameters *and* buffers: the spectral-norm vectors
``u``, ``v`` and flag ``fresh``, ActNorm's ``initialized`` -- must be bit-for-bit equal,
the parameters must have moved, and ActNorm must have initialised from the statistics
pooled over both ranks. Two configurations run in the same processes:

* ``exact``: exact log-det, buffers broadcast from rank 0 at every forward (DDP's
  default); the result is also compared with one process training on the two ranks'
  batches concatenated.
* ``roulette``: the randomised log-det with per-rank draws and *no* buffer broadcast at
  forward (``broadcast_buffers=False``; ``forward_sync_buffers=False`` from torch 2.13),
  so the spectral-norm buffers stay equal only because their in-forward refresh is a
  deterministic function of the (all-reduced, hence identical) weights and old buffers.
"""

from __future__ import annotations

import datetime
import inspect
import os
import socket
import time
import traceback

import pyro.distributions as dist
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from pyro_invres.flows import residual_flow
from pyro_invres.transforms.actnorm import ActNorm

WORLD = 2
STEPS = 4
BATCH = 32
JOIN_TIMEOUT_S = 120.0
CONFIGS = {
    "exact": {"logdet": "exact", "sync_buffers": True},
    "roulette": {"logdet": "roulette", "sync_buffers": False},
}

pytestmark = pytest.mark.skipif(
    not (torch_dist.is_available() and torch_dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


class _FlowNLL(nn.Module):
    """What DDP wraps: ``forward(batch)`` is the mean negative log-likelihood."""

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow
        self.register_buffer("base_loc", torch.zeros(2))
        self.register_buffer("base_scale", torch.ones(2))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        base = dist.Normal(self.base_loc, self.base_scale).to_event(1)
        return -dist.TransformedDistribution(base, self.flow).log_prob(batch).mean()


def _build(logdet: str) -> _FlowNLL:
    """The same model on every rank: fixed seed, weights scaled so spectral norm bites."""
    torch.manual_seed(0)
    flow = residual_flow(2, num_blocks=2, hidden_dims=[16, 16], explicit="inverse", logdet=logdet)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if name.endswith("original"):
                p.mul_(5.0)
    return _FlowNLL(flow)


def _batch(rank: int, step: int) -> torch.Tensor:
    """Rank-specific data: the ranks' means and scales differ."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return (1.0 + rank) * torch.randn(BATCH, 2, generator=g) + torch.tensor([3.0 * rank, -1.0])


def _train(model: nn.Module, rank: int) -> tuple[dict, dict]:
    """A few Adam steps (``rank=-1``: all ranks' batches at once, in one process).

    Returns the ActNorm states right after their initialisation, and the losses.
    """
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    after_init: dict = {}
    losses = []
    for step in range(STEPS):
        batch = (
            torch.cat([_batch(r, step) for r in range(WORLD)]) if rank < 0 else _batch(rank, step)
        )
        loss = model(batch)
        if step == 0:
            for i, part in enumerate(inner.flow):
                if isinstance(part, ActNorm):
                    after_init[i] = {
                        "bias": part.bias.detach().clone(),
                        "log_scale": part.log_scale.detach().clone(),
                    }
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return after_init, {"losses": losses}


def _ddp(model: nn.Module, sync_buffers: bool) -> nn.Module:
    """DDP with or without the buffer broadcast at each forward (the default is with).

    torch 2.13 renamed ``broadcast_buffers`` to ``forward_sync_buffers``.
    """
    if sync_buffers:
        return nn.parallel.DistributedDataParallel(model)
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return nn.parallel.DistributedDataParallel(model, **{key: False})


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    try:
        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch_dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=60),
        )
        result = {}
        for name, cfg in CONFIGS.items():
            model = _build(cfg["logdet"])
            init = _state(model)
            torch.manual_seed(100 + rank)  # per-rank randomness (roulette draws)
            ddp = _ddp(model, cfg["sync_buffers"])
            after_init, info = _train(ddp, rank)
            result[name] = {
                "init": init,
                "final": _state(model),
                "after_init": after_init,
                **info,
            }
        torch_dist.barrier()
        torch_dist.destroy_process_group()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(out_dir: str) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, port, out_dir), daemon=True) for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = []
    for r in range(WORLD):
        err = os.path.join(out_dir, f"rank{r}.err")
        if os.path.exists(err):
            with open(err) as f:
                errors.append(f"rank {r}:\n{f.read()}")
    if hung:
        pytest.fail(f"ranks {hung} still running after {JOIN_TIMEOUT_S}s\n" + "\n".join(errors))
    codes = [p.exitcode for p in procs]
    if errors or any(c != 0 for c in codes):
        pytest.fail(f"worker exit codes {codes}\n" + "\n".join(errors))
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _run_ranks(str(tmp_path_factory.mktemp("ddp")))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_ranks_identical_after_ddp_steps(ranks: list[dict], config: str) -> None:
    r0, r1 = ranks[0][config], ranks[1][config]
    final0, final1 = r0["final"], r1["final"]
    assert final0.keys() == final1.keys()
    # the buffers whose sync is in question are really in the state dict
    suffixes = {k.rsplit(".", 1)[-1] for k in final0}
    assert {"u", "v", "fresh", "initialized", "original"} <= suffixes
    mismatched = [k for k in final0 if not torch.equal(final0[k], final1[k])]
    assert not mismatched, f"{config}: ranks differ in {mismatched}"
    assert all(bool(v) for k, v in final0.items() if k.endswith("initialized"))
    # the ranks saw different data (and, for roulette, different draws)
    assert r0["losses"] != r1["losses"]
    # training moved every parameter, and the power iteration moved u and v
    init = r0["init"]
    params = {k for k in final0 if k.endswith(("original", "bias", "log_scale", "raw_beta"))}
    assert params, "no parameters found"
    unchanged = [k for k in params if torch.equal(init[k], final0[k])]
    assert not unchanged, f"{config}: parameters not trained: {unchanged}"
    for k in final0:
        if k.endswith((".u", ".v")):
            assert not torch.equal(init[k], final0[k]), k


@pytest.mark.parametrize("config", list(CONFIGS))
def test_actnorm_initialises_from_pooled_statistics(ranks: list[dict], config: str) -> None:
    pooled = torch.cat([_batch(r, 0) for r in range(WORLD)])
    mean, std = pooled.mean(0), pooled.std(0, unbiased=False)
    after0, after1 = ranks[0][config]["after_init"], ranks[1][config]["after_init"]
    assert after0.keys() == after1.keys() and len(after0) == 2
    for i in after0:
        for name in ("bias", "log_scale"):
            assert torch.equal(after0[i][name], after1[i][name]), (i, name)
    # the last ActNorm sees the data first (density estimation scores through _inverse)
    last = after0[max(after0)]
    torch.testing.assert_close(last["bias"], mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last["log_scale"], std.log(), atol=1e-5, rtol=1e-5)
    # and neither rank's own statistics would give that
    for r in range(WORLD):
        assert not torch.allclose(last["bias"], _batch(r, 0).mean(0), atol=1e-2)


def test_ddp_matches_single_process_on_pooled_batches(ranks: list[dict]) -> None:
    """Averaged gradients: two ranks of B samples step like one process on their 2B."""
    model = _build("exact")
    _train(model, rank=-1)
    reference = _state(model)
    final = ranks[0]["exact"]["final"]
    for k, v in reference.items():
        if v.is_floating_point():
            torch.testing.assert_close(final[k], v, atol=1e-5, rtol=1e-4, msg=k)
        else:
            assert torch.equal(final[k], v), k
