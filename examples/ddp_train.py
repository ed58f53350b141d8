"""Multi-process data-parallel density estimation with a residual flow (PyTorch DDP).

Fits ``residual_flow(2, ..., explicit="inverse")`` to a 2-D toy density (eight Gaussians
on a circle) with :class:`torch.nn.parallel.DistributedDataParallel`. Launch with::

    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 200

(``--device cuda`` uses NCCL and one GPU per process; the default is gloo on CPU.) It also
runs as a plain script (a single process, world size 1) for debugging.

What matters for correctness (see ``docs/distributed.md``):

* DDP wraps an ``nn.Module`` whose ``forward`` it calls, so the flow sits inside
  :class:`FlowNLL`, whose ``forward(batch)`` returns the mean negative log-likelihood.
  Calling the model through DDP is what triggers the gradient all-reduce and the buffer
  broadcast (the spectral-norm vectors ``u``, ``v`` and ActNorm's ``initialized``).
* The model is built under the same seed on every rank (DDP also broadcasts rank 0's
  parameters and buffers when it wraps the model); the data stream is seeded per rank.
* ActNorm initialises on the first batch, all-reducing its statistics across ranks.
* Only rank 0 prints and writes the checkpoint, atomically (temporary file + ``os.replace``),
  to ``--checkpoint`` (default ``runs/ddp/ddp_flow.pt``: under ``runs/``, which git ignores).
* A rank that hangs or dies must not block the others forever: the process group has a
  timeout (``--timeout``, 300 s by default), after which a collective that some rank never
  joined fails on the ranks waiting in it, and the script exits with status 1 and one line
  saying so (NCCL needs ``TORCH_NCCL_ASYNC_ERROR_HANDLING``, which the script sets).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import pyro.distributions as dist
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pyro_invres.flows import residual_flow


def eight_gaussians(n: int, generator: torch.Generator, scale: float = 2.0) -> Tensor:
    """``n`` points from eight Gaussians (std 0.2) on a circle of radius ``scale``."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.to(torch.float32) * (2 * math.pi / 8)
    centres = scale * torch.stack([angle.cos(), angle.sin()], dim=-1)
    return centres + 0.2 * torch.randn(n, 2, generator=generator)


class FlowNLL(nn.Module):
    """``forward(batch) = -log p(batch).mean()`` under ``base`` pushed through ``flow``.

    The base distribution's parameters are buffers, so they follow ``.to(device)``.
    """

    def __init__(self, flow: nn.Module, dim: int) -> None:
        super().__init__()
        self.flow = flow
        self.register_buffer("base_loc", torch.zeros(dim))
        self.register_buffer("base_scale", torch.ones(dim))

    def distribution(self) -> dist.TransformedDistribution:
        base = dist.Normal(self.base_loc, self.base_scale).to_event(1)
        return dist.TransformedDistribution(base, self.flow)

    def forward(self, batch: Tensor) -> Tensor:
        return -self.distribution().log_prob(batch).mean()


def save_atomic(obj: object, path: str) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--num-blocks", type=int, default=3)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--activation", default="elu", choices=["elu", "lipswish"])
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-size", type=int, default=2048)
    p.add_argument(
        "--checkpoint",
        default="runs/ddp/ddp_flow.pt",
        help="where rank 0 writes the trained flow (default under runs/, which git ignores)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds a rank waits in a collective (or at start-up) for the others before "
        "failing; a hung or dead rank then stops the job instead of blocking it forever",
    )
    args = p.parse_args(argv)
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        p.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the example; returns the exit status (1 when a rank timed out)."""
    args = parse_args(argv)
    try:
        train(args)
    except RuntimeError as err:
        # a collective (gloo raises a plain RuntimeError) or the start-up rendezvous (a
        # DistError) waited --timeout seconds in vain; anything else is a real bug
        text = str(err).lower()
        if not (isinstance(err, torch_dist.DistError) or "timed out" in text or "timeout" in text):
            raise
        rank = os.environ.get("RANK", "0")
        reason = " ".join(str(err).split())[:300]
        print(
            f"ddp_train: error: rank {rank} gave up after --timeout {args.timeout:g} s: another "
            f"rank hung or died ({type(err).__name__}: {reason})",
            file=sys.stderr,
            flush=True,
        )
        return 1
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    return 0


def train(args: argparse.Namespace) -> None:
    """Train under the options of :func:`parse_args` (one process, or one rank of many)."""
    # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        backend = "nccl" if args.device == "cuda" else "gloo"
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            # without it a timed-out NCCL collective is only logged, and the rank still hangs
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        # the timeout bounds every wait: the rendezvous, and each collective (the gradient
        # all-reduce, ActNorm's statistics, the barrier below)
        torch_dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    else:
        rank, world = 0, 1
    if args.device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        # torchrun starts one process per rank: keep them from oversubscribing the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world)))

    # identical initialisation on every rank (DDP would broadcast rank 0's anyway) ...
    torch.manual_seed(args.seed)
    flow = residual_flow(
        2,
        num_blocks=args.num_blocks,
        hidden_dims=[args.hidden, args.hidden],
        explicit="inverse",
        activation=args.activation,
    )
    model = FlowNLL(flow, 2).to(device)
    # ... but a different data stream (and roulette draws, if any) per rank
    torch.manual_seed(args.seed + 1000 * (rank + 1))
    data_gen = torch.Generator().manual_seed(args.seed + 1000 * (rank + 1))

    ddp = DistributedDataParallel(model) if distributed else model
    optim = torch.optim.Adam(ddp.parameters(), lr=args.lr)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = eight_gaussians(args.batch_size, data_gen).to(device)
        loss = ddp(batch)  # through DDP: buffer broadcast now, gradient all-reduce in backward
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step % args.log_every == 0 or step == args.steps:
            avg = loss.detach().clone()
            if distributed:
                torch_dist.all_reduce(avg)
                avg /= world
            if rank == 0:
                print(
                    f"step {step:4d}  nll {avg.item():.4f}  ({time.perf_counter() - start:.1f}s)",
                    flush=True,
                )

    # held-out NLL on rank 0's own evaluation set (eval mode: no further ActNorm init)
    if rank == 0:
        model.eval()
        with torch.no_grad():
            test = eight_gaussians(args.eval_size, torch.Generator().manual_seed(12345))
            nll = model(test.to(device)).item()
        print(f"held-out nll {nll:.4f}  (world size {world}, {args.steps} steps)", flush=True)
        save_atomic(
            {"model": model.state_dict(), "args": vars(args), "step": args.steps},
            args.checkpoint,
        )
        print(f"checkpoint written to {args.checkpoint}", flush=True)
    if distributed:
        torch_dist.barrier()  # no rank exits (tearing down the group) before rank 0 is done


if __name__ == "__main__":
    sys.exit(main())
