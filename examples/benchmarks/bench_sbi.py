"""Neural posterior estimation on sbibm: C2ST of conditional flows, side by side.

For each sbibm task (Lueckmann et al. 2021) and simulation budget, the script draws the
simulations once from the task's prior and simulator (seeded: every model sees the same
pairs, in every run), trains every selected conditional flow on them with one training
loop, draws 10,000 posterior samples for each reference observation and scores them
against sbibm's reference posterior samples with sbibm's own classifier two-sample test
(:func:`sbibm.metrics.c2st`: 0.5 is a perfect match, 1.0 a complete miss).

One treatment for all models:

* **data**: parameters mapped to the unconstrained side of the prior's support (Pyro's
  ``biject_to``) and z-scored, observations z-scored, both with the training pairs'
  statistics (:class:`~pyro_invres.npe.Standardization`); samples are mapped back, so
  every draw lies in the prior's support (bernoulli_glm has an unbounded prior);
* **training**: ``sbi``'s NPE defaults (``sbi.inference.NPE.train``): Adam with learning
  rate 5e-4, batches of 200, 10% of the pairs held out for validation, training stops
  after 20 epochs without a better validation loss and the flow keeps its best epoch's
  parameters, gradients clipped to a total norm of 5. ``sbi`` sets no epoch cap; this
  script caps at ``--max-epochs`` (default 500) and reports the runs it cut short;
* **timing**: training wall time (validation included), sampling time of 10,000 draws
  per observation (median over observations), one thread.

Models (``--models``):

* ``zuko_nsf``, ``zuko_maf``: ``zuko.flows.NSF`` / ``MAF`` with five transforms, hidden
  layers ``[50, 50]`` and 8 spline bins: ``sbi``'s defaults (``build_zuko_nsf``: 50
  hidden features, 5 transforms, 8 bins; the hidden-layer list ``[50, 50]`` is zuko's
  default depth);
* ``pyro_spline``: Pyro's ``conditional_spline_autoregressive`` (the autoregressive
  variant: the element-wise ``conditional_spline`` cannot couple the parameters), five
  layers, hidden ``[50, 50]``, 8 bins, with a reversal between layers;
* ``pyro_affine``: Pyro's ``conditional_affine_coupling``, five layers, hidden
  ``[50, 50]``, reversals between layers;
* ``ours_spline_residual``: the project's recommended preset,
  :func:`~pyro_invres.flows.conditional_spline_residual_flow` ``(D, C)`` with its defaults
  (five spline autoregressive layers ``[50, 50]``, 8 bins, each followed by a
  conditional i-ResNet block);
* ``ours_spline``: the same without the i-ResNet blocks (the ablation:
  ``residual=False``);
* ``ours_residual``: the first preset, :func:`~pyro_invres.flows.conditional_residual_flow`
  ``(D, C)`` with its defaults;
* ``ours_coupling``: the project's :func:`~pyro_invres.transforms.conditional_affine_coupling`
  (bounded log-scale), five layers, hidden ``[50, 50]``, reversals between layers.

The project's and Pyro's models sit in :class:`~pyro_invres.npe.ConditionalFlow`; zuko's
in a wrapper with the same z-scoring and support map.

Run::

    python examples/benchmarks/bench_sbi.py --budgets 1000 10000 --observations 1-10
    python examples/benchmarks/bench_sbi.py --tasks slcp --models zuko_nsf --out /tmp/a.json
    python examples/benchmarks/bench_sbi.py --quick                # smoke test, ~1 min
    python examples/benchmarks/bench_sbi.py --render results/sbi_cpu.json /tmp/a.json \\
        --markdown ../../docs/sbi_results.md                       # merge and render

Results: ``results/sbi_cpu.json`` (``--out``); a run adds to the file it writes,
replacing the entries of the same task, budget, model and seed.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, base_parser, env_info, markdown_table, write_json  # noqa: E402

TASKS = ("two_moons", "slcp", "gaussian_mixture", "gaussian_linear_uniform", "bernoulli_glm")
MODELS = (
    "zuko_nsf",
    "zuko_maf",
    "pyro_spline",
    "pyro_affine",
    "ours_spline_residual",
    "ours_spline",
    "ours_residual",
    "ours_coupling",
)
# the project's recommended conditional preset, compared with NSF against issue 16's targets
PRESET = "ours_spline_residual"
HIDDEN = [50, 50]
LAYERS = 5
# sbi's NPE training defaults (sbi.inference.NPE.train)
SBI_DEFAULTS = {
    "training_batch_size": 200,
    "learning_rate": 5e-4,
    "validation_fraction": 0.1,
    "stop_after_epochs": 20,
    "clip_max_norm": 5.0,
}


# -- models ----------------------------------------------------------------------------------
class ZukoNPE(nn.Module):
    """A zuko conditional flow with the z-scoring and support map of ``ConditionalFlow``.

    ``log q(theta | x) = log q_z((u - m) / s | x~) - sum(log s) - log|det J_T(u)|`` with
    ``u = T^{-1}(theta)``, ``T`` the bijection onto the prior's support.
    """

    def __init__(self, flow: nn.Module, input_dim: int, context_dim: int, support: Any) -> None:
        super().__init__()
        from pyro_invres.npe import Standardization, support_transform

        self.flow = flow
        self.input_dim = input_dim
        self.parameter_norm = Standardization(input_dim)
        self.context_norm = Standardization(context_dim)
        self.support_map = support_transform(support, input_dim, cache_size=0)

    def unconstrain(self, theta: Tensor) -> Tensor:
        return theta if self.support_map is None else self.support_map.inv(theta)

    def standardize(self, theta: Tensor, x: Tensor) -> None:
        with torch.no_grad():
            self.parameter_norm.fit(self.unconstrain(theta))
            self.context_norm.fit(x)

    def log_prob(self, theta: Tensor, x: Tensor) -> Tensor:
        u = self.unconstrain(theta)
        z = self.parameter_norm.standardize(u)
        lp = self.flow(self.context_norm.standardize(x)).log_prob(z)
        lp = lp - self.parameter_norm.scale.log().sum()
        if self.support_map is not None:
            lp = lp - self.support_map.log_abs_det_jacobian(u, theta)
        return lp

    def sample(self, n: int, x: Tensor) -> Tensor:
        z = self.flow(self.context_norm.standardize(x)).sample((n,))
        u = self.parameter_norm.loc + self.parameter_norm.scale * z
        return u if self.support_map is None else self.support_map(u)


class PyroNPE(nn.Module):
    """A :class:`~pyro_invres.npe.ConditionalFlow` with the benchmark's interface."""

    def __init__(self, transforms: Any, input_dim: int, context_dim: int, support: Any) -> None:
        super().__init__()
        from pyro_invres.npe import ConditionalFlow

        self.flow = ConditionalFlow(transforms, input_dim, context_dim, support=support)

    def standardize(self, theta: Tensor, x: Tensor) -> None:
        from pyro_invres import ActNorm, initialize_actnorm

        self.flow.standardize(theta, x)
        if any(isinstance(m, ActNorm) for m in self.flow.modules()):
            # data-dependent init of ActNorm layers, as fit_conditional does
            rows = torch.linspace(0, len(theta) - 1, min(len(theta), 4096)).round().long()
            with torch.no_grad():
                z = self.flow.parameter_norm.standardize(self.flow.unconstrain(theta[rows]))
                initialize_actnorm(self.flow.conditioned(x[rows]), z)

    def log_prob(self, theta: Tensor, x: Tensor) -> Tensor:
        return self.flow.condition(x).log_prob(theta)

    def sample(self, n: int, x: Tensor) -> Tensor:
        return self.flow.condition(x).sample((n,))


def _reversals(blocks: list[Any], dim: int) -> list[Any]:
    """Blocks with a coordinate reversal between consecutive ones (none for D = 1)."""
    from pyro.distributions.transforms import Permute

    out: list[Any] = []
    for i, block in enumerate(blocks):
        if i and dim > 1:
            out.append(Permute(torch.arange(dim - 1, -1, -1)))
        out.append(block)
    return out


def build_model(name: str, dim: int, context_dim: int, support: Any) -> nn.Module:
    """The model ``name`` for parameters of dimension ``dim`` given ``context_dim`` data."""
    if name in ("zuko_nsf", "zuko_maf"):
        import zuko

        if name == "zuko_nsf":
            flow = zuko.flows.NSF(
                dim, context_dim, transforms=LAYERS, hidden_features=HIDDEN, bins=8
            )
        else:
            flow = zuko.flows.MAF(dim, context_dim, transforms=LAYERS, hidden_features=HIDDEN)
        return ZukoNPE(flow, dim, context_dim, support)
    if name == "pyro_spline":
        from pyro.distributions.transforms import conditional_spline_autoregressive

        blocks = [
            conditional_spline_autoregressive(dim, context_dim, hidden_dims=HIDDEN, count_bins=8)
            for _ in range(LAYERS)
        ]
        return PyroNPE(_reversals(blocks, dim), dim, context_dim, support)
    if name == "pyro_affine":
        from pyro.distributions.transforms import conditional_affine_coupling

        blocks = [
            conditional_affine_coupling(dim, context_dim, hidden_dims=HIDDEN) for _ in range(LAYERS)
        ]
        return PyroNPE(_reversals(blocks, dim), dim, context_dim, support)
    if name in ("ours_spline_residual", "ours_spline"):
        from pyro_invres.flows import conditional_spline_residual_flow

        flow = conditional_spline_residual_flow(
            dim, context_dim, LAYERS, HIDDEN, residual=name == "ours_spline_residual"
        )
        return PyroNPE(flow, dim, context_dim, support)
    if name == "ours_residual":
        from pyro_invres.flows import conditional_residual_flow

        return PyroNPE(conditional_residual_flow(dim, context_dim), dim, context_dim, support)
    if name == "ours_coupling":
        from pyro_invres.transforms import conditional_affine_coupling

        blocks = [
            conditional_affine_coupling(dim, context_dim, hidden_dims=HIDDEN) for _ in range(LAYERS)
        ]
        return PyroNPE(_reversals(blocks, dim), dim, context_dim, support)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


# -- training --------------------------------------------------------------------------------
def train(
    model: nn.Module,
    theta: Tensor,
    x: Tensor,
    *,
    max_epochs: int,
    seed: int,
    batch_size: int = SBI_DEFAULTS["training_batch_size"],
    lr: float = SBI_DEFAULTS["learning_rate"],
    validation_fraction: float = SBI_DEFAULTS["validation_fraction"],
    stop_after_epochs: int = SBI_DEFAULTS["stop_after_epochs"],
    clip_max_norm: float = SBI_DEFAULTS["clip_max_norm"],
) -> dict[str, Any]:
    """Maximum likelihood with sbi's early stopping; the model ends at its best epoch."""
    n = len(theta)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(validation_fraction * n)
    train_idx, val_idx = perm[n_val:], perm[:n_val]
    model.standardize(theta[train_idx], x[train_idx])
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.Adam(params, lr=lr)
    torch.manual_seed(seed)
    best, best_epoch, best_state, since, epoch = math.inf, 0, None, 0, 0
    val_curve: list[float] = []
    train_curve: list[float] = []
    started, cpu_started = time.perf_counter(), time.thread_time()
    while epoch < max_epochs and since < stop_after_epochs:
        epoch += 1
        model.train()
        total = 0.0
        for batch in train_idx[torch.randperm(len(train_idx))].split(batch_size):
            loss = -model.log_prob(theta[batch], x[batch]).mean()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, clip_max_norm)
            optim.step()
            total += float(loss.detach()) * len(batch)
        train_curve.append(total / len(train_idx))
        model.eval()
        with torch.no_grad():
            val = -float(model.log_prob(theta[val_idx], x[val_idx]).mean())
        val_curve.append(val)
        if val < best:
            best, best_epoch, since = val, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since += 1
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {
        "train_time_s": time.perf_counter() - started,
        # this thread's CPU time: what the model cost, whatever else the machine ran
        "train_cpu_s": time.thread_time() - cpu_started,
        "epochs": epoch,
        "best_epoch": best_epoch,
        "best_validation_loss": best,
        "stopped_early": since >= stop_after_epochs,
        "validation_curve": [round(v, 4) for v in val_curve],
        "train_curve": [round(v, 4) for v in train_curve],
    }


# -- one task ------------------------------------------------------------------------------------
def simulate(task: Any, budget: int, seed: int) -> tuple[Tensor, Tensor]:
    """``budget`` pairs from the task's prior and simulator: the same for every model."""
    torch.manual_seed(seed)
    theta = task.get_prior()(num_samples=budget)
    x = task.get_simulator()(theta)
    return theta.float(), x.float()


def c2st_score(samples: Tensor, reference: Tensor, n: int) -> float:
    """sbibm's C2ST on the first ``n`` draws of each (sbibm's defaults otherwise)."""
    from sbibm.metrics import c2st

    return float(c2st(samples[:n], reference[:n]))


def run_cell(
    task_name: str,
    budget: int,
    model_name: str,
    observations: list[int],
    args: Any,
    data: tuple[Tensor, Tensor],
    log: Callable[[str], None],
) -> dict[str, Any]:
    import sbibm

    task = sbibm.get_task(task_name)
    prior = task.get_prior_dist()
    torch.manual_seed(args.seed)
    model = build_model(model_name, task.dim_parameters, task.dim_data, prior.support)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fit = train(model, *data, max_epochs=args.max_epochs, seed=args.seed)
    log(
        f"  {model_name}: {fit['epochs']} epochs (best {fit['best_epoch']}), "
        f"{fit['train_time_s']:.1f} s, val {fit['best_validation_loss']:.3f}"
    )
    per_obs = []
    for obs in observations:
        x_o = task.get_observation(obs).float().reshape(1, -1)
        torch.manual_seed(args.seed + obs)
        with torch.no_grad():
            started, cpu_started = time.perf_counter(), time.thread_time()
            draws = model.sample(args.num_samples, x_o).reshape(args.num_samples, -1)
            sample_time = time.perf_counter() - started
            sample_cpu = time.thread_time() - cpu_started
        finite = torch.isfinite(draws).all(-1)
        outside = (~prior.support.check(draws)).reshape(len(draws), -1).any(-1) & finite
        reference = task.get_reference_posterior_samples(obs).float()
        started = time.perf_counter()
        score = c2st_score(draws[finite], reference, args.c2st_samples)
        c2st_time = time.perf_counter() - started
        log(f"    observation {obs}: C2ST {score:.3f} (sampling {sample_time:.2f} s)")
        per_obs.append(
            {
                "observation": obs,
                "c2st": score,
                "sampling_time_s": sample_time,
                "sampling_cpu_s": sample_cpu,
                "c2st_time_s": c2st_time,
                "non_finite": int((~finite).sum()),
                "outside_support": int(outside.sum()),
            }
        )
    scores = [r["c2st"] for r in per_obs]
    return {
        "task": task_name,
        "budget": budget,
        "model": model_name,
        "seed": args.seed,
        "n_params": n_params,
        **fit,
        "c2st_mean": statistics.fmean(scores),
        "c2st_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "c2st_min": min(scores),
        "c2st_max": max(scores),
        "sampling_time_s": statistics.median(r["sampling_time_s"] for r in per_obs),
        "sampling_cpu_s": statistics.median(r["sampling_cpu_s"] for r in per_obs),
        "num_samples": args.num_samples,
        "c2st_samples": min(args.c2st_samples, args.num_samples),
        "max_epochs": args.max_epochs,
        "loadavg_after": list(os.getloadavg()),  # a shared machine: how loaded it was
        "git": _git_state(),
        "observations": per_obs,
    }


def _git_state() -> dict[str, Any]:
    """The commit and the library files changed in the working tree (what a model ran)."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "pyro_invres")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": dirty.splitlines()}


# -- results: merge and render -----------------------------------------------------------------
def _key(record: dict[str, Any]) -> tuple:
    return (record["task"], record["budget"], record["model"], record["seed"])


def merge_records(files: list[str | Path]) -> list[dict[str, Any]]:
    """All records of the given result files; a later file's entry replaces an earlier one."""
    import json

    merged: dict[tuple, dict[str, Any]] = {}
    for path in files:
        for record in json.loads(Path(path).read_text())["results"]:
            merged[_key(record)] = record
    order = {name: i for i, name in enumerate(TASKS)}
    models = {name: i for i, name in enumerate(MODELS)}
    return sorted(
        merged.values(),
        key=lambda r: (r["budget"], order.get(r["task"], 99), models.get(r["model"], 99)),
    )


def render(records: list[dict[str, Any]]) -> str:
    """Markdown tables: C2ST per task and model for each budget, then the cost table."""
    out: list[str] = []
    for budget in sorted({r["budget"] for r in records}):
        rows_b = [r for r in records if r["budget"] == budget]
        models = [m for m in MODELS if any(r["model"] == m for r in rows_b)]
        out.append(
            f"**{budget:,} simulations**: C2ST, mean ± standard deviation over the "
            "observations and seeds of each cell (the cost table lists the runs; 0.5 is "
            "perfect; best per task in bold; (cap): ended by the epoch cap, not by early "
            "stopping)\n"
        )
        rows = []
        for task in TASKS:
            cells: dict[str, list[float]] = {}
            capped: set[str] = set()
            for r in rows_b:
                if r["task"] == task:  # seeds and observations pooled
                    cells.setdefault(r["model"], []).extend(o["c2st"] for o in r["observations"])
                    if not r["stopped_early"]:
                        capped.add(r["model"])
            if not cells:
                continue
            means = {m: statistics.fmean(v) for m, v in cells.items()}
            best = min(means.values())
            row: list[Any] = [task]
            for m in models:
                if m not in cells:
                    row.append("")
                    continue
                text = f"{means[m]:.3f}"
                if len(cells[m]) > 1:  # a single score has no spread
                    text += f" ± {statistics.stdev(cells[m]):.3f}"
                if m in capped:
                    text += " (cap)"
                row.append(f"**{text}**" if means[m] == best else text)
            rows.append(row)
        out.append(markdown_table(["task", *models], rows) + "\n")
    out.append(
        "Cost per task, budget and model: training time (s; in brackets this thread's CPU "
        "seconds, where recorded), epochs run (best epoch), median time to draw 10,000 "
        "samples (s; CPU s), trainable parameters\n"
    )
    rows = [
        [
            r["task"],
            r["budget"],
            r["model"],
            r["seed"],
            f"{r['train_time_s']:.1f}"
            + (f" ({r['train_cpu_s']:.1f})" if "train_cpu_s" in r else ""),
            f"{r['epochs']} ({r['best_epoch']})",
            f"{r['sampling_time_s']:.2f}"
            + (f" ({r['sampling_cpu_s']:.2f})" if "sampling_cpu_s" in r else ""),
            r["n_params"],
        ]
        for r in records
    ]
    out.append(
        markdown_table(
            ["task", "budget", "model", "seed", "train s", "epochs (best)", "sample s", "params"],
            rows,
        )
    )
    return "\n".join(out) + "\n"


def compare(records: list[dict[str, Any]], ours: str, peer: str) -> str:
    """The issue's targets, ``ours`` against ``peer`` per task and budget: C2ST difference,
    training-time and sampling-time ratios (one run each: ratios on a shared machine are
    rough)."""
    rows = []
    for r in records:
        if r["model"] != ours:
            continue
        p = next(
            (
                q
                for q in records
                if q["model"] == peer and _key(q)[:2] == _key(r)[:2] and q["seed"] == r["seed"]
            ),
            None,
        )
        if p is None:
            continue
        # CPU seconds where recorded (a loaded machine stretches wall time unevenly)
        train, sample = (
            ("train_cpu_s", "sampling_cpu_s")
            if "train_cpu_s" in r and "train_cpu_s" in p
            else ("train_time_s", "sampling_time_s")
        )
        rows.append(
            [
                r["task"],
                r["budget"],
                r["seed"],
                f"{r['c2st_mean'] - p['c2st_mean']:+.3f}",
                f"{r[train] / p[train]:.2f}",
                f"{r[sample] / p[sample]:.2f}",
                "CPU" if train == "train_cpu_s" else "wall",
            ]
        )
    headers = [
        "task",
        "budget",
        "seed",
        f"C2ST {ours} - {peer}",
        "train time ratio",
        "sampling ratio",
        "times",
    ]
    return markdown_table(headers, rows) if rows else ""


def parse_observations(text: str) -> list[int]:
    """``"1-10"`` or ``"1,3,5"`` to a list of sbibm observation numbers (1..10)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    if not out or min(out) < 1 or max(out) > 10:
        raise SystemExit(f"--observations must lie in 1..10 (sbibm's), got {text!r}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--budgets", nargs="+", type=int, default=[1000, 10000])
    parser.add_argument("--observations", default="1-10", help="e.g. 1-10 or 1,2,3")
    parser.add_argument("--num-samples", type=int, default=10_000, help="posterior draws")
    parser.add_argument(
        "--c2st-samples",
        type=int,
        default=10_000,
        help="draws (and reference samples) the C2ST classifier sees (sbibm: 10,000)",
    )
    parser.add_argument("--max-epochs", type=int, default=500)
    parser.add_argument(
        "--render", nargs="+", default=None, help="merge these result files and print tables"
    )
    parser.add_argument("--markdown", default=None, help="with --render: write the tables here")
    parser.add_argument(
        "--merged", default=None, help="with --render: also write the merged records (JSON) here"
    )
    args = parser.parse_args(argv)
    if args.render:
        records = merge_records(args.render)
        if args.merged:
            import json

            runs = []
            for path in args.render:
                data = json.loads(Path(path).read_text())
                runs += data.get("runs") or [
                    {k: data[k] for k in ("command", "env", "settings") if k in data}
                ]
            merged = {"benchmark": "bench_sbi", "merged_from": runs, "results": records}
            write_json(merged, Path(args.merged))
        text = render(records)
        targets = compare(records, PRESET, "zuko_nsf")
        if targets:
            text += "\nThe preset against zuko's NSF (issue 16's targets)\n\n" + targets + "\n"
        if args.markdown:
            Path(args.markdown).write_text(text)
        print(text)
        return None
    if args.quick:
        args.tasks = args.tasks if len(args.tasks) < len(TASKS) else ["two_moons", "slcp"]
        args.budgets, args.observations = [300], "1"
        args.num_samples, args.c2st_samples, args.max_epochs = 1000, 500, 5
    torch.set_num_threads(args.threads)
    observations = parse_observations(args.observations)
    out = (
        Path(args.out)
        if args.out
        else RESULTS_DIR / ("sbi_quick.json" if args.quick else "sbi_cpu.json")
    )
    log = lambda s: print(s, flush=True)  # noqa: E731
    import sbibm

    records = []
    for budget in args.budgets:
        for task_name in args.tasks:
            data = simulate(sbibm.get_task(task_name), budget, args.seed)
            log(f"{task_name}, {budget} simulations")
            for model_name in args.models:
                records.append(
                    run_cell(task_name, budget, model_name, observations, args, data, log)
                )
                result = {
                    "benchmark": "bench_sbi",
                    "env": env_info(torch.device("cpu")),
                    "settings": {**SBI_DEFAULTS, "hidden": HIDDEN, "layers": LAYERS},
                    "command": " ".join(sys.argv if argv is None else ["bench_sbi.py", *argv]),
                    "results": records,
                }
                if out.exists():  # add to the file: replace entries with the same key
                    import json

                    old = json.loads(out.read_text()).get("results", [])
                    keys = {_key(r) for r in records}
                    result["results"] = [r for r in old if _key(r) not in keys] + records
                write_json(result, out)
    print(render(records))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
