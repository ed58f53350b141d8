"""Density estimation on scikit-learn's 8x8 digits: Glow, i-RevNet, a residual flow, and
Pyro's own affine coupling, compared in test bits per dimension and wall time.

Every model is a :class:`pyro.distributions.TransformedDistribution` of a standard normal,
trained by maximum likelihood (Adam on ``-log_prob``) for the same number of steps on the
same mini-batches, and scored on the held-out test split. It prints its numbers and,
only when asked, writes

* ``examples/results/digits.json``: the numbers, the options and the environment;
* ``docs/digits.md``: the documentation page, table included (nothing is typed by hand);
* ``docs/_static/figures/digits_samples.png``: samples of each model next to real digits;
* ``docs/_static/figures/digits_training.png``: the training curves,

in the repository with ``--save`` (the recorded run), or under ``--out DIR``. Run::

    python examples/digits.py --save          # the defaults: a few minutes on 2 cores
    python examples/digits.py --quick         # a smoke run: prints, writes nothing

**Pre-processing.** The digits take the 17 values ``0..16``.
:func:`pyro_invres.datasets.load_digits` dequantises them, ``y = (x + u) / 17`` with
``u ~ U[0, 1)^64``; then, as in Real NVP,

.. math::

    z = \\operatorname{logit}(\\alpha + (1 - 2\\alpha)\\, y), \\qquad \\alpha = 0.05,

and the flows model ``z``. The density of ``y`` is ``p_Y(y) = p_Z(z) |dz/dy|`` with

.. math::

    \\log\\left|\\frac{dz}{dy}\\right| = \\sum_{i=1}^{64} \\big[\\log(1 - 2\\alpha)
    - \\log s_i - \\log(1 - s_i)\\big], \\qquad s = \\alpha + (1 - 2\\alpha) y ,

and :func:`pyro_invres.datasets.bits_per_dim` adds the ``64 log 17`` of the division by
17 and converts nats per image to bits per dimension of the discrete data (an upper
bound on its negative log-likelihood, by Jensen). Two checks of this accounting run
every time (and in ``tests/test_examples_digits.py``): the uniform density on
``[0, 1]^64``, written as a density of ``z`` with Pyro's own transforms, must score
exactly ``log2(17) = 4.0875`` bits/dim; and a per-pixel histogram model, scored through
the continuous pipeline, must equal its directly computed discrete cross-entropy.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import Tensor

from pyro_invres import InvertibleResidual, base_shape, glow, irevnet, residual_flow
from pyro_invres.datasets import DIGITS_LEVELS, bits_per_dim, load_digits

REPO = Path(__file__).resolve().parent.parent
SHAPE = (1, 8, 8)
DIMS = 64
ALPHA = 0.05
TEST_NOISE_SEED = 2024  # the test split's dequantisation noise: the same for every model
MODELS = ("glow", "irevnet", "residual_flow", "pyro_affine_coupling")
LABELS = {
    "glow": "Glow (`glow`)",
    "irevnet": "i-RevNet, affine (`irevnet`)",
    "residual_flow": "Residual flow (`residual_flow`, image)",
    "pyro_affine_coupling": "Pyro `affine_coupling` stack (64-D)",
    "histogram": "Independent pixel histogram (baseline)",
}
SHORT = {
    "glow": "Glow",
    "irevnet": "i-RevNet",
    "residual_flow": "Residual flow",
    "pyro_affine_coupling": "Pyro affine coupling",
}


# -- the pre-processing and the accounting ------------------------------------------------------
def to_logit(y: Tensor, alpha: float = ALPHA) -> tuple[Tensor, Tensor]:
    """``z = logit(alpha + (1 - 2 alpha) y)`` and ``log|dz/dy|`` summed per image."""
    s = alpha + (1.0 - 2.0 * alpha) * y
    z = torch.log(s) - torch.log1p(-s)
    ladj = (math.log(1.0 - 2.0 * alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(-1)
    return z, ladj


def from_logit(z: Tensor, alpha: float = ALPHA) -> Tensor:
    """The inverse of :func:`to_logit` (values of ``z`` off the data range leave ``[0, 1]``)."""
    return (torch.sigmoid(z) - alpha) / (1.0 - 2.0 * alpha)


def log_prob_y(log_prob_z: Callable[[Tensor], Tensor], y: Tensor) -> Tensor:
    """``log p_Y(y) = log p_Z(z) + log|dz/dy|`` per image, for ``y`` of shape (N, 1, 8, 8)."""
    z, ladj = to_logit(y)
    return log_prob_z(z) + ladj


def bpd_of(log_p_y: Tensor) -> float:
    """Bits/dim of the discrete digits from ``log p_Y`` on the [0, 1] scale (a mean)."""
    return float(bits_per_dim(-log_p_y.double().mean(), DIMS, scale=DIGITS_LEVELS))


def uniform_sanity_check(y: Tensor) -> float:
    """Bits/dim of the uniform density on [0, 1]^64, expressed as a density of ``z``.

    The density of ``z`` is built with Pyro's transforms (uniform ``y``, then the affine
    squeeze and the logit), independently of :func:`to_logit`'s log-Jacobian; scored
    through :func:`log_prob_y` and :func:`bpd_of` it must give exactly ``log2(17)``.
    """
    y = y.double().flatten(1)
    uniform_y = dist.Uniform(torch.zeros(DIMS, dtype=y.dtype), torch.ones(DIMS, dtype=y.dtype))
    density_z = dist.TransformedDistribution(
        uniform_y.to_event(1),
        [
            dist.transforms.AffineTransform(ALPHA, 1.0 - 2.0 * ALPHA),
            dist.transforms.SigmoidTransform().inv,
        ],
    )
    return bpd_of(log_prob_y(density_z.log_prob, y))


class PixelHistogram:
    """Independent pixels, each a categorical over the 17 levels (add-one smoothing).

    As a density on ``[0, 1]^64`` it is constant on each bin ``[k/17, (k+1)/17)``, with
    value ``17 P(k)``; so its bits/dim through the continuous pipeline must equal the
    discrete cross-entropy ``-mean log2 P(x)`` exactly: a check of the scale term.
    """

    def __init__(self, y_train: Tensor) -> None:
        levels = self.levels(y_train)
        counts = torch.stack(
            [torch.bincount(levels[:, i], minlength=DIGITS_LEVELS) for i in range(DIMS)]
        )
        self.log_p = torch.log((counts + 1.0).double() / (counts.sum(-1, keepdim=True) + 17.0))

    @staticmethod
    def levels(y: Tensor) -> Tensor:
        return (y.double().flatten(1) * DIGITS_LEVELS).floor().long().clamp(0, 16)

    def log_prob_levels(self, y: Tensor) -> Tensor:
        """``log P(x)`` of the discrete images (nats per image)."""
        return self.log_p.gather(1, self.levels(y).T).sum(0)

    def log_prob_y(self, y: Tensor) -> Tensor:
        """The density on [0, 1]^64: ``log P(x) + 64 log 17``."""
        return self.log_prob_levels(y) + DIMS * math.log(DIGITS_LEVELS)

    def log_prob_z(self, z: Tensor) -> Tensor:
        """The same density expressed in logit space (for the pipeline check)."""
        y = from_logit(z.double())
        return self.log_prob_y(y) - to_logit(y)[1]


# -- the models -----------------------------------------------------------------------------------
@dataclass
class Sizes:
    glow: dict[str, int]
    irevnet: dict[str, int]
    residual_flow: dict[str, Any]
    pyro_affine_coupling: dict[str, Any]


DEFAULT_SIZES = Sizes(
    glow={"num_scales": 2, "steps_per_scale": 4, "hidden_channels": 64},
    irevnet={"num_scales": 2, "blocks_per_scale": 4, "hidden_channels": 48},
    residual_flow={"num_blocks": 4, "hidden_dims": [64, 64], "num_scales": 2},
    pyro_affine_coupling={"num_layers": 8, "hidden_dims": [128, 128]},
)
QUICK_SIZES = Sizes(
    glow={"num_scales": 2, "steps_per_scale": 1, "hidden_channels": 8},
    irevnet={"num_scales": 2, "blocks_per_scale": 1, "hidden_channels": 8},
    residual_flow={"num_blocks": 1, "hidden_dims": [8], "num_scales": 2},
    pyro_affine_coupling={"num_layers": 2, "hidden_dims": [16]},
)

#: Residual flow: the log-det estimator for training and the one for the test score.
TRAIN_LOGDET = "roulette"
EVAL_LOGDET = "exact"


class Model:
    """A flow, its base, and ``log p_Z`` of images ``(N, 1, 8, 8)`` in logit space."""

    def __init__(self, name: str, sizes: Sizes, seed: int) -> None:
        torch.manual_seed(seed)
        self.name = name
        self.flat = name == "pyro_affine_coupling"
        if name == "glow":
            self.flow = glow(SHAPE, **sizes.glow)
        elif name == "irevnet":
            self.flow = irevnet(SHAPE, **sizes.irevnet)
        elif name == "residual_flow":
            opts = dict(sizes.residual_flow)
            self.flow = residual_flow(
                SHAPE,
                opts.pop("num_blocks"),
                opts.pop("hidden_dims"),
                explicit="inverse",  # scoring data is one explicit pass per block
                logdet=TRAIN_LOGDET,
                **opts,
            )
        elif name == "pyro_affine_coupling":
            self.flow = pyro_affine_stack(**sizes.pyro_affine_coupling)
        else:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        event = torch.Size([DIMS]) if self.flat else base_shape(self.flow, SHAPE)
        base = dist.Normal(torch.zeros(event), torch.ones(event)).to_event(len(event))
        self.dist = dist.TransformedDistribution(base, self.flow)

    def residual_blocks(self) -> list[InvertibleResidual]:
        return [m for m in self.flow.modules() if isinstance(m, InvertibleResidual)]

    def set_logdet(self, method: str) -> None:
        for block in self.residual_blocks():
            block.logdet = method

    def log_prob_z(self, z: Tensor) -> Tensor:
        return self.dist.log_prob(z.flatten(1) if self.flat else z)

    def sample_z(self, n: int) -> Tensor:
        z = self.dist.sample((n,))
        return z.reshape(n, *SHAPE)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.flow.parameters())


def pyro_affine_stack(num_layers: int, hidden_dims: Sequence[int]) -> ComposeTransformModule:
    """Pyro's ``affine_coupling`` on the flattened 64-D vectors, random permutations between."""
    from pyro.distributions.transforms import Permute, affine_coupling

    parts: list[Any] = []
    for i in range(num_layers):
        parts.append(affine_coupling(DIMS, hidden_dims=list(hidden_dims)))
        if i < num_layers - 1:
            parts.append(Permute(torch.randperm(DIMS)))
    return ComposeTransformModule(parts)


# -- training and evaluation ----------------------------------------------------------------
@dataclass
class Options:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    clip_norm: float = 100.0
    seed: int = 0
    eval_batch: int = 128
    n_samples: int = 10
    sizes: Sizes = field(default_factory=lambda: DEFAULT_SIZES)


def batches(n_train: int, opts: Options, seed: int):
    """Mini-batches for ``opts.steps`` steps; fresh dequantisation noise every epoch."""
    g = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        y = load_digits("train", dequantize=True, seed=seed * 100003 + epoch)
        order = torch.randperm(n_train, generator=g)
        for start in range(0, n_train - opts.batch_size + 1, opts.batch_size):
            yield y[order[start : start + opts.batch_size]]
        epoch += 1


def train(model: Model, opts: Options, n_train: int) -> tuple[float, float, list[float]]:
    """Adam on the mean ``-log p_Y`` of mini-batches: wall and CPU seconds, and the curve."""
    params = list(model.flow.parameters())
    optim = torch.optim.Adam(params, lr=opts.lr)
    curve: list[float] = []
    model.flow.train()
    data = batches(n_train, opts, opts.seed)
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(opts.steps):
        y = next(data)
        loss = -log_prob_y(model.log_prob_z, y).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{model.name}: non-finite loss {loss.item()} at step {step}")
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opts.clip_norm)
        optim.step()
        curve.append(float(bits_per_dim(loss.item(), DIMS)))
    return time.perf_counter() - start, time.process_time() - cpu, curve


@torch.no_grad()
def evaluate(
    model: Model, y_test: Tensor, opts: Options, logdet: str = EVAL_LOGDET
) -> tuple[float, float, float]:
    """Test bits/dim (residual flow: exact log-det), and the wall and CPU seconds."""
    model.flow.eval()
    model.set_logdet(logdet)
    start, cpu = time.perf_counter(), time.process_time()
    parts = [log_prob_y(model.log_prob_z, chunk) for chunk in y_test.split(opts.eval_batch)]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    model.set_logdet(TRAIN_LOGDET)
    return bpd_of(torch.cat(parts)), seconds, cpu


@torch.no_grad()
def sample(model: Model, n: int, seed: int) -> tuple[Tensor, float]:
    """``n`` samples on the [0, 1] scale (clamped) and the wall time."""
    model.flow.eval()
    torch.manual_seed(seed)
    start = time.perf_counter()
    y = from_logit(model.sample_z(n))
    return y.clamp(0.0, 1.0), time.perf_counter() - start


# -- outputs --------------------------------------------------------------------------------------
def environment(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def save_figures(
    out: Path,
    samples: dict[str, Tensor],
    real: Tensor,
    curves: dict[str, list[float]],
    test_bpd: dict[str, float],
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir = out / "docs" / "_static" / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    rows = [("Real (test)", real)] + [(SHORT[k], v) for k, v in samples.items()]
    n = real.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(0.75 * n + 1.6, 0.8 * len(rows)))
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c, 0].numpy(), cmap="gray_r", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.3)
    fig.savefig(figdir / "digits_samples.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    tops = []
    for name, curve in curves.items():
        k = max(1, len(curve) // 50)
        smooth = torch.tensor(curve).unfold(0, k, k).mean(-1)
        steps = (torch.arange(len(smooth)) + 0.5) * k
        (line,) = ax.plot(steps.numpy(), smooth.numpy(), label=f"{SHORT[name]} (train)")
        ax.plot(
            [len(curve)], [test_bpd[name]], marker="o", color=line.get_color(), linestyle="none"
        )
        tops.append(float(smooth.max()))
    ax.plot([], [], marker="o", color="grey", linestyle="none", label="test, after training")
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("bits/dim")
    ax.set_ylim(top=max(tops) + 0.05 * (max(tops) - min(test_bpd.values())))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(figdir / "digits_training.png", dpi=110)
    plt.close(fig)
    return ["digits_samples.png", "digits_training.png"]


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}" if s >= 1 else f"{s:.2f}"


def _call(name: str, first: str, kwargs: dict[str, Any], extra: str = "") -> str:
    """``name(first, k=v, ...)`` as it ran (for the doc page)."""
    args = [first] + [f"{k}={json.dumps(v)}" for k, v in kwargs.items()]
    return f"`{name}({', '.join(args)}{extra})`"


COLUMNS = [
    ("Model", "---"),
    ("Parameters", "---:"),
    ("Test bits/dim", "---:"),
    ("Train bits/dim (last 5%)", "---:"),
    ("Train wall (s)", "---:"),
    ("Train CPU (s)", "---:"),
    ("Test eval wall (s)", "---:"),
    ("Test eval CPU (s)", "---:"),
    ("64 samples (s)", "---:"),
]


def _reading(result: dict[str, Any]) -> str:
    """Sentences computed from the results (so that the prose cannot drift from them)."""
    models = result["models"]
    if not models:
        return ""
    by_test = sorted(models, key=lambda k: models[k]["test_bpd"])
    best, hist = by_test[0], result["baseline_histogram"]["test_bpd"]
    gaps = {k: models[k]["test_bpd"] - models[k]["final_train_bpd"] for k in models}
    widest = max(gaps, key=gaps.get)
    narrowest = min(gaps, key=gaps.get)
    fastest = min(models, key=lambda k: models[k]["train_cpu_s"])
    slowest = max(models, key=lambda k: models[k]["train_cpu_s"])
    below = [SHORT[k] for k in by_test if models[k]["test_bpd"] < hist]
    lines = [
        f"- Lowest test bits/dim: {SHORT[best]} ({models[best]['test_bpd']:.3f}); the order is "
        + ", ".join(f"{SHORT[k]} {models[k]['test_bpd']:.3f}" for k in by_test)
        + f". {len(below)} of {len(models)} models beat the independent-pixel histogram "
        f"({hist:.3f}).",
        f"- Gap between test and (last 5% of) training bits/dim, with {result['n_train']} "
        f"training images: widest for {SHORT[widest]} ({gaps[widest]:+.3f}), narrowest for "
        f"{SHORT[narrowest]} ({gaps[narrowest]:+.3f}).",
        f"- Training CPU time per step: from {SHORT[fastest]} "
        f"({1e3 * models[fastest]['train_cpu_s'] / models[fastest]['steps']:.0f} ms) to "
        f"{SHORT[slowest]} ({1e3 * models[slowest]['train_cpu_s'] / models[slowest]['steps']:.0f}"
        " ms).",
    ]
    return "\n".join(lines)


def write_doc(out: Path, result: dict[str, Any]) -> Path:
    env, opts = result["environment"], result["options"]
    rows = []
    for name, r in result["models"].items():
        rows.append(
            f"| {LABELS[name]} | {r['params']:,} | **{r['test_bpd']:.3f}** | "
            f"{r['final_train_bpd']:.3f} | {_fmt_seconds(r['train_s'])} | "
            f"{_fmt_seconds(r['train_cpu_s'])} | {_fmt_seconds(r['eval_s'])} | "
            f"{_fmt_seconds(r['eval_cpu_s'])} | {_fmt_seconds(r['sample_s'])} |"
        )
    hist = result["baseline_histogram"]
    rows.append(
        f"| {LABELS['histogram']} | {hist['params']:,} | {hist['test_bpd']:.3f} | | | | | | |"
    )
    checks = result["sanity_checks"]
    sizes = result["sizes"]
    table = "\n".join(
        [
            "| " + " | ".join(c for c, _ in COLUMNS) + " |",
            "|" + "|".join(a for _, a in COLUMNS) + "|",
        ]
        + rows
    )
    glow_call = _call("glow", "(1, 8, 8)", sizes["glow"])
    irevnet_call = _call("irevnet", "(1, 8, 8)", sizes["irevnet"], ", affine=True")
    rf_opts = dict(sizes["residual_flow"])
    rf_call = _call(
        "residual_flow",
        "(1, 8, 8)",
        {**rf_opts, "explicit": "inverse", "logdet": TRAIN_LOGDET},
    )
    pyro_opts = dict(sizes["pyro_affine_coupling"])
    pyro_layers = pyro_opts.pop("num_layers")
    pyro_call = _call("pyro.distributions.transforms.affine_coupling", "64", pyro_opts)
    rf = result["models"].get("residual_flow", {})
    bo = rf.get("block_options", {})
    reading = _reading(result)
    dims = sorted(set(rf.get("residual_block_dims", [])), reverse=True)
    rf_dims = " or ".join(str(d) for d in dims) or "D"
    its = rf.get("sampling_iterations_per_block", [])
    rf_iters = (
        f"{min(its)} to {max(its)} fixed-point iterations per block for the batch of 64"
        if its
        else "fixed-point iteration"
    )
    rf_roulette = (
        f"\n  The training estimator (roulette, one draw per image) scores the same test set"
        f"\n  at {rf['test_bpd_roulette']:.3f} bits/dim."
        if "test_bpd_roulette" in rf
        else ""
    )
    text = f"""# Density estimation on 8x8 digits

This page is written by `examples/digits.py`; every number on it comes from the run below
(the same numbers are in `examples/results/digits.json`). Do not edit it by hand: rerun
the script.

```
{result["command"]}
```

Run on {result["date"]} with torch {env["torch"]}, Pyro {env["pyro"]} and Python
{env["python"]}, {env["threads"]} CPU thread(s) (`torch.set_num_threads`), on {env["cpu"]}
({env["cpu_count"]} logical CPUs; load average {env["load_average_at_start"][0]:.1f} at the
start). The whole run took {result["total_s"] / 60:.1f} minutes of wall time and
{result["total_cpu_s"] / 60:.1f} minutes of CPU time (the process's own).

## The task

scikit-learn's bundled digits: 1797 grey-level images of 8x8 pixels, each pixel an
integer in `0..16` (17 levels), split 1438 train / 359 test by
{{func}}`pyro_invres.datasets.load_digits`. Training images are dequantised with fresh
uniform noise every epoch, `y = (x + u) / 17`; the test images with one fixed draw,
the same for every model. As in Real NVP the flows model

$$z = \\operatorname{{logit}}\\big(\\alpha + (1 - 2\\alpha)\\,y\\big), \\qquad \\alpha = {ALPHA},$$

and the log-likelihood of `y` includes the exact log-Jacobian of that map,
$\\sum_i \\log(1 - 2\\alpha) - \\log s_i - \\log(1 - s_i)$ with $s = \\alpha + (1 - 2\\alpha) y$.
{{func}}`pyro_invres.datasets.bits_per_dim` then adds the $64 \\log 17$ nats of the division
by 17 and divides by $64 \\log 2$: the result is in bits per dimension of the *discrete*
digits (an upper bound on their negative log-likelihood). Forgetting the division by 17
would flatter every model by $\\log_2 17 \\approx 4.09$ bits/dim; forgetting the logit's
Jacobian would report a number on another scale altogether.

Two checks of this accounting ran with the models:

- the uniform density on $[0, 1]^{{64}}$, written as a density of `z` with Pyro's own
  `AffineTransform` and `SigmoidTransform().inv` (independently of the script's
  log-Jacobian) and scored through the same pipeline, gives
  **{checks["uniform_bpd"]:.6f}** bits/dim; $\\log_2 17 = {math.log2(17):.6f}$;
- a model of independent pixels (a 17-bin histogram per pixel, add-one smoothing) is a
  density on $[0, 1]^{{64}}$ that is constant on each bin: through the continuous
  pipeline it scores {checks["histogram_bpd_continuous"]:.6f} bits/dim on the test set, and its
  discrete cross-entropy computed directly is {checks["histogram_bpd_discrete"]:.6f}.

## Results

Each model trained for {opts["steps"]} Adam steps (learning rate {opts["lr"]}, batches of
{opts["batch_size"]}, gradient norm clipped at {opts["clip_norm"]}, seed {opts["seed"]}): the
same steps on the same mini-batches for all.

{table}

*Test bits/dim*: the mean over the {result["n_test"]} test images, one fixed dequantisation
draw (lower is better). *Train bits/dim*: the mean mini-batch loss over the last 5% of the
steps (for the residual flow a stochastic estimate, see below). *Wall* is elapsed time,
*CPU* the process's CPU time: with {env["threads"]} thread(s) on a shared machine the CPU
time is the better guide to what an idle core would take. *Test eval*: scoring the test
set once. *64 samples*: drawing 64 images (wall); the residual flow's sampling direction is
the iterative one ({rf_iters}).

The models, all `pyro.distributions.TransformedDistribution`s of a standard normal:

- **Glow**: {glow_call}:
  squeeze, ActNorm, invertible 1x1 convolution and affine
  coupling, half the channels factored out after the first scale.
- **i-RevNet**: {irevnet_call}:
  invertible down-sampling, ActNorm and two-stream RevNet
  blocks with bounded affine scales, a fixed channel permutation after each block.
- **Residual flow**: {rf_call}:
  i-ResNet blocks with Lipschitz constant {bo.get("lipschitz")} and ActNorm, the
  data-to-latent direction explicit so that scoring data costs one pass per block.
  Trained with the unbiased Russian-roulette log-det estimator ({bo.get("n_probes")}
  {bo.get("probe")} probe(s), {bo.get("n_exact_terms")} exact terms, a {bo.get("roulette")}
  number of extra terms with parameter {bo.get("roulette_param")}); **the test score uses the exact
  log-determinant** (`logdet="exact"`: the full Jacobian of each block, from
  {rf_dims} vector-Jacobian products), so it carries no estimator noise or truncation
  bias.{rf_roulette}
  Sampling inverts each block by iteration (`solver="{bo.get("solver")}"`).
- **Pyro affine coupling**: Pyro's own
  {pyro_call}, {pyro_layers} layers on the flattened
  64-D vectors with a fixed random `Permute` between consecutive layers.

```{{figure}} _static/figures/digits_samples.png
:alt: samples of each model next to real test digits
:width: 100%

Top row: {opts["n_samples"]} real test digits (dequantised). Below: samples of each model at
temperature 1, mapped back through the inverse logit and clipped to $[0, 1]$.
```

```{{figure}} _static/figures/digits_training.png
:alt: training curves
:width: 80%

Training loss in bits/dim per mini-batch (averaged over windows of steps); the dots are
the test bits/dim after the last step.
```

## Reading the numbers

{reading}

The models are small and trained briefly so that the whole comparison runs in minutes on
two CPU cores; the numbers compare the architectures at this budget and are not
converged results (see the training curves). Timings depend on the machine and its load:
compare them within one run only. Rerun with more steps with
`python examples/digits.py --save --steps N` (the page and the JSON are rewritten).
"""
    path = out / "docs" / "digits.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- the script ------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps")
    written = parser.add_mutually_exclusive_group()
    written.add_argument(
        "--save",
        action="store_true",
        help="record this run in the repository: examples/results/digits.json, "
        "docs/digits.md and docs/_static/figures/digits_*.png (not with --quick)",
    )
    written.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write those files under DIR instead (default: write nothing)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: these tensors are tiny, and extra threads "
        "only fight over a shared machine)",
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)
    if args.save and args.quick:
        parser.error(
            "--save records a run in the repository, and a --quick smoke run is not one; "
            "pass --out DIR to keep its files"
        )
    if args.out is not None and Path(args.out).is_file():
        parser.error(f"--out {args.out} is a file; --out names a directory")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command_args = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    out = REPO if args.save else None if args.out is None else Path(args.out)
    opts = Options(seed=args.seed)
    if args.quick:
        opts.steps, opts.sizes, opts.n_samples = 10, QUICK_SIZES, 4
    if args.steps is not None:
        opts.steps = args.steps
    t_start, cpu_start = time.perf_counter(), time.process_time()
    env = environment(args.threads)

    y_train = load_digits("train", dequantize=True, seed=0)
    y_test = load_digits("test", dequantize=True, seed=TEST_NOISE_SEED)
    n_train = y_train.shape[0]

    hist = PixelHistogram(load_digits("train", dequantize=False))
    checks = {
        "uniform_bpd": uniform_sanity_check(y_test),
        "uniform_expected": math.log2(DIGITS_LEVELS),
        "histogram_bpd_continuous": bpd_of(log_prob_y(hist.log_prob_z, y_test.double())),
        "histogram_bpd_discrete": float(
            -hist.log_prob_levels(y_test).mean() / (DIMS * math.log(2.0))
        ),
    }
    print(
        f"sanity: uniform {checks['uniform_bpd']:.6f} (log2 17 = {math.log2(17):.6f}); "
        f"histogram {checks['histogram_bpd_continuous']:.6f} vs discrete "
        f"{checks['histogram_bpd_discrete']:.6f}",
        flush=True,
    )

    results: dict[str, Any] = {}
    samples: dict[str, Tensor] = {}
    curves: dict[str, list[float]] = {}
    for name in args.models:
        model = Model(name, opts.sizes, opts.seed)
        train_s, train_cpu_s, curve = train(model, opts, n_train)
        test_bpd, eval_s, eval_cpu_s = evaluate(model, y_test, opts)
        for block in model.residual_blocks():
            block.solve_stats.reset()
        _, sample_s = sample(model, 64, opts.seed + 1)
        iterations = [b.solve_stats.iterations for b in model.residual_blocks()]
        shown, _ = sample(model, opts.n_samples, opts.seed + 2)
        tail = curve[-max(1, len(curve) // 20) :]
        results[name] = {
            "params": model.num_params(),
            "test_bpd": test_bpd,
            "final_train_bpd": sum(tail) / len(tail),
            "train_s": train_s,
            "train_cpu_s": train_cpu_s,
            "eval_s": eval_s,
            "eval_cpu_s": eval_cpu_s,
            "sample_s": sample_s,
            "steps": opts.steps,
        }
        if name == "residual_flow":
            results[name]["logdet_train"] = TRAIN_LOGDET
            results[name]["logdet_test"] = EVAL_LOGDET
            first = model.residual_blocks()[0]
            est = first.estimator  # the training estimator (set back after evaluation)
            results[name]["block_options"] = {
                "lipschitz": first.lipschitz,
                "n_probes": est.n_probes,
                "probe": est.probe,
                "n_exact_terms": est.n_exact_terms,
                "roulette": est.distribution,
                "roulette_param": est.param,
                "solver": first.solver.method,
            }
            results[name]["residual_block_dims"] = [
                math.prod(b.event_shape) for b in model.residual_blocks()
            ]
            # the test set scored with the (unbiased, stochastic) training estimator too
            torch.manual_seed(opts.seed + 3)
            results[name]["test_bpd_roulette"] = evaluate(model, y_test, opts, logdet=TRAIN_LOGDET)[
                0
            ]
            # evaluations of g per block to draw the 64 samples (one batched solve each)
            results[name]["sampling_iterations_per_block"] = iterations
        samples[name], curves[name] = shown, curve
        print(
            f"{name:>22}: test {test_bpd:.3f} bits/dim  "
            f"train {train_s:.1f}s (cpu {train_cpu_s:.1f}s)  "
            f"eval {eval_s:.2f}s (cpu {eval_cpu_s:.2f}s)  sample {sample_s:.2f}s  "
            f"({model.num_params():,} params)",
            flush=True,
        )

    real = y_test[: opts.n_samples]
    test_bpds = {name: r["test_bpd"] for name, r in results.items()}
    figures = [] if out is None else save_figures(out, samples, real, curves, test_bpds)
    total_s, total_cpu_s = time.perf_counter() - t_start, time.process_time() - cpu_start
    result = {
        "command": "python examples/digits.py"
        + "".join(f" {shlex.quote(a)}" for a in command_args),
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "environment": env,
        "options": {
            "steps": opts.steps,
            "batch_size": opts.batch_size,
            "lr": opts.lr,
            "clip_norm": opts.clip_norm,
            "seed": opts.seed,
            "alpha": ALPHA,
            "quick": args.quick,
            "n_samples": opts.n_samples,
        },
        "sizes": {k: dict(v) for k, v in vars(opts.sizes).items()},
        "n_train": n_train,
        "n_test": int(y_test.shape[0]),
        "sanity_checks": checks,
        "baseline_histogram": {
            "params": int(hist.log_p.numel()),
            "test_bpd": checks["histogram_bpd_continuous"],
        },
        "models": results,
        "figures": figures,
        "total_s": total_s,
        "total_cpu_s": total_cpu_s,
    }
    if out is None:
        print(
            f"nothing written ({total_s / 60:.1f} min): pass --save to record this run "
            "(examples/results/digits.json, docs/digits.md, docs/_static/figures/) or --out DIR"
        )
        return result
    json_path = out / "examples" / "results" / "digits.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    doc = write_doc(out, result)
    print(f"wrote {json_path}, {doc} and {len(figures)} figures in {total_s / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()
