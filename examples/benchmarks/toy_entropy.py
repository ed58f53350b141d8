"""The exact log-density and the entropy of each toy density: the floor of any model's NLL.

For data drawn from a density ``p``, no model ``q`` scores a lower expected NLL than the
entropy: ``E_p[-log q] = H(p) + KL(p || q) >= H(p)``. Each sampler in
:mod:`pyro_invres.datasets` is a simple generative story, so ``log p`` is known:

* ``checkerboard``: uniform on 8 squares of side 2, ``H = log 32`` exactly;
* ``8gaussians``: a mixture of 8 isotropic Gaussians (closed form);
* ``rings``, ``circles``: a uniform angle on circles plus Gaussian noise; averaging the
  noise over the angle gives ``exp(-(rho^2 + r^2) / 2 s^2) I0(rho r / s^2) / (2 pi s^2)``;
* ``moons``, ``swissroll``, ``2spirals``: a point on a curve, a uniform parameter, plus
  noise (for the spirals, uniform on a small square, then Gaussian): the mean of the
  noise density over the curve parameter, by the midpoint rule on ``NODES`` nodes;
* ``pinwheel``: ``x = 2 R(phi(f0)) f`` with Gaussian ``f``: the density of ``f`` at every
  preimage of ``x`` (roots of a scalar equation in ``f0``, found on a grid and polished
  by Newton's method) over ``|det dx/df| = 4 |1 - rate e^{f0} f1|``, summed over arms.

The entropy is then ``-mean(log p(x))`` over ``n`` fresh samples, with its Monte-Carlo
standard error. ``python examples/benchmarks/toy_entropy.py`` prints all eight (about a
minute on one thread).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor

from pyro_invres.datasets import TOY_DATASETS, sample_toy

NODES = 1000  # quadrature nodes along a curve: spacing 1/7 to 1/30 of the noise scale
LOG_2PI = math.log(2.0 * math.pi)


def _log_normal2(sq_dist: Tensor, scale: float) -> Tensor:
    """``log N(x; m, scale^2 I)`` in 2-D from ``|x - m|^2``."""
    return -sq_dist / (2.0 * scale**2) - LOG_2PI - 2.0 * math.log(scale)


def _curve_mean(x: Tensor, centres: Tensor, scale: float, chunk: int = 512) -> Tensor:
    """``log mean_j N(x; centres_j, scale^2 I)``: the midpoint rule along a curve."""
    out = []
    for part in x.split(chunk):
        log_terms = _log_normal2(torch.cdist(part, centres).square(), scale)
        out.append(torch.logsumexp(log_terms, dim=1) - math.log(len(centres)))
    return torch.cat(out)


def _midpoints(n: int, low: float, high: float) -> Tensor:
    return low + (high - low) * (torch.arange(n, dtype=torch.float64) + 0.5) / n


def _polar(radius: Tensor, angle: Tensor) -> Tensor:
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)


def _rings_density(x: Tensor, radii: list[float], scale: float) -> Tensor:
    rho = x.norm(dim=-1, keepdim=True)
    r = torch.tensor(radii, dtype=torch.float64)
    # log I0(z) = log i0e(z) + z, so the exponent becomes -(rho - r)^2 / (2 s^2)
    log_terms = (
        -(rho - r).square() / (2.0 * scale**2)
        + torch.log(torch.special.i0e(rho * r / scale**2))
        - LOG_2PI
        - 2.0 * math.log(scale)
    )
    return torch.logsumexp(log_terms, dim=-1) - math.log(len(radii))


def _eight_gaussians(x: Tensor) -> Tensor:
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    centres = _polar(torch.full_like(angles, 4.0), angles) / math.sqrt(2.0)
    return _curve_mean(x, centres, 0.5 / math.sqrt(2.0))


def _checkerboard(x: Tensor) -> Tensor:
    u = x / 2.0
    column = torch.floor(u[:, 0])
    row = u[:, 1] - column.remainder(2.0)  # in [0, 1) or [-2, -1) on the support
    inside = (
        (column >= -2) & (column <= 1) & (((row >= 0) & (row < 1)) | ((row >= -2) & (row < -1)))
    )
    return torch.where(inside, -math.log(32.0), -math.inf).to(torch.float64)


def _moons(x: Tensor) -> Tensor:
    angle = _midpoints(NODES // 2, 0.0, math.pi)
    upper = _polar(torch.ones_like(angle), angle)
    lower = torch.tensor([1.0, 0.5], dtype=torch.float64) - upper
    shift = torch.tensor([-1.0, -0.2], dtype=torch.float64)
    # each moon carries half the mass: one curve of 2 * NODES equally weighted nodes
    return _curve_mean(x, 2.0 * torch.cat([upper, lower]) + shift, 0.2)


def _swissroll(x: Tensor) -> Tensor:
    t = _midpoints(NODES, 1.5 * math.pi, 4.5 * math.pi)
    return _curve_mean(x, _polar(t, t) / 5.0, 0.2)


def _two_spirals(x: Tensor, chunk: int = 256) -> Tensor:
    # t = 3 pi sqrt(u), u uniform: midpoints in u weight the nodes by t's own density
    t = 3.0 * math.pi * torch.sqrt(_midpoints(NODES, 0.0, 1.0))
    arm = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=-1) / 3.0
    width, scale = 0.5 / 3.0, 0.1
    out = []
    for part in x.split(chunk):
        total = torch.zeros(len(part), dtype=torch.float64)
        for sign in (1.0, -1.0):
            # a coordinate is uniform on [low, low + width] (the square's side), then noisy
            low = torch.minimum(sign * arm, sign * (arm + 0.5 / 3.0))
            z = part[:, None, :] - low[None]
            mass = torch.special.ndtr(z / scale) - torch.special.ndtr((z - width) / scale)
            total = total + (mass / width).prod(dim=-1).mean(dim=1) / 2.0
        out.append(torch.log(total))
    return torch.cat(out)


def _pinwheel(x: Tensor, chunk: int = 1024, grid: int = 400) -> Tensor:
    arms, radial, tangential, rate = 5, 0.3, 0.1, 0.25
    f0_grid = _midpoints(grid, 1.0 - 8 * radial, 1.0 + 8 * radial)
    out = []
    for part in x.split(chunk):
        half = part / 2.0
        logs = [torch.full((len(part),), -math.inf, dtype=torch.float64)]
        for k in range(arms):
            base = k * 2.0 * math.pi / arms

            def h(f0: Tensor, pts: Tensor, base: float = base) -> tuple[Tensor, Tensor, Tensor]:
                # f = R(-phi(f0)) x / 2 must have f0 as its first coordinate
                phi = base + rate * torch.exp(f0)
                first = torch.cos(phi) * pts[..., 0] + torch.sin(phi) * pts[..., 1]
                second = -torch.sin(phi) * pts[..., 0] + torch.cos(phi) * pts[..., 1]
                return first - f0, second, rate * torch.exp(f0) * second - 1.0

            value, _, _ = h(f0_grid[None], half[:, None, :])
            rows, cols = torch.nonzero(value[:, :-1] * value[:, 1:] <= 0, as_tuple=True)
            a, b = value[rows, cols], value[rows, cols + 1]
            f0 = f0_grid[cols] + (f0_grid[1] - f0_grid[0]) * a / (a - b)
            pts = half[rows]
            for _ in range(4):  # Newton: h'(f0) = rate e^{f0} f1 - 1
                value, _, slope = h(f0, pts)
                f0 = f0 - value / slope
            _, f1, slope = h(f0, pts)
            log_f = (
                -0.5 * ((f0 - 1.0) / radial) ** 2
                - 0.5 * (f1 / tangential) ** 2
                - LOG_2PI
                - math.log(radial * tangential)
            )
            # |det dx/df| = 4 |1 - rate e^{f0} f1| = 4 |slope|
            term = log_f - math.log(4.0) - torch.log(slope.abs()) - math.log(arms)
            total = torch.full((len(part),), -math.inf, dtype=torch.float64)
            total = total.scatter_reduce(0, rows, term.exp(), reduce="sum", include_self=False)
            logs.append(torch.log(total.clamp_min(0.0)))
        out.append(torch.logsumexp(torch.stack(logs), dim=0))
    return torch.cat(out)


_DENSITIES = {
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
    "moons": _moons,
    "rings": lambda x: _rings_density(x, [0.75, 1.5, 2.25, 3.0], 0.08),
    "pinwheel": _pinwheel,
    "circles": lambda x: _rings_density(x, [3.0, 1.5], 0.24),
    "swissroll": _swissroll,
}


def log_density(name: str, x: Tensor) -> Tensor:
    """``log p(x)`` of the toy density ``name`` at the rows of ``x`` (float64).

    Arguments:
        name: one of :data:`pyro_invres.datasets.TOY_DATASETS`.
        x: ``(N, 2)`` points.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
        >>> log_density("rings", x)[1].item() < -1e4
        True
    """
    if name not in _DENSITIES:
        raise ValueError(f"unknown toy data set {name!r}; choose from {', '.join(TOY_DATASETS)}")
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"expected points of shape (N, 2), got {tuple(x.shape)}")
    return _DENSITIES[name](x.to(torch.float64))


def entropy_floor(name: str, n: int = 50_000, seed: int = 12345) -> dict[str, float]:
    """The entropy of ``name`` in nats, ``-mean log p`` on ``n`` fresh samples.

    Returns:
        ``{"entropy": H, "stderr": its Monte-Carlo standard error, "n": n}``;
        checkerboard's is exact (``log 32``, error 0).

    Example:
        >>> round(entropy_floor("checkerboard", n=10)["entropy"], 4)
        3.4657
    """
    if name == "checkerboard":  # uniform on area 32: every sample scores the same
        return {"entropy": math.log(32.0), "stderr": 0.0, "n": n}
    x = sample_toy(name, n, seed, dtype=torch.float64)
    nll = -log_density(name, x)
    return {
        "entropy": float(nll.mean()),
        "stderr": float(nll.std() / math.sqrt(n)),
        "n": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in TOY_DATASETS:
        floor = entropy_floor(name, args.n)
        print(f"{name:>12}: {floor['entropy']:.4f} +- {floor['stderr']:.4f}")


if __name__ == "__main__":
    main()
