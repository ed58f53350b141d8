"""Image density estimation at equal CPU time: 8x8 digits and MNIST-5000.

Models (every one a density of the logit-transformed, uniformly dequantised images, the
protocol of ``examples/digits.py``):

* ``residual_flow``: the image preset :func:`pyro_invres.residual_flow` (multi-scale
  squeeze, ActNorm, 3-1-3 convolutional i-ResNet blocks, factor-out to a standard normal),
  explicit inverse (scoring is one pass per block), Russian-roulette log-det in training;
* ``residual_flow_prior``: the same blocks plus, at every factor-out, a learned conditional
  prior for the factored-out half (Glow's and Residual Flows' split prior):
  ``z_out ~ N(mu(h), sigma(h)^2)`` with ``h`` the kept half, written as a bounded affine
  coupling conditioned on ``h`` (``residual_flow(..., split_prior=True)``; built in this
  script when the recorded run was made, with the same layout and initialisation);
* ``glow`` and ``irevnet``: the presets of :mod:`pyro_invres.flows`;
* ``glow_residual``: the hybrid preset :func:`pyro_invres.flows.glow_residual`, Glow's
  steps each followed by a pixelwise residual block (``PixelResidual``: a nonlinear 1x1
  convolution with an exact per-pixel ``C x C`` log-det); its ablation is ``glow``;
* ``nf_glow``: normflows' ``MultiscaleFlow`` of ``GlowBlock`` (its documented Glow:
  per level ``K`` blocks then ``Squeeze``, ``Merge`` between levels, a learned per-channel
  Gaussian base per level, unconditional);
* ``nf_residual``: the same multi-scale frame with ``Residual(LipschitzCNN)`` blocks
  (3-1-3 kernels, ``reduce_memory=True``) and ``ActNorm``; ``update_lipschitz(model, 5)``
  after every optimiser step, as its users call it;
* ``pyro_coupling``: Pyro's ``affine_coupling`` stack on the flattened image.

**Equal CPU time.** Each model gets the same budget of CPU seconds, spent in alternating
slices (round-robin, the order rotated every round): a model trains for one slice, then the
next model, and so on. CPU time is ``time.thread_time()`` of the training thread (torch runs
one intra-op thread), so other processes on a shared machine do not eat into a model's
budget; wall time is reported beside it. Validation bits/dim is evaluated after every slice
(not charged to the budget); the best state is kept in memory (``copy.deepcopy`` of the
``state_dict``) and a model whose validation score has not improved for ``--patience``
slices stops early. Test bits/dim is measured once, at the best validation point.

**Log-dets at evaluation.** Residual blocks: the exact log-det on the 8x8 digits (64 or
fewer dimensions per block); on MNIST (784 dimensions per block) the unbiased
Russian-roulette estimator with 10 exact terms (normflows' ``Residual`` uses 20 in eval
mode); its noise shows in the standard error reported.

Run::

    python examples/benchmarks/bench_images.py --quick                 # seconds, smoke
    python examples/benchmarks/bench_images.py --datasets digits --budget 240 --figures
    python examples/benchmarks/bench_images.py --device cuda            # fails without CUDA
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import Tensor

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    base_parser,
    env_info,
    markdown_table,
    peak_allocated_cpu,
    setup_device,
    write_json,
)

from pyro_invres import base_shape, glow, irevnet, residual_flow  # noqa: E402
from pyro_invres.datasets import (  # noqa: E402
    DIGITS_LEVELS,
    MNIST_LEVELS,
    bits_per_dim,
    load_digits,
    load_mnist,
)
from pyro_invres.flows import glow_residual  # noqa: E402
from pyro_invres.ops import Exact, Roulette  # noqa: E402
from pyro_invres.transforms.iresnet import InvertibleResidual  # noqa: E402

ALPHA = 0.05  # the logit transform's margin, as examples/digits.py
MODELS = (
    "residual_flow",
    "residual_flow_prior",
    "glow",
    "glow_residual",
    "irevnet",
    "nf_glow",
    "nf_residual",
    "pyro_coupling",
)
LABELS = {
    "residual_flow": "Residual flow (`residual_flow` preset)",
    "residual_flow_prior": "Residual flow + learned split prior (option)",
    "glow": "Glow (`glow` preset)",
    "glow_residual": "Glow + pixelwise residual blocks (`glow_residual` preset)",
    "irevnet": "i-RevNet (`irevnet` preset)",
    "nf_glow": "normflows Glow",
    "nf_residual": "normflows residual flow",
    "pyro_coupling": "Pyro `affine_coupling`, flattened",
}
OURS = ("residual_flow", "residual_flow_prior", "glow", "glow_residual", "irevnet")


# -- data -----------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """Splits on the [0, 1] scale, and the bits/dim accounting."""

    name: str
    shape: tuple[int, int, int]
    levels: int
    train_fn: Callable[[int], Tensor]  # dequantised training images for an epoch's seed
    validation: Tensor
    test: Tensor
    # the dimensions bits/dim are reported per: the original 784 pixels of MNIST zero-padded
    # to 32 x 32 (the padded image's NLL bounds the original's); None: the model's own
    report_dims: int | None = None

    @property
    def dims(self) -> int:
        return math.prod(self.shape)

    def bpd(self, log_p_y: Tensor) -> Tensor:
        """Bits/dim of the discrete images, per image, from ``log p_Y`` on [0, 1]."""
        return bits_per_dim(
            -log_p_y.double(), self.dims, scale=self.levels, report_dims=self.report_dims
        )


def make_dataset(name: str, quick: bool, mnist_size: int = 28) -> Dataset:
    if name == "digits":
        # load_digits has train and test only: a fixed 10 % of train is the validation split
        order = torch.randperm(1438, generator=torch.Generator().manual_seed(7))
        val_idx, train_idx = order[:144], order[144:]

        def train_fn(seed: int) -> Tensor:
            return load_digits("train", dequantize=True, seed=seed)[train_idx]

        validation = load_digits("train", dequantize=True, seed=2023)[val_idx]
        test = load_digits("test", dequantize=True, seed=2024)
        shape, levels = (1, 8, 8), DIGITS_LEVELS
    elif name == "mnist":

        def train_fn(seed: int) -> Tensor:
            return load_mnist("train", dequantize=True, seed=seed, size=mnist_size)

        validation = load_mnist("validation", dequantize=True, seed=2023, size=mnist_size)
        test = load_mnist("test", dequantize=True, seed=2024, size=mnist_size)
        shape, levels = (1, mnist_size, mnist_size), MNIST_LEVELS
    else:
        raise ValueError(f"unknown dataset {name!r}; choose digits or mnist")
    if quick:
        validation, test = validation[:64], test[:64]
    # zero padding adds pixels the model gets for free: report per original pixel
    report = 28 * 28 if name == "mnist" and mnist_size > 28 else None
    return Dataset(name, shape, levels, train_fn, validation, test, report)


def to_logit(y: Tensor) -> tuple[Tensor, Tensor]:
    """``z = logit(alpha + (1 - 2 alpha) y)`` and ``log|dz/dy|`` per image."""
    s = ALPHA + (1.0 - 2.0 * ALPHA) * y
    z = torch.log(s) - torch.log1p(-s)
    ladj = (math.log(1.0 - 2.0 * ALPHA) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(-1)
    return z, ladj


def from_logit(z: Tensor) -> Tensor:
    return (torch.sigmoid(z) - ALPHA) / (1.0 - 2.0 * ALPHA)


# -- sizes ----------------------------------------------------------------------------------------
def sizes(dataset: str, quick: bool) -> dict[str, dict[str, Any]]:
    """Per model its size options; the conv models are in one size class (~0.2-0.6 M)."""
    if quick:
        return {
            "residual_flow": {"num_blocks": 1, "hidden": 8},
            "residual_flow_prior": {"num_blocks": 1, "hidden": 8},
            "glow": {"steps": 1, "hidden": 8},
            "glow_residual": {"steps": 1, "hidden": 8, "residual": 8},
            "irevnet": {"steps": 1, "hidden": 8},
            "nf_glow": {"steps": 1, "hidden": 8},
            "nf_residual": {"num_blocks": 1, "hidden": 8},
            "pyro_coupling": {"layers": 2, "hidden": 16},
        }
    return {
        "residual_flow": {"num_blocks": 4, "hidden": 64},
        "residual_flow_prior": {"num_blocks": 4, "hidden": 64},
        "glow": {"steps": 4, "hidden": 64},
        "glow_residual": {"steps": 4, "hidden": 64, "residual": 16},
        "irevnet": {"steps": 4, "hidden": 48},
        "nf_glow": {"steps": 4, "hidden": 64},
        "nf_residual": {"num_blocks": 4, "hidden": 64},
        "pyro_coupling": {"layers": 8, "hidden": 128 if dataset == "digits" else 256},
    }


NUM_SCALES = 2  # 8 -> 4 -> 2 and 28 -> 14 -> 7


# -- models ---------------------------------------------------------------------------------------
#: Options of the glow presets that a size may set (from the command line); absent: the
#: preset's own default.
PRESET_OPTIONS = ("log_scale_bound", "residual_every")


def _preset_options(size: dict[str, Any]) -> dict[str, Any]:
    return {k: size[k] for k in PRESET_OPTIONS if k in size}


class Model:
    """One density of logit-space images ``(N, C, H, W)``: score, sample, encode, decode."""

    def __init__(self, name: str, data: Dataset, size: dict[str, Any], device: torch.device):
        self.name, self.shape, self.device = name, data.shape, device
        self.kind = "nf" if name.startswith("nf_") else "pyro"
        self.flat = name == "pyro_coupling"
        self.eval_logdet: Any = Exact() if data.dims <= 64 else Roulette(n_exact_terms=10)
        self.train_logdet: Any = Roulette()
        if self.kind == "nf":
            self.module = build_normflows(name, data.shape, size).to(device)
            return
        if name == "residual_flow":
            flow = residual_flow(
                data.shape,
                size["num_blocks"],
                [size["hidden"], size["hidden"]],
                explicit="inverse",
                logdet=self.train_logdet,
                num_scales=NUM_SCALES,
            )
        elif name == "residual_flow_prior":
            flow = residual_flow(
                data.shape,
                size["num_blocks"],
                [size["hidden"], size["hidden"]],
                explicit="inverse",
                logdet=self.train_logdet,
                num_scales=NUM_SCALES,
                split_prior=True,
            )
        elif name == "glow":
            flow = glow(
                data.shape,
                NUM_SCALES,
                size["steps"],
                size["hidden"],
                **_preset_options(size),
            )
        elif name == "glow_residual":
            flow = glow_residual(
                data.shape,
                NUM_SCALES,
                size["steps"],
                size["hidden"],
                residual_channels=size["residual"],
                **_preset_options(size),
            )
        elif name == "irevnet":
            flow = irevnet(data.shape, NUM_SCALES, size["steps"], size["hidden"])
        elif name == "pyro_coupling":
            flow = pyro_coupling_stack(data.dims, size["layers"], size["hidden"])
        else:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        self.flow = flow.to(device)
        self.module = self.flow
        event = torch.Size([data.dims]) if self.flat else base_shape(flow, data.shape)
        self.event = event
        zeros = torch.zeros(event, device=device)
        self.base = dist.Normal(zeros, torch.ones_like(zeros)).to_event(len(event))
        self.dist = dist.TransformedDistribution(self.base, self.flow)

    # residual blocks: the log-det estimator differs between training and evaluation
    def _blocks(self) -> list[InvertibleResidual]:
        return [m for m in self.module.modules() if isinstance(m, InvertibleResidual)]

    def train_mode(self) -> None:
        self.module.train()
        for b in self._blocks():
            b.logdet = self.train_logdet

    def eval_mode(self) -> None:
        self.module.eval()
        for b in self._blocks():
            b.logdet = self.eval_logdet

    def log_prob_z(self, z: Tensor) -> Tensor:
        if self.kind == "nf":
            return self.module.log_prob(z, None)
        return self.dist.log_prob(z.flatten(1) if self.flat else z)

    def encode(self, z: Tensor) -> Tensor:
        """Image (logit space) to the base variable, through the exact inverse map."""
        if self.kind == "nf":
            latents, _ = self.module.inverse_and_log_det(z)
            return torch.cat([v.flatten(1) for v in latents], 1)
        return self.flow.inv(z.flatten(1) if self.flat else z).flatten(1)

    def decode(self, u: Tensor) -> Tensor:
        if self.kind == "nf":
            parts, start = [], 0
            for q in self.module.q0:
                n = math.prod(q.shape)
                parts.append(u[:, start : start + n].reshape(-1, *q.shape))
                start += n
            x, _ = self.module.forward_and_log_det(parts)
            return x
        return self.flow(u.reshape(-1, *self.event)).reshape(-1, *self.shape)

    def sample_z(self, n: int, temperature: float = 1.0) -> Tensor:
        if self.kind == "nf":
            x, _ = self.module.sample(n, temperature=temperature)
            return x
        u = temperature * torch.randn(n, *self.event, device=self.device)
        return self.flow(u).reshape(n, *self.shape)

    def after_step(self) -> None:
        if self.name == "nf_residual":
            from normflows.utils import update_lipschitz

            update_lipschitz(self.module, 5)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def pyro_coupling_stack(dims: int, layers: int, hidden: int) -> ComposeTransformModule:
    """Pyro's ``affine_coupling`` on the flattened image, random permutations between."""
    from pyro.distributions.transforms import Permute
    from pyro.distributions.transforms import affine_coupling as pyro_affine_coupling

    parts: list[Any] = []
    for i in range(layers):
        parts.append(pyro_affine_coupling(dims, hidden_dims=[hidden, hidden]))
        if i < layers - 1:
            parts.append(Permute(torch.randperm(dims)))
    return ComposeTransformModule(parts)


def build_normflows(name: str, shape: tuple[int, int, int], size: dict[str, Any]) -> Any:
    """normflows' multi-scale model, as its Glow example builds it (unconditional)."""
    import normflows as nf

    c, h, w = shape
    levels = NUM_SCALES
    q0, flows, merges = [], [], []
    for i in range(levels):
        # level 0 is the deepest: 2 ** (levels + 1 - i) * c channels once squeezed
        ch = c * 2 ** (levels + 1 - i)
        hw = (h // 2 ** (levels - i), w // 2 ** (levels - i))
        level: list[Any] = []
        for _ in range(size.get("steps", size.get("num_blocks", 1))):
            if name == "nf_glow":
                level.append(nf.flows.GlowBlock(ch, size["hidden"], split_mode="channel"))
            else:
                net = nf.nets.LipschitzCNN(
                    [ch, size["hidden"], size["hidden"], ch], [3, 1, 3], lipschitz_const=0.9
                )
                # ActNorm first: normflows adds log-dets in place, the first must be per sample
                level += [nf.flows.ActNorm((ch, 1, 1)), nf.flows.Residual(net, reduce_memory=True)]
        level.append(nf.flows.Squeeze())
        flows.append(level)
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (levels - i), *hw)
        else:
            latent = (ch, *hw)
        q0.append(nf.distributions.GlowBase(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


# -- training at equal CPU time -------------------------------------------------------------------
@dataclass
class Options:
    budget: float  # CPU seconds per model
    slice: float  # CPU seconds per slice
    batch_size: int = 64
    lr: float = 1e-3
    clip_norm: float = 100.0
    patience: int = 6  # slices without a validation improvement before a model stops
    eval_batch: int = 250
    seed: int = 0


def batches(data: Dataset, batch_size: int, seed: int, device: torch.device):
    """Endless shuffled mini-batches; fresh dequantisation noise every epoch."""
    g = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        y = data.train_fn(seed * 100003 + epoch)
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y) - batch_size + 1, batch_size):
            yield y[order[start : start + batch_size]].to(device)
        epoch += 1


def nll_loss(model: Model, y: Tensor) -> Tensor:
    z, ladj = to_logit(y)
    return -(model.log_prob_z(z) + ladj).mean()


@torch.no_grad()
def score(model: Model, data: Dataset, y: Tensor, batch: int, seed: int) -> Tensor:
    """Bits/dim per image (evaluation log-dets; the estimator's draws seeded)."""
    model.eval_mode()
    torch.manual_seed(seed)
    _np_seed(seed)
    parts = []
    for chunk in y.split(batch):
        z, ladj = to_logit(chunk.to(model.device))
        parts.append(data.bpd(model.log_prob_z(z) + ladj).cpu())
    model.train_mode()
    return torch.cat(parts)


def _np_seed(seed: int) -> None:
    import numpy as np

    np.random.seed(seed)  # normflows draws its roulette terms with numpy


class Run:
    """A model's training state across slices."""

    def __init__(self, name: str, data: Dataset, size: dict[str, Any], opts: Options, dev):
        torch.manual_seed(opts.seed)
        self.name, self.data, self.opts = name, data, opts
        self.model = Model(name, data, size, dev)
        self.model.train_mode()
        self.params = [p for p in self.model.module.parameters() if p.requires_grad]
        self.optim = torch.optim.Adam(self.params, lr=opts.lr)
        self.batches = batches(data, opts.batch_size, opts.seed, dev)
        self.cpu = self.wall = 0.0
        self.steps = self.skipped = self.since_best = 0
        self.curve: list[dict[str, float]] = []
        self.best = (math.inf, 0, 0.0)  # (validation bpd, steps, cpu)
        self.best_state: dict[str, Tensor] | None = None
        self.stopped: str | None = None

    def step(self) -> None:
        y = next(self.batches)
        loss = nll_loss(self.model, y)
        if not torch.isfinite(loss):
            self.skipped += 1  # a non-finite batch is skipped, and counted
            if self.skipped > 20:
                self.stopped = "diverged (more than 20 non-finite losses)"
            return
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.opts.clip_norm)
        self.optim.step()
        self.model.after_step()
        self.steps += 1

    def train_slice(self, device: torch.device) -> None:
        """Train for one slice of CPU time (``time.thread_time``), within the budget."""
        left = self.opts.budget - self.cpu
        target = min(self.opts.slice, left)
        c0, w0 = time.thread_time(), time.perf_counter()
        while time.thread_time() - c0 < target and self.stopped is None:
            self.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        self.cpu += time.thread_time() - c0
        self.wall += time.perf_counter() - w0

    def validate(self) -> None:
        bpd = float(score(self.model, self.data, self.data.validation, 500, seed=11).mean())
        self.curve.append({"cpu_s": self.cpu, "steps": self.steps, "val_bpd": bpd})
        if bpd < self.best[0]:
            self.best = (bpd, self.steps, self.cpu)
            self.best_state = copy.deepcopy(self.model.module.state_dict())
            self.since_best = 0
        else:
            self.since_best += 1
            if not math.isfinite(bpd) and self.best_state is None:
                self.stopped = "non-finite validation score"
            elif self.since_best >= self.opts.patience:
                self.stopped = f"early stop: no improvement in {self.opts.patience} slices"

    @property
    def done(self) -> bool:
        return self.stopped is not None or self.cpu >= self.opts.budget - 1e-9


def train_round_robin(runs: list[Run], device: torch.device, log: Callable[[str], None]) -> None:
    rnd = 0
    while not all(r.done for r in runs):
        order = runs[rnd % len(runs) :] + runs[: rnd % len(runs)]
        for run in order:
            if run.done:
                continue
            run.train_slice(device)
            run.validate()
            log(
                f"  round {rnd} {run.name:20s} steps {run.steps:6d} cpu {run.cpu:7.1f}s "
                f"val {run.curve[-1]['val_bpd']:.4f} (best {run.best[0]:.4f})"
            )
        rnd += 1


# -- measurements after training ------------------------------------------------------------------
def memory_of_step(run_factory: Callable[[], Run], device: torch.device) -> dict[str, Any]:
    """Peak memory of a training step, on a fresh copy of the model (after its first step)."""
    run = run_factory()
    run.step()  # data-dependent initialisation (ActNorm) outside the measurement

    def step(timer: Any) -> None:
        run.step()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run.step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return {"peak_bytes": int(peak), "method": "torch.cuda.max_memory_allocated delta"}
    return peak_allocated_cpu(step, steps=2)


@torch.no_grad()
def sampling_speed(model: Model, n: int, device: torch.device) -> dict[str, float]:
    model.eval_mode()
    torch.manual_seed(0)
    _np_seed(0)
    c0, w0 = time.thread_time(), time.perf_counter()
    model.sample_z(n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
    model.train_mode()
    return {"n": n, "cpu_s": cpu, "wall_s": wall, "samples_per_cpu_s": n / max(cpu, 1e-9)}


def run_dataset(
    name: str, args: Any, device: torch.device, log: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Run]]:
    data = make_dataset(name, args.quick, args.mnist_size)
    budget = args.budget if name == "digits" else args.budget_mnist
    opts = Options(budget=budget, slice=args.slice, patience=args.patience, seed=args.seed)
    size = sizes(name, args.quick)
    if args.residual_channels is not None:
        size["glow_residual"]["residual"] = args.residual_channels
    if args.coupling_bound is not None:
        size["glow_residual"]["log_scale_bound"] = args.coupling_bound
    if args.glow_coupling_bound is not None:
        size["glow"]["log_scale_bound"] = args.glow_coupling_bound
    if args.residual_every is not None:
        size["glow_residual"]["residual_every"] = args.residual_every
    runs = [Run(m, data, size[m], opts, device) for m in args.models]
    log(
        f"{name}: {len(runs)} models, {budget:.0f} CPU s each in slices of {opts.slice:.0f} s; "
        f"train {len(data.train_fn(0))}, validation {len(data.validation)}, test {len(data.test)}"
    )
    train_round_robin(runs, device, log)
    models: dict[str, Any] = {}
    for run in runs:
        if run.best_state is not None:
            run.model.module.load_state_dict(run.best_state)
        test = score(run.model, data, data.test, 500, seed=12)
        memory = memory_of_step(lambda r=run: Run(r.name, data, size[r.name], opts, device), device)
        models[run.name] = {
            "label": LABELS[run.name],
            "parameters": run.model.num_params(),
            "size": size[run.name],
            "test_bpd": float(test.mean()),
            "test_bpd_stderr": float(test.std() / math.sqrt(len(test))),
            # one badly scored image moves the mean by (its bpd - the rest's) / n_test: the
            # median and the worst images say whether a difference is the model or one image
            "test_bpd_median": float(test.median()),
            "test_bpd_worst": [
                [int(i), float(test[i])] for i in test.argsort(descending=True)[:5].tolist()
            ],
            "best_validation_bpd": run.best[0],
            "best_at_steps": run.best[1],
            "best_at_cpu_s": run.best[2],
            "steps": run.steps,
            "skipped_nonfinite_steps": run.skipped,
            "train_cpu_s": run.cpu,
            "train_wall_s": run.wall,
            "cpu_s_per_step": run.cpu / max(run.steps, 1),
            "wall_s_per_step": run.wall / max(run.steps, 1),
            "stopped": run.stopped or "budget spent",
            "validation_curve": run.curve,
            "peak_step_memory_bytes": memory.get("peak_bytes"),
            "memory_method": memory.get("method"),
            "sampling": sampling_speed(run.model, 16 if args.quick else 64, device),
        }
        log(
            f"  {run.name:20s} test {models[run.name]['test_bpd']:.4f} "
            f"(best val {run.best[0]:.4f} at {run.best[1]} steps) params {run.model.num_params()}"
        )
    result = {
        "dataset": name,
        "shape": list(data.shape),
        "levels": data.levels,
        "n_train": len(data.train_fn(0)),
        "n_validation": len(data.validation),
        "n_test": len(data.test),
        "budget_cpu_s_per_model": budget,
        "slice_cpu_s": opts.slice,
        "patience_slices": opts.patience,
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "eval_logdet": {
            "residual blocks": "exact" if data.dims <= 64 else "Roulette(n_exact_terms=10)"
        },
        "models": models,
    }
    return result, {r.name: r for r in runs}


# -- figures --------------------------------------------------------------------------------------
TEMPERATURE = 0.7


def _grid(ax: Any, images: Tensor) -> None:
    ax.imshow(images.numpy(), cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _row(images: Tensor) -> Tensor:
    """``(n, 1, H, W)`` -> one ``(H, n W)`` strip with a 1-pixel gap."""
    pad = torch.nn.functional.pad(images[:, 0], (0, 1, 0, 1), value=0.0)
    return pad.permute(1, 0, 2).reshape(pad.shape[1], -1)[:-1, :-1]


@torch.no_grad()
def make_figures(
    dataset: str, result: dict[str, Any], runs: dict[str, Run], figdir: Path, n: int = 8
) -> dict[str, Any]:
    """Samples, reconstructions and i-RevNet-style interpolations; returns what they state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir.mkdir(parents=True, exist_ok=True)
    data = next(iter(runs.values())).data
    test = data.test[:n]
    stated: dict[str, Any] = {"temperature": TEMPERATURE, "reconstruction_max_abs_error": {}}
    names = list(runs)

    def figure(rows: list[tuple[str, Tensor]], path: Path) -> None:
        fig, axes = plt.subplots(len(rows), 1, figsize=(0.55 * n + 2.8, 0.62 * len(rows)))
        axes = [axes] if len(rows) == 1 else axes
        for ax, (label, images) in zip(axes, rows):
            _grid(ax, _row(images.clamp(0, 1).cpu()))
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        fig.tight_layout(pad=0.2)
        fig.savefig(path, dpi=80)
        plt.close(fig)

    rows = [("real (test)", test)]
    for name in names:
        model = runs[name].model
        model.eval_mode()
        torch.manual_seed(3)
        _np_seed(3)
        rows.append((name, from_logit(model.sample_z(n, TEMPERATURE))))
        model.train_mode()
    figure(rows, figdir / f"images_{dataset}_samples.png")

    rows = [("real (test)", test)]
    for name in names:
        model = runs[name].model
        model.eval_mode()
        z, _ = to_logit(test.to(model.device))
        back = model.decode(model.encode(z))
        err = float((from_logit(back).cpu() - test).abs().max())
        stated["reconstruction_max_abs_error"][name] = err
        rows.append((f"{name}\nmax err {err:.1e}", from_logit(back)))
        model.train_mode()
    figure(rows, figdir / f"images_{dataset}_reconstructions.png")

    # interpolation between two test images' representations, through the exact inverse
    pairs = [(0, 1), (2, 3)]
    rows = []
    t = torch.linspace(0, 1, n)
    for name in [m for m in ("irevnet", "residual_flow", "residual_flow_prior") if m in runs]:
        model = runs[name].model
        model.eval_mode()
        for a, b in pairs:
            z, _ = to_logit(data.test[[a, b]].to(model.device))
            u = model.encode(z)
            tt = t.to(u)[:, None]
            path = (1 - tt) * u[:1] + tt * u[1:]
            rows.append((f"{name} {a}->{b}", from_logit(model.decode(path))))
        model.train_mode()
    if rows:
        figure(rows, figdir / f"images_{dataset}_interpolation.png")

    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for name in names:
        curve = result["models"][name]["validation_curve"]
        ax.plot([p["cpu_s"] for p in curve], [p["val_bpd"] for p in curve], label=name)
    best = min(m["best_validation_bpd"] for m in result["models"].values())
    top = sorted(p["val_bpd"] for m in result["models"].values() for p in m["validation_curve"])
    ax.set_ylim(best - 0.05, top[len(top) // 2] + 0.3)
    ax.set_xlabel("training CPU seconds")
    ax.set_ylabel("validation bits/dim")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(figdir / f"images_{dataset}_validation.png", dpi=80)
    plt.close(fig)
    return stated


# -- rendering ------------------------------------------------------------------------------------
def render_table(result: dict[str, Any]) -> str:
    """The markdown table of one data set's results."""
    headers = [
        "Model",
        "Params",
        "Test bits/dim",
        "Best val bits/dim",
        "Steps (best at)",
        "CPU ms/step",
        "Peak step MiB",
        "Samples/CPU s",
        "Stopped",
    ]
    rows = []
    models = result["models"]
    for name in sorted(models, key=lambda k: models[k]["test_bpd"]):
        m = models[name]
        rows.append(
            [
                m["label"],
                f"{m['parameters'] / 1e3:.0f} k",
                f"{m['test_bpd']:.3f} ± {m['test_bpd_stderr']:.3f}",
                f"{m['best_validation_bpd']:.3f}",
                f"{m['steps']} ({m['best_at_steps']})",
                f"{1e3 * m['cpu_s_per_step']:.0f}",
                f"{(m['peak_step_memory_bytes'] or 0) / 2**20:.1f}",
                f"{m['sampling']['samples_per_cpu_s']:.0f}",
                m["stopped"],
            ]
        )
    return markdown_table(headers, rows)


def target_sentence(result: dict[str, Any]) -> str:
    """Whether the image residual flow's test bits/dim is at most the Glow preset's."""
    models = result["models"]
    if "glow" not in models:
        return ""
    g = models["glow"]["test_bpd"]
    out = []
    for name in ("residual_flow", "residual_flow_prior"):
        if name in models:
            r = models[name]["test_bpd"]
            verdict = "met" if r <= g else "missed"
            m, gm = models[name], models["glow"]
            out.append(
                f"`{name}` {r:.3f} against Glow {g:.3f} bits/dim: target {verdict} "
                f"({r - g:+.3f} bits/dim); a step cost "
                f"{m['cpu_s_per_step'] / gm['cpu_s_per_step']:.1f}x Glow's CPU time "
                f"({1e3 * m['cpu_s_per_step']:.0f} against {1e3 * gm['cpu_s_per_step']:.0f} ms), "
                f"so it took {m['steps']} steps to Glow's {gm['steps']}."
            )
            # per step: Glow's validation point nearest the residual flow's best step count
            near = min(gm["validation_curve"], key=lambda p: abs(p["steps"] - m["best_at_steps"]))
            out.append(
                f"Per step: at {m['best_at_steps']} steps its validation score was "
                f"{m['best_validation_bpd']:.3f}, Glow's {near['val_bpd']:.3f} at "
                f"{near['steps']} steps."
            )
    return " ".join(out)


def compare(results: Sequence[dict[str, Any]], base: str = "glow") -> str:
    """Paired runs as a markdown table: each model against ``base``, seed by seed.

    One row per (data set, model, size) over every results file that trained both: the
    seeds, the mean test bits/dim of the base and of the model in those runs, the
    difference by seed (model minus base: negative is a win), its mean with the standard
    error over seeds, the CPU milliseconds per step of each, and the learning per step:
    the base's best validation bits/dim over as many steps as the model took, minus the
    model's best (positive: the model is ahead at equal steps), min-max over seeds.
    """
    groups: dict[tuple, list[tuple]] = {}
    for r in results:
        seed = r.get("seed")
        if seed is None:  # files written before the seed was recorded: read the command
            words = r.get("command", "").split()
            seed = int(words[words.index("--seed") + 1]) if "--seed" in words else 0
        for name, data in r["datasets"].items():
            models = data["models"]
            if base not in models:
                continue
            b = models[base]
            for model, m in models.items():
                if model == base:
                    continue
                key = (name, data.get("budget_cpu_s_per_model"), model, json.dumps(m["size"]))
                groups.setdefault(key, []).append((seed, b, m))
    lines = [
        f"| data | budget (CPU s) | model | size | seeds | {base} test bits/dim | model "
        "| difference by seed | mean difference | CPU ms/step | ahead at equal steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, budget, model, size), runs in sorted(groups.items(), key=str):
        runs.sort(key=lambda t: (t[0] is None, t[0]))
        diffs = [m["test_bpd"] - b["test_bpd"] for _, b, m in runs]
        mean = sum(diffs) / len(diffs)
        se = (
            (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
            if len(diffs) > 1
            else float("nan")
        )
        base_bpd = sum(b["test_bpd"] for _, b, _ in runs) / len(runs)
        model_bpd = sum(m["test_bpd"] for _, _, m in runs) / len(runs)
        ms_b = [1e3 * b["cpu_s_per_step"] for _, b, _ in runs]
        ms_m = [1e3 * m["cpu_s_per_step"] for _, _, m in runs]
        ahead = [_ahead_at_equal_steps(b, m) for _, b, m in runs]
        ahead_cell = (
            "-" if None in ahead else f"{min(ahead):+.3f} to {max(ahead):+.3f}"  # type: ignore[type-var]
        )
        seeds = ", ".join(str(s) for s, _, _ in runs)
        by_seed = ", ".join(f"{d:+.3f}" for d in diffs)
        sizes = ", ".join(f"{k} {v}" for k, v in json.loads(size).items())
        lines.append(
            f"| {name} | {budget:g} | {model} | {sizes} "
            f"| {seeds} | {base_bpd:.3f} | {model_bpd:.3f} | {by_seed} | {mean:+.3f} ± {se:.3f} "
            f"| {min(ms_b):.0f}-{max(ms_b):.0f} / {min(ms_m):.0f}-{max(ms_m):.0f} "
            f"| {ahead_cell} |"
        )
    return "\n".join(lines)


def _ahead_at_equal_steps(base: dict[str, Any], model: dict[str, Any]) -> float | None:
    """Base's best validation bits/dim within the model's step count minus the model's best."""
    curve_b, curve_m = base.get("validation_curve"), model.get("validation_curve")
    if not curve_b or not curve_m:
        return None
    steps = curve_m[-1]["steps"]
    within = [p["val_bpd"] for p in curve_b if p["steps"] <= steps]
    if not within:
        return None
    return min(within) - min(p["val_bpd"] for p in curve_m)


def render(results: dict[str, Any]) -> str:
    """Tables and target sentences for every data set in a results JSON."""
    parts = []
    for name, result in results["datasets"].items():
        shape = "x".join(str(s) for s in result["shape"][1:])
        parts.append(
            f"### {name} ({shape}, {result['n_train']} / {result['n_validation']} / "
            f"{result['n_test']} images)\n\n"
            f"Budget: {result['budget_cpu_s_per_model']:.0f} CPU s per model in slices of "
            f"{result['slice_cpu_s']:g} s; batch {result['batch_size']}, Adam "
            f"{result['lr']:g}.\n\n" + render_table(result) + "\n\n" + target_sentence(result)
        )
    return "\n\n".join(parts) + "\n"


BEGIN, END = "<!-- bench_images tables: begin -->", "<!-- bench_images tables: end -->"


def render_into(doc: Path, text: str) -> None:
    """Replace what lies between the two markers of ``doc`` by ``text``."""
    page = doc.read_text()
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} markers")
    head, rest = page.split(BEGIN, 1)
    doc.write_text(head + BEGIN + "\n\n" + text + "\n" + END + rest.split(END, 1)[1])


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One results document from runs of separate data sets (each keeps its command)."""
    out: dict[str, Any] = {"benchmark": "bench_images", "runs": [], "datasets": {}}
    for r in results:
        out["runs"].append({k: r[k] for k in ("command", "env", "cpu_clock", "protocol")})
        for name, result in r["datasets"].items():
            out["datasets"][name] = {**result, "command": r["command"]}
    return out


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--budget", type=float, default=240.0, help="digits: CPU s per model")
    parser.add_argument("--budget-mnist", type=float, default=300.0, help="MNIST: CPU s/model")
    parser.add_argument("--slice", type=float, default=None, help="CPU s per slice")
    parser.add_argument("--patience", type=int, default=6, help="slices without improvement")
    parser.add_argument("--mnist-size", type=int, default=28, choices=[24, 28, 32])
    parser.add_argument(
        "--residual-channels",
        type=int,
        default=None,
        help="hidden units of glow_residual's pixelwise blocks (default 16, 8 with --quick)",
    )
    parser.add_argument(
        "--coupling-bound",
        type=float,
        default=None,
        help="bound on the log-scales of glow_residual's couplings (default: the preset's, 2.0; "
        "the glow preset keeps its own)",
    )
    parser.add_argument(
        "--glow-coupling-bound",
        type=float,
        default=None,
        help="bound on the log-scales of the glow preset's couplings (default: the preset's, "
        "2.0); a control for --coupling-bound",
    )
    parser.add_argument(
        "--residual-every",
        type=int,
        default=None,
        help="glow_residual: a pixelwise block after every k-th step of each scale only "
        "(default: the preset's, 2)",
    )
    parser.add_argument("--figures", default=None, help="write the PNGs into this folder")
    parser.add_argument("--render", default=None, help="print the tables of a results JSON")
    parser.add_argument(
        "--into", default=None, help="with --render: replace the tables between the markers here"
    )
    parser.add_argument(
        "--merge", nargs="+", default=None, help="combine the data sets of results JSONs into --out"
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        default=None,
        help="print each model against glow, seed by seed, over these results JSONs",
    )
    args = parser.parse_args(argv)
    for d in args.datasets:
        if d not in ("digits", "mnist"):
            parser.error(f"unknown dataset {d!r}; choose digits, mnist")
    if args.quick:
        args.budget = args.budget_mnist = 1.0
        args.slice = args.slice or 0.5
    args.slice = args.slice or 20.0
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        text = render(json.loads(Path(args.render).read_text()))
        if args.into:
            render_into(Path(args.into), text)
        else:
            print(text)
        return {}
    if args.compare:
        print(compare([json.loads(Path(p).read_text()) for p in args.compare]))
        return {}
    if args.merge:
        merged = merge([json.loads(Path(p).read_text()) for p in args.merge])
        write_json(merged, Path(args.out) if args.out else RESULTS_DIR / "images_cpu.json")
        return merged
    device = setup_device(args)

    def log(msg: str) -> None:
        print(msg, flush=True)

    out: dict[str, Any] = {
        "benchmark": "bench_images",
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "env": env_info(device),
        "cpu_clock": "time.thread_time() of the training thread (torch.set_num_threads(1))",
        "protocol": "equal CPU time per model in round-robin slices, validation after each "
        "slice (not charged), early stopping, test at the best validation state",
        "seed": args.seed,
        "datasets": {},
    }
    path = Path(args.out) if args.out else RESULTS_DIR / f"images_{device.type}.json"
    for name in args.datasets:
        result, runs = run_dataset(name, args, device, log)
        if args.figures:
            result["figures"] = make_figures(name, result, runs, Path(args.figures))
        out["datasets"][name] = result
        if not args.quick or args.out:
            write_json(out, path)  # after every data set: a stopped run keeps what it has
    print(render(out))
    return out


if __name__ == "__main__":
    main()
