"""Reversible back-propagation: ReversibleStack against plain autograd, checkpointing, memcnn.

Every implementation trains the same stack of additive two-stream coupling blocks
(RevNet: ``y_1 = x_1 + F(x_2)``, ``y_2 = x_2 + G(y_1)``) with the same weights, built from
the same seed:

* ``ours``: :class:`pyro_invres.transforms.reversible.ReversibleStack` of
  :class:`~pyro_invres.transforms.RevNetBlock` (default ``checkpoint_every``; the backward
  pass reconstructs activations by inversion, anchored every ``k`` blocks);
* ``plain``: the same blocks through ordinary autograd (every activation kept);
* ``checkpoint``: the same blocks under ``torch.utils.checkpoint.checkpoint_sequential``
  with ``ceil(sqrt(depth))`` segments (non-reentrant; recomputes each segment forwards);
* ``memcnn``: ``memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(F, G))`` per block,
  ``F`` and ``G`` the very networks of our blocks (``keep_input=False``, its default;
  each step feeds it a copy of the batch, because it frees its input's storage).

A step is ``loss = 0.5 * mean ||f(x)||^2`` (the Gaussian negative log-likelihood of a
volume-preserving flow, up to a constant), ``backward()``, and zeroing the gradients.
Timing interleaves the implementations round by round in one process (common.py) and
reports medians and the median of per-round ratios, of wall time and (CPU) of the thread's
CPU time, which other processes on a shared machine disturb less. Memory: the peak bytes of tensors
autograd saves during a step (``SavedTensorMeter``: deterministic, parameters excluded;
memcnn keeps its activations as attributes of its autograd context, which saved-tensor
hooks cannot see, so its count misses one activation per step), the peak resident memory
of a fresh process over two steps after a warm-up step (CPU, ``--rss``; glibc's mmap
threshold fixed at 64 KiB so that freed tensors leave the resident set; the sympy-based
shape checks that ``autograd.grad`` imports on first use, ~30 MiB, are imported up front),
or
``torch.cuda.max_memory_allocated`` (CUDA). Drift: float32 relative error of the
activations the backward pass reconstructs at depth 256 (random weights that expand
activations ~300x over the stack; ELU networks), and of the resulting parameter gradients
against float64 plain autograd.

Run ``python bench_reversible.py --help``; results go to ``results/reversible_<device>.json``.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental.symbolic_shapes  # noqa: F401
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    PhaseTimer,
    base_parser,
    env_info,
    interleaved_timing,
    markdown_table,
    memory_summary,
    mib,
    paired_ratio,
    peak_memory,
    setup_device,
    sync,
    write_json,
)

from pyro_invres.ops.reversible import (  # noqa: E402
    DEFAULT_CHECKPOINT_EVERY,
    SavedTensorMeter,
    reconstruction_errors,
)
from pyro_invres.transforms import revnet_block  # noqa: E402
from pyro_invres.transforms.reversible import reversible_stack  # noqa: E402

# memcnn 1.5 calls the deprecated TypedStorage API on every forward pass
warnings.filterwarnings("ignore", message="TypedStorage is deprecated")

IMPLS = ["plain", "ours", "checkpoint", "memcnn"]
MEMORY_ONLY = ["ours_no_anchor"]  # same time as ours; one segment: inverts from the top


def import_memcnn() -> tuple[Any, str | None]:
    """memcnn, or None and why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import memcnn
        return memcnn, None
    except Exception as exc:  # an import-time incompatibility: report it, skip memcnn
        return None, f"{type(exc).__name__}: {exc}"


# -- models -----------------------------------------------------------------------------------
def build_blocks(
    depth: int, dim: int, hidden: int, seed: int, scale: float, activation: str = "relu"
) -> list[nn.Module]:
    """RevNet blocks with Gaussian weights (the last layer of F and G scaled by ``scale``)."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(depth):
        block = revnet_block(dim, [hidden], activation=activation)
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    factor = 1.0 if m.out_features == hidden else scale
                    w = torch.randn(m.weight.shape, generator=g) / m.in_features**0.5
                    m.weight.copy_(factor * w)
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        blocks.append(block)
    return blocks


class _Call(nn.Module):
    """A block's map as an ``nn.Module`` (bypasses the block's cache), for checkpointing."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block._call(x)


def build_forward(impl: str, blocks: list[nn.Module], memcnn: Any) -> tuple[Any, nn.Module]:
    """``(x -> f(x), module holding the parameters)`` for one implementation."""
    depth = len(blocks)
    if impl in ("ours", "ours_no_anchor"):
        k = depth if impl == "ours_no_anchor" else None
        stack = reversible_stack(blocks, checkpoint_every=k)
        return stack._call, stack
    if impl == "plain":
        seq = nn.Sequential(*[_Call(b) for b in blocks])
        return seq, seq
    if impl == "checkpoint":
        seq = nn.Sequential(*[_Call(b) for b in blocks])
        n_segments = math.ceil(math.sqrt(depth))
        return (lambda x: checkpoint_sequential(seq, n_segments, x, use_reentrant=False)), seq
    if impl == "memcnn":
        wrapped = nn.Sequential(
            *[
                memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(b.f, b.g, split_dim=1))
                for b in blocks
            ]
        )
        return (lambda x: wrapped(x.clone())), wrapped
    raise ValueError(impl)


def build_step(
    impl: str,
    depth: int,
    dim: int,
    hidden: int,
    batch: int,
    device: str = "cpu",
    seed: int = 0,
    scale: float = 0.3,
    warm: bool = False,
) -> Any:
    """Model and data of ``impl``; returns ``step(timer)`` (forward, backward, zero grads).

    ``step.cpu_times`` collects the thread CPU time of every call (less sensitive than wall
    time to other processes on a shared machine). ``warm`` runs one step before returning,
    so that first-call initialisation is not counted as a step's memory.
    """
    memcnn, _ = import_memcnn() if impl == "memcnn" else (None, None)
    dev = torch.device(device)
    blocks = [b.to(dev) for b in build_blocks(depth, dim, hidden, seed, scale)]
    forward, module = build_forward(impl, blocks, memcnn)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, dim, generator=g).to(dev)

    cpu_times: list[float] = []

    def step(timer: PhaseTimer) -> None:
        start = time.thread_time()
        y = forward(x)
        loss = 0.5 * y.pow(2).sum(-1).mean()
        timer.mark("forward")
        loss.backward()
        timer.mark("backward")
        module.zero_grad(set_to_none=True)
        cpu_times.append(time.thread_time() - start)

    step.module = module  # type: ignore[attr-defined]
    step.cpu_times = cpu_times  # type: ignore[attr-defined]
    if warm:
        step(PhaseTimer(dev))
    return step


# -- measurements -----------------------------------------------------------------------------
def saved_tensor_peak(impl: str, kwargs: dict[str, Any], device: torch.device) -> int:
    """Peak saved-tensor bytes of one step after a warm-up step."""
    step = build_step(impl, **kwargs, device=str(device))
    timer = PhaseTimer(device)
    timer.start()
    step(timer)
    params = list(step.module.parameters())
    with SavedTensorMeter(exclude=params) as meter:
        timer.start()
        step(timer)
    return meter.peak_bytes


def gradients(
    impl: str, blocks: list[nn.Module], x: torch.Tensor, memcnn: Any
) -> list[torch.Tensor]:
    forward, module = build_forward(impl, blocks, memcnn)
    module.zero_grad(set_to_none=True)
    loss = 0.5 * forward(x).pow(2).sum(-1).mean()
    loss.backward()
    grads = [p.grad.detach().clone() for b in blocks for p in b.parameters()]
    module.zero_grad(set_to_none=True)
    return grads


def relative_error(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    num = sum((g.double() - r.double()).pow(2).sum() for g, r in zip(grads, reference))
    den = sum(r.double().pow(2).sum() for r in reference)
    return float((num / den).sqrt())


@torch.no_grad()
def memcnn_reconstruction_errors(blocks: list[nn.Module], x: torch.Tensor, memcnn: Any) -> Any:
    """What memcnn's backward pass reconstructs: each block's input, inverted from the top."""
    couplings = [memcnn.AdditiveCoupling(b.f, b.g, split_dim=1) for b in blocks]
    exact = [x]
    for c in couplings:
        exact.append(c(exact[-1]))
    h = exact[-1]
    errors = []
    for j in reversed(range(len(couplings))):
        h = couplings[j].inverse(h)
        errors.append(float((h.double() - exact[j].double()).norm() / exact[j].double().norm()))
    return errors[::-1]


def drift(args: Any, device: torch.device, memcnn: Any) -> dict[str, Any]:
    """float32 reconstruction and gradient errors at depth ``args.drift_depth``."""
    # ELU: with ReLU, a pre-activation within rounding of 0 flips a derivative in one
    # implementation and not another, and such single events dominate gradient errors
    blocks = build_blocks(args.drift_depth, args.dim, args.hidden, 7, 0.3, activation="elu")
    blocks = [b.to(device) for b in blocks]
    g = torch.Generator().manual_seed(8)
    x = torch.randn(args.batch, args.dim, generator=g).to(device)
    stack = reversible_stack(blocks)
    with torch.no_grad():
        growth = float(stack._call(x).norm() / x.norm())
    out: dict[str, Any] = {
        "depth": args.drift_depth,
        "activation_growth": growth,
        "checkpoint_every": stack.checkpoint_every,
    }
    recon = {
        "ours": reconstruction_errors(x, stack.steps()).max().item(),
        "ours_no_anchor": reconstruction_errors(x, stack.steps(), checkpoint_every=args.drift_depth)
        .max()
        .item(),
    }
    if memcnn is not None:
        recon["memcnn"] = max(memcnn_reconstruction_errors(blocks, x, memcnn))
    out["reconstruction_max_rel_error"] = recon
    for b in blocks:
        b.double()
    reference = gradients("plain", blocks, x.double(), memcnn)
    for b in blocks:
        b.float()
    impls = ["plain", "ours", "ours_no_anchor", "checkpoint"] + (["memcnn"] if memcnn else [])
    out["gradient_rel_error_vs_float64"] = {
        impl: relative_error(gradients(impl, blocks, x, memcnn), reference) for impl in impls
    }
    return out


def check_same_outputs(args: Any, device: torch.device, memcnn: Any) -> dict[str, float]:
    """Every implementation computes the same map (max abs difference from plain)."""
    blocks = [b.to(device) for b in build_blocks(4, args.dim, args.hidden, 0, 0.3)]
    x = torch.randn(8, args.dim, device=device)
    with torch.no_grad():
        ref = build_forward("plain", blocks, memcnn)[0](x)
    diffs = {}
    for impl in IMPLS:
        if impl == "memcnn" and memcnn is None:
            continue
        y = build_forward(impl, blocks, memcnn)[0](x.clone())
        diffs[impl] = float((y.detach() - ref).abs().max())
    return diffs


# -- main -------------------------------------------------------------------------------------
def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--depths", default="4,16,64")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--drift-depth", type=int, default=256)
    parser.add_argument("--rss", action="store_true", help="CPU: also peak RSS per impl")
    parser.add_argument("--no-memcnn", action="store_true")
    args = parser.parse_args()
    args.reps = args.reps if args.reps is not None else (3 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    device = setup_device(args)
    depths = [int(d) for d in args.depths.split(",")]
    if args.rss:
        # glibc serves large blocks from its heap, and keeps them, once a freed one raised
        # its dynamic mmap threshold; a fixed threshold returns every tensor of 64 KiB or
        # more to the system when freed, so the resident peak follows the live tensors
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

    memcnn, memcnn_error = (None, "skipped (--no-memcnn)") if args.no_memcnn else import_memcnn()
    impls = [i for i in IMPLS if i != "memcnn" or memcnn is not None]
    if memcnn is None:
        print(f"memcnn not benchmarked: {memcnn_error}")
    result: dict[str, Any] = {
        "benchmark": "reversible",
        "env": env_info(device),
        "memcnn_version": getattr(memcnn, "__version__", None),
        "memcnn_error": memcnn_error,
        "config": {k: getattr(args, k) for k in ("dim", "hidden", "batch", "reps", "warmup")},
        "default_checkpoint_every": DEFAULT_CHECKPOINT_EVERY,
        "same_outputs_max_abs_diff": check_same_outputs(args, device, memcnn),
        "depths": {},
    }
    shape = {"dim": args.dim, "hidden": args.hidden, "batch": args.batch}
    for depth in depths:
        kwargs = {**shape, "depth": depth}
        steps = {impl: build_step(impl, **kwargs, device=str(device)) for impl in impls}
        timing = interleaved_timing(
            steps, device, reps=args.reps, warmup=args.warmup, seed=args.seed
        )
        cpu = {impl: steps[impl].cpu_times[args.warmup :] for impl in impls}
        del steps
        entry: dict[str, Any] = {
            "timing": timing,
            "time_ratio_vs_plain": {},
            "cpu_time": {},
            "memory": {},
        }
        for impl in impls:
            entry["time_ratio_vs_plain"][impl] = paired_ratio(timing, impl, "plain")
            if device.type == "cpu":
                entry["cpu_time"][impl] = {
                    "median": statistics.median(cpu[impl]),
                    "median_of_paired_ratio_vs_plain": statistics.median(
                        a / b for a, b in zip(cpu[impl], cpu["plain"])
                    ),
                    "samples": cpu[impl],
                }
        for impl in impls + MEMORY_ONLY:
            mem: dict[str, Any] = {"saved_tensor_bytes": saved_tensor_peak(impl, kwargs, device)}
            if device.type == "cuda" or args.rss:
                runs = [
                    peak_memory(
                        "bench_reversible:build_step",
                        {"impl": impl, **kwargs, "warm": True},
                        device,
                        steps=2,
                        threads=args.threads,
                    )
                    for _ in range(args.mem_reps or 1)
                ]
                mem["process"] = memory_summary(runs)
            entry["memory"][impl] = mem
        result["depths"][str(depth)] = entry
        medians = {i: timing["impls"][i]["total"]["median"] * 1e3 for i in impls}
        print(f"depth {depth}: " + ", ".join(f"{i} {t:.1f} ms" for i, t in medians.items()))
    result["drift"] = drift(args, device, memcnn)
    sync(device)

    out = Path(args.out) if args.out else RESULTS_DIR / f"reversible_{device.type}.json"
    write_json(result, out)
    print_tables(result, impls, depths, device)
    print(f"\nwritten: {out}")


def _process_mib(mem: dict[str, Any]) -> float | str:
    process = mem.get("process")
    if not process or "median_bytes" not in process:
        return "-"
    return mib(process["median_bytes"])


def _cpu_ratio(entry: dict[str, Any], impl: str) -> float | str:
    cpu = entry.get("cpu_time", {}).get(impl)
    return cpu["median_of_paired_ratio_vs_plain"] if cpu else "-"


def print_tables(result: dict[str, Any], impls: list[str], depths: list[int], device: Any) -> None:
    what = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    rows = []
    for depth in depths:
        entry = result["depths"][str(depth)]
        for impl in impls + MEMORY_ONLY:
            timing = entry["timing"]["impls"].get(impl)
            ratio = entry["time_ratio_vs_plain"].get(impl)
            mem = entry["memory"][impl]
            rows.append(
                [
                    depth,
                    impl,
                    timing["total"]["median"] * 1e3 if timing else "-",
                    ratio["median_of_paired"] if ratio else "-",
                    _cpu_ratio(entry, impl),
                    mib(mem["saved_tensor_bytes"]),
                    _process_mib(mem),
                ]
            )
    print("\n## Training step (forward + backward)\n")
    headers = [
        "depth",
        "impl",
        "median ms",
        "time / plain",
        "CPU time / plain",
        "saved MiB",
        f"{what} MiB",
    ]
    print(markdown_table(headers, rows))

    lo, hi = str(min(depths)), str(max(depths))
    rows = []
    for impl in impls + MEMORY_ONLY:
        a = result["depths"][lo]["memory"][impl]
        b = result["depths"][hi]["memory"][impl]
        saved = b["saved_tensor_bytes"] / max(a["saved_tensor_bytes"], 1)
        pa, pb = _process_mib(a), _process_mib(b)
        proc = pb / pa if isinstance(pa, float) and isinstance(pb, float) and pa > 0 else "-"
        entries = [result["depths"][str(d)] for d in depths]
        wall = [e["time_ratio_vs_plain"].get(impl, {}).get("median_of_paired") for e in entries]
        wall = [t for t in wall if t is not None]
        cpu = [r for r in (_cpu_ratio(e, impl) for e in entries) if isinstance(r, float)]
        rows.append(
            [
                impl,
                saved,
                proc,
                statistics.median(wall) if wall else "-",
                statistics.median(cpu) if cpu else "-",
            ]
        )
    print(f"\n## Memory at depth {hi} / depth {lo}; time vs plain (median over depths)\n")
    headers = ["impl", "saved ratio", f"{what} ratio", "time / plain", "CPU time / plain"]
    print(markdown_table(headers, rows))

    d = result["drift"]
    print(
        f"\n## float32 drift at depth {d['depth']} (activations grow "
        f"{d['activation_growth']:.0f}x; ours anchors every {d['checkpoint_every']})\n"
    )
    rows = []
    for impl, err in d["gradient_rel_error_vs_float64"].items():
        recon = d["reconstruction_max_rel_error"].get(impl, "- (stores activations)")
        rows.append([impl, recon, err])
    print(markdown_table(["impl", "max activation rel. error", "gradient rel. error"], rows))
    print(f"\nsame map (max |y - y_plain|): {result['same_outputs_max_abs_diff']}")


if __name__ == "__main__":
    main()
