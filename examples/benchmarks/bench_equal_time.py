"""Density quality at equal wall-clock: test NLL after the same training time.

Each model trains on the same toy data for the same number of seconds (``--seconds``) in
the same loop (batches of 256, Adam, the learning rate decaying from ``1e-2`` to ``1e-3``
over that time, each parameter's gradient norm clipped at 10 as in ``fit_density``), in
one process, one thread, one after the other:

* ``pyro-invres``: the flow ``pyro-invres fit`` trains by default (8 i-ResNet blocks of
  [32, 32], ``lipschitz=0.97``, learned Lipschitz split, sine activation, ActNorm, exact
  2-D log-det);
* ``normflows``: normflows' ``Residual`` blocks with the same networks (LipSwish MLP
  ``2 -> 32 -> 32 -> 2``, each layer normalised to ``0.97 ** (1/3)``) and ActNorm, its
  default memory-saving estimator (Russian roulette, Neumann gradient in the forward
  pass) and the ``update_lipschitz(model, 50)`` call after every step that its examples
  make;
* ``pyro-affine x8`` and ``pyro-spline x4``: Pyro's coupling flows as in ``bench_toy_nll``.

Test NLL is exact for every model: the log-determinant of the whole map from data to
latent is computed from its 2x2 Jacobian by autograd (float64), whatever estimator the
model trains with. A model whose loss turns non-finite is reported as diverged, with the
step and the error, and scored from its parameters as they were at the last multiple of
100 steps before it (what a user who checkpoints would keep). Writes
``results/equal_time_<device>.json``.

Usage::

    python examples/benchmarks/bench_equal_time.py                  # 45 s per model
    python examples/benchmarks/bench_equal_time.py --seconds 5 --datasets moons
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, env_info, markdown_table, write_json  # noqa: E402

from pyro_invres.cli import DEFAULTS, flow_options  # noqa: E402
from pyro_invres.datasets import sample_toy  # noqa: E402
from pyro_invres.train import build_flow, make_density  # noqa: E402

LIPSCHITZ = DEFAULTS["lipschitz"]
HIDDEN = [int(h) for h in DEFAULTS["hidden"].split(",")]
BLOCKS = DEFAULTS["num_blocks"]
BATCH = DEFAULTS["batch_size"]


def train_for(
    seconds: float,
    params: list[torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    after_step: Callable[[], None] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Adam on ``loss_fn`` for ``seconds`` of wall time, lr 1e-2 -> 1e-3 over that time.

    On a non-finite loss the parameters go back to their values at the last multiple of
    100 steps, and the result says so.
    """
    opt = torch.optim.Adam(params, lr=DEFAULTS["lr"])
    g = torch.Generator().manual_seed(seed)
    steps, start = 0, time.perf_counter()
    saved = (0, [p.detach().clone() for p in params])
    while (elapsed := time.perf_counter() - start) < seconds:
        if steps % 100 == 0:
            saved = (steps, [p.detach().clone() for p in params])
        for group in opt.param_groups:
            group["lr"] = DEFAULTS["lr"] * DEFAULTS["lr_final"] ** (elapsed / seconds)
        batch = data[torch.randint(0, len(data), (BATCH,), generator=g)]
        opt.zero_grad(set_to_none=True)
        error = "loss is not finite"
        try:
            loss = loss_fn(batch)
        except ValueError as err:  # Pyro's support check caught a nan inside the flow
            if "nan" not in str(err).lower() and "inf" not in str(err).lower():
                raise
            loss, error = torch.tensor(math.nan), str(err).splitlines()[0][:200]
        if not bool(torch.isfinite(loss)):
            with torch.no_grad():
                for p, v in zip(params, saved[1]):
                    p.copy_(v)
            return {
                "steps": steps,
                "seconds": time.perf_counter() - start,
                "diverged": True,
                "diverged_at_step": steps + 1,
                "error": error,
                "scored_at_step": saved[0],
            }
        loss.backward()
        # each tensor's gradient norm at most 10, as fit_density (Pyro's clip_norm) does
        grads = [p.grad for p in params if p.grad is not None]
        norms = torch._foreach_norm(grads)
        torch._foreach_mul_(grads, [torch.clamp(10.0 / (n + 1e-6), max=1.0) for n in norms])
        opt.step()
        if after_step is not None:
            after_step()
        steps += 1
    return {"steps": steps, "seconds": time.perf_counter() - start, "diverged": False}


def exact_nll(to_latent: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Mean ``-log p(x)`` from ``z = F(x)`` and the 2x2 Jacobian of ``F``, by autograd."""
    total = 0.0
    for chunk in x.double().split(1000):
        chunk = chunk.clone().requires_grad_(True)
        z = to_latent(chunk)
        rows = [torch.autograd.grad(z[:, i].sum(), chunk, retain_graph=True)[0] for i in (0, 1)]
        jac = torch.stack(rows, dim=1)
        logdet = torch.linalg.slogdet(jac)[1]
        log_base = -0.5 * (z**2).sum(-1) - math.log(2 * math.pi)
        total += float((-(log_base + logdet)).sum().detach())
    return total / len(x)


# -- the models ----------------------------------------------------------------------------
def ours(train: torch.Tensor, seconds: float, seed: int) -> tuple[dict, Callable]:
    torch.manual_seed(seed)
    flow = build_flow("iresnet", 2, **flow_options("iresnet"))  # the `pyro-invres fit` flow
    density = make_density(flow, (2,), torch.device("cpu"), train.dtype)
    density.log_prob(train[:BATCH])  # ActNorm's data-dependent initialisation
    stats = train_for(
        seconds, list(flow.parameters()), lambda x: -density.log_prob(x).mean(), train, seed=seed
    )
    flow.eval()
    flow.double()
    # the flow maps latent -> data; its inverse (explicit here) maps data -> latent
    return stats, lambda x: _compose_inverse(flow, x)


def _compose_inverse(flow: Any, x: torch.Tensor) -> torch.Tensor:
    # .parts, not iteration: a ComposeTransformModule's ModuleList holds only the parts
    # that are modules, and Pyro's Permute is not one
    for part in reversed(flow.parts):
        x = part.inv(x)
    return x


def normflows_model(train: torch.Tensor, seconds: float, seed: int) -> tuple[dict, Callable]:
    import normflows as nf

    torch.manual_seed(seed)
    per_layer = LIPSCHITZ ** (1.0 / (len(HIDDEN) + 1))
    flows: list[torch.nn.Module] = []
    for _ in range(BLOCKS):
        net = nf.nets.LipschitzMLP([2, *HIDDEN, 2], lipschitz_const=per_layer, init_zeros=True)
        flows += [nf.flows.Residual(net, reduce_memory=True), nf.flows.ActNorm(2)]
    model = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(2, trainable=False), flows=flows)
    model.train()
    stats = train_for(
        seconds,
        list(model.parameters()),
        model.forward_kld,
        train,
        after_step=lambda: nf.utils.update_lipschitz(model, 50),
        seed=seed,
    )
    model.eval()
    model.double()
    nf.utils.update_lipschitz(model, 200)

    def to_latent(x: torch.Tensor) -> torch.Tensor:
        for flow in reversed(model.flows):
            x, _ = flow.inverse(x)
        return x

    return stats, to_latent


def pyro_flow(name: str) -> Callable:
    def run(train: torch.Tensor, seconds: float, seed: int) -> tuple[dict, Callable]:
        from pyro.distributions.transforms import Permute, spline_coupling

        torch.manual_seed(seed)
        if name == "affine":
            flow = build_flow("pyro-affine", 2, num_blocks=8)
        else:
            reverse = torch.arange(1, -1, -1)
            parts: list = []
            for _ in range(4):
                parts += [spline_coupling(2, count_bins=8), Permute(reverse)]
            from pyro.distributions.torch_transform import ComposeTransformModule

            flow = ComposeTransformModule(parts[:-1])
        density = make_density(flow, (2,), torch.device("cpu"), train.dtype)
        stats = train_for(
            seconds,
            list(flow.parameters()),
            lambda x: -density.log_prob(x).mean(),
            train,
            seed=seed,
        )
        flow.double()
        return stats, lambda x: _compose_inverse(flow, x)

    return run


MODELS = {
    "pyro-invres": ours,
    "normflows": normflows_model,
    "pyro-affine x8": pyro_flow("affine"),
    "pyro-spline x4": pyro_flow("spline"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--datasets", default="8gaussians,moons")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "benchmark": "equal_time",
        "env": env_info(torch.device("cpu")),
        "date": datetime.date.today().isoformat(),
        "seconds_per_model": args.seconds,
        "datasets": {},
    }
    rows = []
    for dataset in args.datasets.split(","):
        generator = torch.Generator().manual_seed(args.seed)
        train = sample_toy(dataset, DEFAULTS["n_train"], generator)
        test = sample_toy(dataset, DEFAULTS["n_test"], generator)
        entry = {}
        for name in args.models.split(","):
            print(f"{dataset}: {name} ...", flush=True)
            stats, to_latent = MODELS[name](train, args.seconds, args.seed)
            stats["test_nll"] = exact_nll(to_latent, test)
            entry[name] = stats
            nll = stats["test_nll"]
            if stats["diverged"]:
                nll = f"{nll:.3f} (diverged at step {stats['diverged_at_step']}; as at step "
                nll += f"{stats['scored_at_step']})"
            rows.append([dataset, name, stats["steps"], nll])
        result["datasets"][dataset] = entry
    out = Path(args.out) if args.out else RESULTS_DIR / "equal_time_cpu.json"
    write_json(result, out)
    print(f"\n## Test NLL after {args.seconds:g} s of training each (exact log-det)\n")
    print(markdown_table(["data set", "model", "steps", "test NLL"], rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
