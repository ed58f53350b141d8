"""Mass-covering objectives for the posterior guides: reverse KL against Renyi's alpha.

Reverse KL (``Trace_ELBO``) under-disperses: on Neal's funnel every guide of
``bench_posteriors.py`` fits the neck ``v`` far too narrow. Renyi's bound with
``alpha < 1`` (``alpha = 0`` is the importance-weighted bound of the particles) pays
for missing mass. This trains one guide on one model with one objective, with the
benchmark's schedule (ClippedAdam 1e-2 decaying to 1e-3 over 2000 steps, 8 vectorised
particles), and scores it with the benchmark's metrics on 10,000 draws (exact
log-densities). One line of JSON per run is appended to ``--out``.

Example:
    ``python examples/benchmarks/study_objectives.py --model funnel --guide residual
    --objective 0 --out examples/benchmarks/results/objectives_cpu.jsonl``; then
    ``python examples/benchmarks/study_objectives.py --summary FILE [FILE ...]`` prints the
    mean over seeds of each setting as a markdown table, and ``--best [--seeds 0,1]
    [--objectives kl,kl>0] FILE [FILE ...]`` every guide at its best setting by k-hat
    (reference-free), per model; ``--neutra-summary FILE [FILE ...]`` the NeuTra-HMC runs
    (``--neutra``) by setting (``--neutra-summary --seeds 0,1,2 --rates 0.9 --models funnel
    FILE ...``: those seeds, NUTS target acceptance rates and models only).
    ``--plain-nuts`` runs NUTS on the model itself (no guide) with the same chains, the
    baseline row of that table;
    ``--target-accept`` sets NUTS's target acceptance rate for either.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_posteriors as bp  # noqa: E402
import posterior_models as models  # noqa: E402
from common import env_info  # noqa: E402
from posterior_reference import load_reference  # noqa: E402


def _objective(run: dict) -> str:
    """The run's objective, with KL's share of the steps where not the default half."""
    switch, steps = run.get("switch"), run.get("steps")
    if switch is None or not steps or switch == round(0.5 * steps):
        return run["objective"]
    return f"{run['objective']} (KL {switch / steps:.0%})"


def _settings(paths: list[str], keep: Callable[[dict], bool] = lambda r: True) -> dict:
    """The runs of the JSON-lines files ``paths`` that ``keep`` accepts, by setting:
    ``(model, guide, objective with its KL share, rate) -> [run, ...]``."""
    groups: dict[tuple, list[dict]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if keep(r):
                    key = (r["model"], r["guide"], _objective(r), float(r.get("lr") or bp.LR))
                    groups.setdefault(key, []).append(r)
    return groups


def summarize(paths: list[str]) -> str:
    """A markdown table of the runs in ``paths``: mean and spread over seeds per setting.

    One row per (model, guide, objective, rate): the seeds, the mean (min-max) Pareto
    k-hat, the mean importance-weighted log Z and the mean ratio of the neck's sd to the
    reference's; diverged runs are counted, not averaged.
    """
    groups = _settings(paths)
    out = [
        "| model | guide | objective | lr | seeds | k-hat mean (min-max) | IW log Z "
        "| neck sd / ref |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups):
        runs = groups[key]
        ok = [r for r in runs if r.get("khat") is not None and not r.get("error")]
        failed = len(runs) - len(ok)
        if ok:
            k = [r["khat"] for r in ok]
            iw = sum(r["iw_log_z"] for r in ok) / len(ok)
            necks = [next(iter(r["neck"].values()))["ratio"] for r in ok if r.get("neck")]
            neck = f"{sum(necks) / len(necks):.2f}" if necks else "-"
            cells = f"{sum(k) / len(k):.2f} ({min(k):.2f}-{max(k):.2f}) | {iw:.2f} | {neck}"
        else:
            cells = "- | - | -"
        seeds = f"{len(ok)}" + (f" (+{failed} diverged)" if failed else "")
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | {seeds} | {cells} |")
    return "\n".join(out)


KHAT_RELIABLE = 0.7


def best_settings(
    paths: list[str], seeds: set[int] | None = None, objectives: set[str] | None = None
) -> str:
    """Per model, every guide at its best setting by mean k-hat, as a markdown table.

    The setting (objective, rate) is chosen by the Pareto k-hat alone, which needs no
    reference posterior, among the guide's settings run on the most seeds (a setting with
    fewer seeds could win by luck); the importance-weighted log Z (mean over the seeds, with the
    Monte-Carlo standard error of a single run, or the spread over seeds when there are
    several) and the neck's sd against the reference are then read at that setting. Per
    model the lowest k-hat and the highest IW log Z are in bold, and IW log Z values
    within two standard errors of the highest are marked as ties (``=``). An estimate at
    k-hat >= 0.7 is unreliable (Vehtari et al., *Pareto smoothed importance sampling*):
    it is marked so and cannot be the highest while a reliable one exists. Only runs of the
    ``seeds`` and ``objectives`` given (all when ``None``) count, so that every guide is
    compared on the same seeds and choices.
    """
    groups: dict[tuple, list[dict]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if seeds is not None and r["seed"] not in seeds:
                    continue
                if objectives is not None and r["objective"] not in objectives:
                    continue
                if r.get("khat") is None or r.get("error"):
                    continue
                key = (r["model"], r["guide"], _objective(r), float(r.get("lr") or bp.LR))
                groups.setdefault(key, []).append(r)
    # a guide's settings are compared on equal footing: only those run on the most seeds
    most: dict[tuple, int] = {}
    for key, runs in groups.items():
        most[key[:2]] = max(most.get(key[:2], 0), len(runs))
    best: dict[str, dict[str, tuple]] = {}
    for key, runs in groups.items():
        if len(runs) < most[key[:2]]:
            continue
        khat = sum(r["khat"] for r in runs) / len(runs)
        iw = [r["iw_log_z"] for r in runs]
        mean_iw = sum(iw) / len(iw)
        if len(runs) > 1:
            se = (sum((v - mean_iw) ** 2 for v in iw) / (len(iw) - 1) / len(iw)) ** 0.5
        else:
            se = runs[0]["iw_log_z_se"]
        necks = [next(iter(r["neck"].values()))["ratio"] for r in runs if r.get("neck")]
        neck = sum(necks) / len(necks) if necks else None
        row = (khat, mean_iw, se, neck, key[2], key[3], len(runs))
        current = best.setdefault(key[0], {}).get(key[1])
        if current is None or khat < current[0]:
            best[key[0]][key[1]] = row
    out = [
        "| model | guide | best setting | seeds | k-hat | IW log Z | neck sd / ref |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in sorted(best):
        rows = best[model]
        low_k = min(r[0] for r in rows.values())
        # an importance-weighted estimate is unreliable at k-hat >= 0.7 (its weights have
        # at most about 1.4 finite moments): it cannot take the lead, however high
        reliable = [r for r in rows.values() if r[0] < KHAT_RELIABLE] or list(rows.values())
        top = max(reliable, key=lambda r: r[1])
        for guide in sorted(rows, key=lambda g: rows[g][0]):
            khat, iw, se, neck, objective, lr, n = rows[guide]
            k_cell = f"**{khat:.2f}**" if khat == low_k else f"{khat:.2f}"
            iw_cell = f"{iw:.2f} ± {se:.2f}"
            if rows[guide] is top:
                iw_cell = f"**{iw_cell}**"
            elif khat >= KHAT_RELIABLE and top[0] < KHAT_RELIABLE:
                iw_cell = f"{iw_cell} (unreliable)"
            elif top[1] - iw <= 2 * max(se, top[2]):
                iw_cell = f"= {iw_cell}"
            neck_cell = "-" if neck is None else f"{neck:.2f}"
            out.append(
                f"| {model} | {guide} | {objective} @ {lr:g} | {n} | {k_cell} | {iw_cell} "
                f"| {neck_cell} |"
            )
    return "\n".join(out)


def neutra_summary(
    paths: list[str],
    seeds: set[int] | None = None,
    rates: set[float] | None = None,
    models: set[str] | None = None,
) -> str:
    """A markdown table of the NeuTra-HMC runs in ``paths`` (rows with ``--neutra``, and
    plain NUTS's rows from ``--plain-nuts``).

    One row per (model, sampler, objective, rate, NUTS target acceptance rate): the seeds,
    the minimum bulk ESS per 1,000 gradient evaluations as the mean (min-max) over seeds,
    the divergences of each seed, the largest R-hat, and the mean ratio of the chains'
    neck sd to the reference's. Runs recorded before the rate was kept ran at Pyro's
    default 0.8. Only the ``seeds`` given count (all when ``None``), so that every sampler
    is compared on the same seeds, only the target acceptance ``rates`` given (all when
    ``None``), and only the ``models`` given (all when ``None``; a model's rows can then
    keep their own seeds).
    """

    def rate(run: dict) -> float:
        return float(run["neutra"].get("target_accept_prob") or 0.8)

    def keep(run: dict) -> bool:
        return (
            bool(run.get("neutra"))
            and (seeds is None or run["seed"] in seeds)
            and (rates is None or rate(run) in rates)
            and (models is None or run["model"] in models)
        )

    groups: dict[tuple, list[dict]] = {}
    for key, runs in _settings(paths, keep=keep).items():
        for r in runs:
            groups.setdefault((*key, rate(r)), []).append(r)
    out = [
        "| model | sampler | objective | lr | target accept | seeds "
        "| ESS / 1k grads mean (min-max) | divergences by seed | max R-hat | neck sd / ref |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups):
        runs = sorted(groups[key], key=lambda r: r["seed"])
        ess = [1000 * r["neutra"]["ess_per_grad"] for r in runs]
        div = ", ".join(str(r["neutra"]["divergences"]) for r in runs)
        rhats = [float(r["neutra"]["max_rhat"]) for r in runs]
        # max() skips a NaN that comes second: a chain with no R-hat must show, not hide
        rhat = float("nan") if any(math.isnan(v) for v in rhats) else max(rhats)
        necks = [next(iter(n.values()))["ratio"] for r in runs if (n := r["neutra"].get("neck"))]
        neck = f"{sum(necks) / len(necks):.2f}" if necks else "-"
        plain = key[1] == "nuts"  # NUTS on the model: no guide, no objective, no rate
        sampler = "NUTS (no warp)" if plain else f"NeuTra {key[1]}"
        lr = "-" if plain else f"{key[3]:g}"
        out.append(
            f"| {key[0]} | {sampler} | {key[2]} | {lr} | {key[4]:g} | {len(runs)} "
            f"| {sum(ess) / len(ess):.2f} ({min(ess):.2f}-{max(ess):.2f}) | {div} "
            f"| {rhat:.3f} | {neck} |"
        )
    return "\n".join(out)


def funnel_scale_gap(
    guide: object, z0s: tuple[float, ...] = (-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5)
) -> list[dict]:
    """How far the trained funnel guide's warp is from opening the neck, along the base's
    first axis: at ``u = (z_0, 0, ..., 0)``, ``v = T(u)_1`` and the log of the smallest and
    largest singular values of the ``x``-block of the warp's Jacobian, minus the exact
    conditional log-scale ``v / 2`` of ``x | v`` (0: the warp matches the funnel there;
    negative: it is too narrow, so NUTS's steps must be larger in the base than elsewhere).
    """
    transform = guide.get_transform()  # type: ignore[attr-defined]
    out = []
    for z0 in z0s:
        u = torch.zeros(guide.latent_dim)  # type: ignore[attr-defined]
        u[0] = float(z0)
        jac = torch.autograd.functional.jacobian(lambda w: transform(w.unsqueeze(0))[0], u)
        with torch.no_grad():
            v = float(transform(u.unsqueeze(0))[0, 0])
        sv = torch.linalg.svdvals(jac[1:, 1:]).log()
        out.append({"z0": float(z0), "v": v, "gap_min": float(sv.min()) - v / 2,
                    "gap_max": float(sv.max()) - v / 2})  # fmt: skip
    return out


#: the recorded NeuTra runs' chains: 4 chains of 200 warmup and 200 draws
NUTS_CHAINS, NUTS_WARMUP, NUTS_DRAWS = 4, 200, 200


def _nuts_row(
    spec: models.PosteriorModel, guide: object, ref: object, args: argparse.Namespace
) -> dict:
    """NUTS on the model (``guide=None``) or its NeuTra warp; the diagnostics a row keeps.

    ``run_nuts`` seeds chain ``c`` with ``seed + c``. NeuTra runs of neighbouring seeds
    share those streams on different warps (each seed trains its own guide), as the
    recorded runs did; plain NUTS has no guide to tell seeds apart, so its seed ``s``
    starts at ``4 s`` and no two seeds share a chain.
    """
    first = args.seed if guide is not None else args.seed * NUTS_CHAINS
    nuts = bp.run_nuts(
        spec, guide, NUTS_CHAINS, NUTS_WARMUP, NUTS_DRAWS, first, ref,
        target_accept_prob=args.target_accept,
    )  # fmt: skip
    keys = ("cpu_s", "grad_evals", "min_bulk_ess", "ess_per_grad", "divergences", "max_rhat")
    row = {k: nuts.get(k) for k in (*keys, "neck", "target_accept_prob", "divergent_at")}
    row["chain_seeds"] = [first + c for c in range(NUTS_CHAINS)]
    return row


def _record(row: dict, out: str) -> dict:
    """Append ``row`` to the JSON-lines file ``out`` and echo it (without its env)."""
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "env"}))
    return row


def _plain_nuts(spec: models.PosteriorModel, ref: object, args: argparse.Namespace) -> dict:
    """A run of NUTS on the model itself: a row with ``guide="nuts"`` and no objective."""
    row: dict = {"model": args.model, "guide": "nuts", "objective": "-", "lr": None}
    row.update(seed=args.seed, env=env_info(torch.device("cpu")))
    row["neutra"] = _nuts_row(spec, None, ref, args)
    return _record(row, args.out)


def main(argv: list[str] | None = None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--summary"]:  # study_objectives.py --summary runs.jsonl [...]
        print(summarize(argv[1:]))
        return {}
    if argv[:1] == ["--neutra-summary"]:  # [--seeds 0,1] [--rates 0.9] [--models m] FILE ...
        rest, picks = argv[1:], {"--seeds": None, "--rates": None, "--models": None}
        while rest[:1] and rest[0] in picks and len(rest) > 1:
            picks[rest[0]], rest = rest[1].split(","), rest[2:]
        seeds = None if picks["--seeds"] is None else {int(v) for v in picks["--seeds"]}
        rates = None if picks["--rates"] is None else {float(v) for v in picks["--rates"]}
        # not `models`: that name is the model module everywhere else in main()
        kept = None if picks["--models"] is None else set(picks["--models"])
        print(neutra_summary(rest, seeds, rates, kept))
        return {}
    if argv[:1] == ["--best"]:  # --best [--seeds 0,1] [--objectives kl,kl>0] runs.jsonl ...
        rest, picks = argv[1:], {"--seeds": None, "--objectives": None}
        while rest[:1] and rest[0] in picks:
            picks[rest[0]], rest = rest[1].split(","), rest[2:]
        seeds = None if picks["--seeds"] is None else {int(s) for s in picks["--seeds"]}
        objectives = None if picks["--objectives"] is None else set(picks["--objectives"])
        print(best_settings(rest, seeds, objectives))
        return {}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=models.MODELS)
    p.add_argument("--guide", default="residual", choices=sorted(bp.guide_factories()))
    p.add_argument(
        "--objective",
        default="kl",
        help="'kl' (Trace_ELBO), Renyi's alpha, or 'kl>ALPHA': reverse KL for the first "
        "--switch of the steps, then Renyi's alpha from that fit (a warm start)",
    )
    p.add_argument("--switch", type=float, default=0.5, help="with 'kl>ALPHA': KL's share")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=None, help="initial rate (default the benchmark's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--neutra",
        action="store_true",
        help="then NUTS on the NeuTra warp by the trained guide (4 chains of 200 warmup and "
        "200 draws, the recorded NeuTra runs' setting)",
    )
    p.add_argument(
        "--scan",
        action="store_true",
        help="funnel only: record how far the trained warp's conditional scale of x given v "
        "is from the exact e^(v/2) along the base's first axis (funnel_scale_gap)",
    )
    p.add_argument(
        "--plain-nuts",
        action="store_true",
        help="no guide: NUTS on the model itself, with --neutra's chains and --seed "
        "(the baseline of --neutra-summary)",
    )
    p.add_argument(
        "--target-accept",
        type=float,
        default=0.8,
        help="NUTS's target acceptance rate (Pyro's default 0.8), for --neutra and --plain-nuts",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not 0.0 < args.target_accept < 1.0:
        p.error(f"--target-accept must be in (0, 1), got {args.target_accept}")
    if args.target_accept != 0.8 and not (args.neutra or args.plain_nuts):
        p.error("--target-accept sets NUTS's rate: it needs --neutra or --plain-nuts")
    if args.scan and args.model != "funnel":
        p.error(f"--scan measures the funnel's warp only, got --model {args.model}")
    torch.set_num_threads(1)
    spec = getattr(models, args.model)()
    ref = load_reference(args.model)
    if args.plain_nuts:
        return _plain_nuts(spec, ref, args)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = bp.guide_factories()[args.guide](spec.model)
    kw = dict(
        num_particles=bp.PARTICLES,
        vectorize_particles=True,
        max_plate_nesting=models.MAX_PLATE_NESTING,
    )
    first, _, then = args.objective.partition(">")
    elbos = [Trace_ELBO(**kw) if first == "kl" else RenyiELBO(alpha=float(first), **kw)]
    if then:
        if first != "kl":
            raise ValueError(f"a warm start begins with 'kl', got {args.objective!r}")
        elbos.append(RenyiELBO(alpha=float(then), **kw))
    switch = round(args.switch * args.steps) if then else args.steps
    lr = bp.LR if args.lr is None else args.lr
    # the benchmark's schedule: ClippedAdam decaying tenfold over the steps
    optim = bp.Schedule(lr, lr * bp.LR_FINAL / bp.LR).optimizer(args.steps)
    # one optimizer for both phases: Adam's moments carry over the switch
    svis = [SVI(spec.model, guide, optim, elbo) for elbo in elbos]
    start = time.process_time()
    row: dict = {"model": args.model, "guide": args.guide, "objective": args.objective, "lr": lr}
    row.update(seed=args.seed, steps=args.steps, env=env_info(torch.device("cpu")))
    if then:
        row["switch"] = switch
    try:
        for step in range(args.steps):
            svis[step >= switch].step()
        row["cpu_s"] = time.process_time() - start
        metrics = bp.evaluate(spec, guide, ref, 10_000)
        metrics.pop("_draws", None)
        row.update({k: metrics.get(k) for k in ("elbo", "iw_log_z", "iw_log_z_se", "khat")})
        row["neck"] = metrics.get("neck")
        row["error"] = metrics.get("error")
        if args.scan:  # the funnel's only (refused for other models above)
            row["scale_gap"] = funnel_scale_gap(guide)
        if args.neutra:
            row["neutra"] = _nuts_row(spec, guide, ref, args)
    except (ValueError, RuntimeError) as err:  # a diverged run is a result too
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return _record(row, args.out)


if __name__ == "__main__":
    main()
