"""Where a trained image flow sends its worst-scored test image: layer by layer.

Trains one model of ``bench_images.py`` alone, with that benchmark's protocol (its
options, slices of CPU time, validation after each, the best validation state kept),
scores the test set, then maps the worst-scored test images (and the median one) from
data to latent one part at a time, printing the largest ``|value|`` after each part:
where a latent coordinate grows far past the base's range is the layer that gives the
image its low density. Also prints each image's base log-density and the flow's log-det.

Example (MNIST seed 1 at 900 CPU seconds, about 15 minutes on one core)::

    python examples/benchmarks/diagnose_image_outlier.py --model glow_residual --seed 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_images as bi  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="glow_residual", choices=bi.MODELS)
    p.add_argument("--dataset", default="mnist", choices=["digits", "mnist"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--budget", type=float, default=900.0, help="CPU seconds of training")
    p.add_argument("--slice", type=float, default=50.0)
    p.add_argument("--residual-channels", type=int, default=16)
    p.add_argument("--worst", type=int, default=3, help="how many worst test images")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dev = torch.device("cpu")
    data = bi.make_dataset(args.dataset, False, 28)
    opts = bi.Options(budget=args.budget, slice=args.slice, seed=args.seed)
    size = bi.sizes(args.dataset, False)
    size["glow_residual"]["residual"] = args.residual_channels
    run = bi.Run(args.model, data, size[args.model], opts, dev)
    bi.train_round_robin([run], dev, print)
    if run.best_state is not None:
        run.model.module.load_state_dict(run.best_state)
    test = bi.score(run.model, data, data.test, 500, seed=12)
    order = test.argsort(descending=True)
    idx = order[: args.worst].tolist() + [int(order[len(order) // 2])]
    print(f"test bits/dim mean {float(test.mean()):.4f} median {float(test.median()):.4f}")
    print("images (worst first, then the median):", idx)
    print("bits/dim:", [round(float(test[i]), 2) for i in idx])
    model = run.model
    model.eval_mode()
    z, _ = bi.to_logit(data.test[idx].to(dev))
    with torch.no_grad():
        log_p = model.log_prob_z(z)
        x = z  # data to latent, one part at a time: the last part's inverse first
        for k, part in reversed(list(enumerate(model.flow.parts))):
            x = part.inv(x)
            biggest = x.flatten(1).abs().max(1).values
            # an inverted part names the transform it wraps (ours .transform, Pyro's ._inv)
            inner = getattr(part, "transform", None) or getattr(part, "_inv", part)
            label = type(inner).__name__
            print(f"part {k:2d} {label:24s} max |value|", [round(float(v), 1) for v in biggest])
        base = model.base.log_prob(x)  # x is the latent now
        print("base log-density:", [round(float(v), 1) for v in base])
        print("flow log-det:", [round(float(v), 1) for v in log_p - base])
    return {"test": test, "images": idx}


if __name__ == "__main__":
    main()
