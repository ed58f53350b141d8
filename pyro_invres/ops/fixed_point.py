"""Solvers for ``x = f(x)`` when ``f`` is a contraction, with a real stopping rule.

For an i-ResNet block ``y = x + g(x)`` with ``Lip(g) <= c < 1`` the map
``f(x) = y - g(x)`` is a contraction and Banach's theorem gives both convergence and an
a-posteriori error bound, which is what the stopping rule tests:

.. math::

    \\|x_k - x^\\star\\| \\le \\frac{c}{1 - c}\\,\\|x_k - x_{k-1}\\|
    \\le \\mathrm{atol} + \\mathrm{rtol}\\,\\|x_k\\| .

Norms are Euclidean per sample (over the event dimensions) and every sample of the batch
must pass. When the step falls to the floating-point noise floor the iterate cannot
improve any further and the solve also stops (as converged if that floor meets the
tolerance, which the defaults ensure).

Non-convergence is never silent: a :class:`ConvergenceWarning` names the residual and
the iteration count, or :class:`ConvergenceError` is raised with ``strict=True``.

Anderson acceleration (``method="anderson"``) mixes the last ``m`` iterates by a small
least-squares problem (Walker & Ni 2011); it usually needs far fewer evaluations of ``f``.

Newton's method (``method="newton"``) takes a callable that returns the Jacobian of ``f``
with its value (a network that carries its Jacobian forward gives both in one pass) and
steps to the root of ``F(x) = x - f(x)``:

.. math::

    x_{k+1} = x_k - (I - J_f(x_k))^{-1} (x_k - f(x_k)),

which converges quadratically near the solution. It is safeguarded: a Newton point whose
step ``||f(x) - x||`` did not shrink by the contraction factor against the last accepted
point is replaced by the Banach step from that point, whose step is guaranteed to shrink
by it, so the solve converges from any start. The stopping rule is the same Banach bound.

References:
    [1] Behrmann et al., *Invertible Residual Networks*, ICML 2019. arXiv:1811.00995
    [2] Walker & Ni, *Anderson Acceleration for Fixed-Point Iterations*, SIAM J. Numer.
        Anal. 49(4), 2011.
    [3] Nocedal & Wright, *Numerical Optimization*, 2nd ed., Springer 2006, ch. 11
        (Newton's method for nonlinear equations, safeguarded steps).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "SolveInfo",
    "default_tolerances",
    "solve_fixed_point",
    "SOLVER_METHODS",
]

SOLVER_METHODS = ("fixed_point", "anderson", "newton")


class ConvergenceWarning(RuntimeWarning):
    """An iterative inverse stopped before meeting its tolerance.

    Example:
        >>> import torch, warnings
        >>> y = torch.tensor([[1.0, 2.0]])
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     x, info = solve_fixed_point(lambda x: y - 0.9 * torch.tanh(x), y, max_iter=2)
        >>> info.converged, [w.category.__name__ for w in caught]
        (False, ['ConvergenceWarning'])
    """


class ConvergenceError(RuntimeError):
    """An iterative inverse did not converge and ``strict=True`` was asked for.

    Example:
        Two iterations of ``x = x / 2`` from 1 leave an error bound of ``1 / 4``:

        >>> import torch
        >>> solve_fixed_point(lambda x: x / 2, torch.ones(1, 1), contraction=0.5,
        ...                   max_iter=2, strict=True, what="toy")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pyro_invres.ops.fixed_point.ConvergenceError: toy did not converge: error bound 0.25 > ...
    """


@dataclass
class SolveInfo:
    """What a solve did.

    Attributes:
        iterations: evaluations of ``f`` after the starting point.
        error: the largest per-sample error bound at the end (absolute).
        tolerance: the per-sample tolerance it was compared with (at the worst sample).
        converged: whether every sample met its tolerance.

    Example:
        The steps of ``x = x / 2`` halve at every iteration; from ``(1, 1)`` in float32
        the bound meets the default tolerance after 17:

        >>> import torch
        >>> x, info = solve_fixed_point(lambda x: x / 2, torch.ones(1, 2), contraction=0.5)
        >>> info.converged, info.error <= info.tolerance, info.iterations
        (True, True, 17)
    """

    iterations: int
    error: float
    tolerance: float
    converged: bool


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` close to what ``dtype`` can resolve after a contraction.

    float64 gets 1e-10, float32 2e-5 (its noise floor after a ``c/(1-c)`` amplification),
    half precisions 1e-2. A sample has converged when

    .. math::

        \\frac{c}{1 - c}\\,\\|x_k - x_{k-1}\\| \\le \\mathrm{atol} + \\mathrm{rtol}\\,\\|x_k\\| .

    Example:
        >>> import torch
        >>> default_tolerances(torch.float64), default_tolerances(torch.float32)
        ((1e-10, 1e-10), (2e-05, 2e-05))
        >>> default_tolerances(torch.bfloat16)
        (0.01, 0.01)
    """
    bits = torch.finfo(dtype).bits
    if bits >= 64:
        return 1e-10, 1e-10
    if bits >= 32:
        return 2e-5, 2e-5
    return 1e-2, 1e-2


def _sample_norm(t: Tensor, event_dim: int) -> Tensor:
    if event_dim == 0:
        return t.abs()
    return t.flatten(start_dim=t.dim() - event_dim).norm(dim=-1)


def _bound_factor(contraction: float | None) -> float:
    if contraction is None:
        return 1.0
    if not 0.0 <= contraction < 1.0:
        raise ValueError(f"contraction must lie in [0, 1), got {contraction}")
    return contraction / (1.0 - contraction) if contraction > 0 else 0.0


def solve_fixed_point(
    f: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    event_dim: int = 1,
    contraction: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = 1000,
    method: str = "fixed_point",
    history: int = 5,
    jacobian: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    strict: bool = False,
    what: str = "fixed-point solve",
) -> tuple[Tensor, SolveInfo]:
    """Solve ``x = f(x)`` starting from ``x0`` (no gradients are tracked).

    Arguments:
        f: the contraction; maps a tensor shaped like ``x0`` to one of the same shape.
        x0: the starting point, ``batch_shape + event_shape``.
        event_dim: number of trailing event dimensions (norms are taken over them).
        contraction: a bound on ``Lip(f)``; turns the step into a true error bound.
        atol: absolute tolerance (default from :func:`default_tolerances`).
        rtol: relative tolerance (default from :func:`default_tolerances`).
        max_iter: the most evaluations of ``f``.
        method: ``"fixed_point"`` (Banach iteration), ``"anderson"`` or ``"newton"``.
        history: the number of past iterates Anderson mixes (at most the event size is
            used: beyond it the differences are linearly dependent).
        jacobian: for ``"newton"`` (and only there): ``x -> (f(x), J_f(x))`` with the
            Jacobian shaped ``x.shape + x.shape[-1:]`` (one event dimension); every
            evaluation then goes through it instead of ``f``.
        strict: raise :class:`ConvergenceError` instead of warning.
        what: how the warning names the solve.

    Returns:
        ``(x, info)``: the solution and a :class:`SolveInfo`.

    Example:
        >>> import torch
        >>> y = torch.tensor([[1.0, 2.0]])
        >>> f = lambda x: y - 0.5 * torch.tanh(x)
        >>> x, info = solve_fixed_point(f, y, contraction=0.5)
        >>> info.converged, bool(torch.allclose(x + 0.5 * torch.tanh(x), y, atol=1e-4))
        (True, True)

        Newton, with the Jacobian of ``f``:

        >>> def f_and_jacobian(x):
        ...     return f(x), torch.diag_embed(-0.5 / torch.cosh(x) ** 2)
        >>> x, newton = solve_fixed_point(f, y, contraction=0.5, method="newton",
        ...                               jacobian=f_and_jacobian)
        >>> newton.converged, newton.iterations < info.iterations
        (True, True)
    """
    if method not in SOLVER_METHODS:
        raise ValueError(f"unknown solver method {method!r}; expected one of {SOLVER_METHODS}")
    if (method == "newton") != (jacobian is not None):
        raise ValueError("method='newton' takes jacobian=(x -> (f(x), J_f(x))), and only it")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    d_atol, d_rtol = default_tolerances(x0.dtype)
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    if atol < 0 or rtol < 0:
        raise ValueError(f"tolerances must be non-negative, got atol={atol}, rtol={rtol}")
    factor = _bound_factor(contraction)
    eps = torch.finfo(x0.dtype).eps
    event_ndim = min(event_dim, x0.dim())
    numel_event = max(1, math.prod(x0.shape[x0.dim() - event_ndim :]))
    mixer = _AndersonMixer(history, numel_event) if method == "anderson" else None
    newton = None
    if method == "newton":
        if event_ndim != 1:
            raise ValueError(f"method='newton' takes one event dimension, got {event_dim}")
        newton = _NewtonStepper(contraction)

    with torch.no_grad():
        x = x0.detach()
        if x.numel() == 0:
            return x, SolveInfo(0, 0.0, 0.0, True)
        info = SolveInfo(0, math.inf, math.nan, False)
        for it in range(1, max_iter + 1):
            if jacobian is not None:
                fx, jac = jacobian(x)
            else:
                fx, jac = f(x), None
            # Banach: ||f(x) - x*|| <= c / (1 - c) * ||f(x) - x||, for any iterate x,
            # so the bound stays rigorous under Anderson mixing too.
            step = _sample_norm(fx - x, event_ndim).reshape(-1)
            size = _sample_norm(fx, event_ndim).reshape(-1)
            error = factor * step
            tol = atol + rtol * size
            # rounding in f bounds how small a step can get, whatever the tolerance
            floor = 8 * eps * (size + math.sqrt(numel_event))
            if not bool(torch.isfinite(fx).all()):
                info = SolveInfo(it, math.inf, float(tol.max()), False)
                x = fx
                break
            ok = (error <= tol) | (step <= floor)
            worst = int(torch.argmax(error - tol))
            info = SolveInfo(it, float(error[worst]), float(tol[worst]), bool(ok.all()))
            if info.converged:
                x = fx
                break
            if newton is not None:
                x = newton(x, fx, jac, step.reshape(x.shape[:-1]))  # type: ignore[arg-type]
            else:
                x = mixer(x, fx) if mixer is not None else fx
    if not info.converged:
        message = (
            f"{what} did not converge: error bound {info.error:.3g} > tolerance "
            f"{info.tolerance:.3g} after {info.iterations} iterations (max_iter={max_iter}); "
            "raise max_iter, loosen atol/rtol, or lower the Lipschitz coefficient"
        )
        if strict:
            raise ConvergenceError(message)
        warnings.warn(message, ConvergenceWarning, stacklevel=3)
    return x, info


class _NewtonStepper:
    """Safeguarded Newton steps for ``x = f(x)``, one event dimension, per sample.

    A sample's point is accepted when its step ``||f(x) - x||`` is at most ``rate`` times
    the step at its last accepted point; a rejected sample goes back to the Banach step
    ``f`` of its last accepted point, which is accepted unconditionally (for a contraction
    its step shrinks by ``Lip(f)``), so no sample can stall.
    """

    def __init__(self, contraction: float | None) -> None:
        self.rate = 1.0 if contraction is None else float(contraction)
        self.ref_step: Tensor | None = None  # step at the last accepted point
        self.ref_fx: Tensor | None = None  # f at the last accepted point
        self.fallback: Tensor | None = None  # samples now at a Banach fallback point

    def __call__(self, x: Tensor, fx: Tensor, jac: Tensor, step: Tensor) -> Tensor:
        if self.ref_step is None or self.ref_fx is None or self.fallback is None:
            accept = torch.ones_like(step, dtype=torch.bool)
            self.ref_step, self.ref_fx = step, fx
        else:
            accept = (step <= self.rate * self.ref_step) | self.fallback
            self.ref_step = torch.where(accept, step, self.ref_step)
            self.ref_fx = torch.where(accept[..., None], fx, self.ref_fx)
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        delta = torch.linalg.solve(eye - jac, (x - fx).unsqueeze(-1)).squeeze(-1)
        x_new = x - delta
        x_new = torch.where(torch.isfinite(x_new), x_new, fx)
        self.fallback = ~accept
        return torch.where(accept[..., None], x_new, self.ref_fx)


class _AndersonMixer:
    """Type-II Anderson mixing with per-sample coefficients and a Tikhonov guard."""

    def __init__(self, history: int, numel_event: int) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        # more differences than dimensions only makes the least-squares problem singular
        # (2-D, c = 0.9: history 5 takes 12-13 evaluations to 1e-6, history 2 takes 8)
        self.m = min(history, numel_event)
        self.n = numel_event
        self.xs: list[Tensor] = []
        self.gs: list[Tensor] = []

    def __call__(self, x: Tensor, fx: Tensor) -> Tensor:
        self.xs.append(x.reshape(-1, self.n))
        self.gs.append((fx - x).reshape(-1, self.n))
        if len(self.xs) > self.m + 1:
            self.xs.pop(0)
            self.gs.pop(0)
        if len(self.xs) < 2:
            return fx
        G = torch.stack(self.gs, dim=-1)  # (B, n, k): residuals f(x_i) - x_i
        X = torch.stack(self.xs, dim=-1)
        dG = G[..., 1:] - G[..., :-1]
        dX = X[..., 1:] - X[..., :-1]
        A = dG.transpose(-1, -2) @ dG
        scale = A.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-30)
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        gamma = torch.linalg.solve(
            A + 1e-8 * scale[..., None, None] * eye, dG.transpose(-1, -2) @ G[..., -1:]
        )
        x_new = (X[..., -1:] + G[..., -1:] - (dX + dG) @ gamma).squeeze(-1).reshape(x.shape)
        # a least-squares step can misbehave far from the solution: fall back to f(x)
        return torch.where(torch.isfinite(x_new), x_new, fx)
