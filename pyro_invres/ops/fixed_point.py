"""Solvers for ``x = f(x)`` when ``f`` is a contraction, with a real stopping rule.

For an i-ResNet block ``y = x + g(x)`` with ``Lip(g) <= c < 1`` the map
``f(x) = y - g(x)`` is a contraction and Banach's theorem gives both convergence and an
a-posteriori error bound, which is what the stopping rule tests:

.. math::

    \\|x_k - x^\\star\\| \\le \\frac{c}{1 - c}\\,\\|x_k - x_{k-1}\\|
    \\le \\mathrm{atol} + \\mathrm{rtol}\\,\\|x_k\\| .

Norms are Euclidean per sample (over the event dimensions) and every sample of the batch
must pass; nothing else counts as converged. When a sample's step reaches the
floating-point noise floor and stops shrinking, the iterate cannot improve any further:
the solve stops there and, if the bound is still above the tolerance (in float32 near
``c = 1`` the floor, amplified by ``c/(1-c)``, can exceed it), reports the bound it
reached as a failure (``SolveInfo.stalled``).

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

An i-ResNet block takes its solver as an object carrying these options:
:class:`FixedPoint`, :class:`Anderson` (with ``history``) or :class:`Newton`, each with
``atol``, ``rtol``, ``max_iter``, ``strict`` and ``warm_start``; the method's name is the
shorthand for the object with its defaults.

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
from typing import ClassVar, Literal

import torch
from torch import Tensor

__all__ = [
    "Anderson",
    "ConvergenceError",
    "FixedPoint",
    "Newton",
    "SECANT_MAX_DIM",
    "Secant",
    "SolverName",
    "ConvergenceWarning",
    "SolveInfo",
    "default_tolerances",
    "solve_fixed_point",
    "SOLVER_METHODS",
]

SOLVER_METHODS = ("fixed_point", "anderson", "newton", "secant")
#: the string shorthands a block accepts for its solver
SolverName = Literal["fixed_point", "anderson", "newton", "secant"]


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
        error: the error bound achieved (absolute), at the worst sample: with a
            ``contraction`` it is the rigorous Banach bound ``c/(1-c) ||f(x) - x||`` of the
            point returned, whatever the reason the solve stopped.
        tolerance: the per-sample tolerance it was compared with (at the worst sample).
        converged: whether every sample's bound met its tolerance; nothing else (a stop
            at the rounding floor included) counts.
        stalled: whether some sample stopped short of its tolerance because its step no
            longer shrank (the dtype's rounding floor, amplified by ``c/(1-c)``).

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
    stalled: bool = False


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` close to what ``dtype`` can resolve after a contraction.

    float64 gets 1e-10, float32 2e-5 (its noise floor after a ``c/(1-c)`` amplification
    at ``c = 0.9``), float16 1e-2 and bfloat16 (8 significant bits: a step cannot
    shrink below about 1e-2 of the iterate) 5e-2. A sample has converged when

    .. math::

        \\frac{c}{1 - c}\\,\\|x_k - x_{k-1}\\| \\le \\mathrm{atol} + \\mathrm{rtol}\\,\\|x_k\\| .

    These are not feasible for every ``c``: the rounding floor of the step grows by
    ``c/(1-c)`` in the bound (in float32, 99x at ``c = 0.99``), and a solve that stalls
    there short of its tolerance warns (or raises under ``strict=True``) with the bound
    it reached; it is never reported as converged.

    Example:
        >>> import torch
        >>> default_tolerances(torch.float64), default_tolerances(torch.float32)
        ((1e-10, 1e-10), (2e-05, 2e-05))
        >>> default_tolerances(torch.float16), default_tolerances(torch.bfloat16)
        ((0.01, 0.01), (0.05, 0.05))
    """
    bits = torch.finfo(dtype).bits
    if bits >= 64:
        return 1e-10, 1e-10
    if bits >= 32:
        return 2e-5, 2e-5
    if dtype == torch.bfloat16:
        return 5e-2, 5e-2
    return 1e-2, 1e-2


def _wider_name(dtype: torch.dtype) -> str:
    return "torch.float64" if torch.finfo(dtype).bits >= 32 else "torch.float32 (or float64)"


def _sample_norm(t: Tensor, event_dim: int) -> Tensor:
    if event_dim == 0:
        return t.abs()
    return t.flatten(start_dim=t.dim() - event_dim).norm(dim=-1)


def _check_tolerance(name: str, value: object) -> float | None:
    """``value`` as a float, or ``None``; a tolerance must be a finite number ``>= 0``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    value = float(value)
    # a NaN tolerance makes every comparison false (never converges, or passes a NaN
    # check), an infinite one accepts any answer: both hide what was really achieved
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class FixedPoint:
    """Banach iteration ``x <- f(x)`` with the Banach stopping rule: an i-ResNet's default solver.

    The solver objects (:class:`FixedPoint`, :class:`Anderson`, :class:`Newton`) carry the
    options of the iterative side of an i-ResNet block; the strings ``"fixed_point"``,
    ``"anderson"`` and ``"newton"`` stand for them with their defaults.

    Attributes:
        atol: absolute tolerance (default: from the dtype, :func:`default_tolerances`).
        rtol: relative tolerance (default: from the dtype).
        max_iter: the most iterations of one solve.
        strict: raise :class:`ConvergenceError` rather than warn when a solve fails.
        warm_start: in training, after the parameters changed, start from the last cached
            solution where that is closer than a cold start (never between two optimizer
            steps nor in evaluation, so results do not depend on call history there).

    Example:
        >>> FixedPoint(atol=1e-6, max_iter=200).options()["max_iter"]
        200
        >>> FixedPoint(rtol=float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: rtol must be a finite number >= 0, got nan
    """

    method: ClassVar[str] = "fixed_point"
    atol: float | None = None
    rtol: float | None = None
    max_iter: int = 1000
    strict: bool = False
    warm_start: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "atol", _check_tolerance("atol", self.atol))
        object.__setattr__(self, "rtol", _check_tolerance("rtol", self.rtol))
        if isinstance(self.max_iter, bool) or int(self.max_iter) != self.max_iter:
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        object.__setattr__(self, "max_iter", int(self.max_iter))
        object.__setattr__(self, "strict", bool(self.strict))
        object.__setattr__(self, "warm_start", bool(self.warm_start))

    def options(self) -> dict[str, object]:
        """The keyword arguments of :func:`solve_fixed_point` this object stands for."""
        return {
            "atol": self.atol,
            "rtol": self.rtol,
            "max_iter": self.max_iter,
            "method": self.method,
            "strict": self.strict,
        }


@dataclass(frozen=True)
class Anderson(FixedPoint):
    """Anderson-accelerated iteration (mixes the last ``history`` iterates).

    Attributes:
        history: how many past iterates are mixed (``m`` of Walker & Ni).

    Example:
        >>> Anderson(history=3).options()["method"]
        'anderson'
    """

    method: ClassVar[str] = "anderson"
    history: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.history, bool) or int(self.history) != self.history or self.history < 1:
            raise ValueError(f"history must be an integer >= 1, got {self.history!r}")
        object.__setattr__(self, "history", int(self.history))

    def options(self) -> dict[str, object]:
        """The keyword arguments of :func:`solve_fixed_point` this object stands for."""
        return {**super().options(), "history": self.history}


@dataclass(frozen=True)
class Newton(FixedPoint):
    """Safeguarded Newton steps from a carried Jacobian (vector events, small ``D``).

    An i-ResNet block takes it only with a network that offers ``forward_with_jacobian``
    (such as :class:`~pyro_invres.nn.LipschitzMLP`) and carries no forward hooks (the
    carried-Jacobian pass bypasses ``Module.__call__``, so hooks would not run).

    Example:
        >>> Newton(max_iter=50).options()["method"]
        'newton'
    """

    method: ClassVar[str] = "newton"


@dataclass(frozen=True)
class Secant(FixedPoint):
    """Quasi-Newton steps from one secant model of the residual shared by the whole batch.

    The samples of a batch solve ``x_i = f_i(x_i)`` with maps that differ in their input
    (and context) but share one network, so their Jacobians are alike. Every evaluation
    gives each sample a secant pair ``(s_i, \\Delta r_i)`` of the residual
    ``r(x) = x - f(x)``; a ridge regression over all pairs so far (each normalised to
    ``||s_i|| = 1``, so every sample has one vote) fits one ``n x n`` matrix

    .. math::

        A = I + \\textstyle\\sum_i (\\Delta r_i - s_i) s_i^\\top
        \\bigl(\\sum_i s_i s_i^\\top + \\lambda\\, \\tfrac{\\mathrm{tr}}{n}\\, I\\bigr)^{-1}
        \\approx I - J_f ,

    (``lambda = ridge`` pulls unexplored directions towards the Banach step) and every
    sample steps ``x <- x - A^{-1} r(x)``: Newton's step with the batch's Jacobian, learnt
    for free from the iterations, at the cost of two ``(B, n) x (n, n)`` products. Each
    sample corrects ``A^{-1}`` along its own last step by one Broyden update, which
    matters where the samples' Jacobians differ (one context each). No
    Jacobian of ``f`` is needed, so it works with any network; the model is ``n x n`` for
    an event of ``n`` numbers, so it suits small events (at most :data:`SECANT_MAX_DIM`).

    The steps are safeguarded as Newton's are (a point whose step did not shrink by the
    contraction factor is replaced by the Banach step from the last accepted point), and
    the stopping rule is the same Banach bound, so the answer is as rigorous as the fixed
    point's. The first step, before any pair exists, is the Banach step.

    Attributes:
        ridge: ``lambda``, the pull of the model towards ``A = I`` (relative to the mean
            squared length of the normalised steps, 1).

    Example:
        >>> import torch
        >>> y = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
        >>> f = lambda x: y - 0.8 * torch.tanh(x @ torch.tensor([[1.0, 0.5], [-0.5, 1.0]],
        ...                                                       dtype=torch.float64))
        >>> _, banach = solve_fixed_point(f, y, contraction=0.9)
        >>> _, secant = solve_fixed_point(f, y, contraction=0.9, **Secant().options())
        >>> secant.converged, secant.iterations < banach.iterations
        (True, True)
    """

    method: ClassVar[str] = "secant"
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        ridge = _check_tolerance("ridge", self.ridge)
        object.__setattr__(self, "ridge", ridge)

    def options(self) -> dict[str, object]:
        """The keyword arguments of :func:`solve_fixed_point` this object stands for."""
        return {**super().options(), "ridge": self.ridge}


#: the largest event (numbers per sample) ``method="secant"`` takes: its model is n x n
SECANT_MAX_DIM = 256

_SOLVERS: dict[str, type[FixedPoint]] = {
    "fixed_point": FixedPoint,
    "anderson": Anderson,
    "newton": Newton,
    "secant": Secant,
}


def as_solver(solver: object) -> FixedPoint:
    """A solver object from an object or its string shorthand (a clear error otherwise)."""
    if isinstance(solver, FixedPoint):
        return solver
    if isinstance(solver, str) and solver in _SOLVERS:
        return _SOLVERS[solver]()
    raise ValueError(
        f"unknown solver {solver!r}; expected one of {SOLVER_METHODS} or a "
        "FixedPoint/Anderson/Newton object"
    )


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
    ridge: float = 1e-3,
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
        method: ``"fixed_point"`` (Banach iteration), ``"anderson"``, ``"newton"`` or
            ``"secant"`` (see :class:`Secant`).
        history: the number of past iterates Anderson mixes (at most the event size is
            used: beyond it the differences are linearly dependent).
        ridge: the pull of the ``"secant"`` model towards the Banach step (:class:`Secant`).
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
    atol, rtol = _check_tolerance("atol", atol), _check_tolerance("rtol", rtol)
    d_atol, d_rtol = default_tolerances(x0.dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    factor = _bound_factor(contraction)
    eps = torch.finfo(x0.dtype).eps
    event_ndim = min(event_dim, x0.dim())
    numel_event = max(1, math.prod(x0.shape[x0.dim() - event_ndim :]))
    batch_shape = x0.shape[: x0.dim() - event_ndim]
    stepper: _Stepper = _Stepper()
    if method == "anderson":
        stepper = _AndersonStepper(history, numel_event)
    elif method == "newton":
        if event_ndim != 1:
            raise ValueError(f"method='newton' takes one event dimension, got {event_dim}")
        stepper = _NewtonStepper(contraction)
    elif method == "secant":
        if numel_event > SECANT_MAX_DIM:
            raise ValueError(
                f"method='secant' fits an n x n model of the residual, for events of at most "
                f"{SECANT_MAX_DIM} numbers; this one has {numel_event}: use 'fixed_point' or "
                "'anderson'"
            )
        ridge = _check_tolerance("ridge", ridge)  # type: ignore[assignment]
        stepper = _SecantStepper(contraction, numel_event, float(ridge))

    def per_sample(t: Tensor) -> Tensor:  # (B,) -> broadcastable against x
        return t.reshape(batch_shape + (1,) * event_ndim)

    with torch.no_grad():
        x = x0.detach()
        if x.numel() == 0:
            return x, SolveInfo(0, 0.0, 0.0, True)
        n = max(1, math.prod(batch_shape))
        flags = torch.zeros(n, dtype=torch.bool, device=x.device)
        converged, stalled, failed = flags.clone(), flags.clone(), flags.clone()
        # per sample: the point returned and its bound, fixed once the sample settles
        result, res_error = x.clone(), torch.full_like(flags, math.inf, dtype=torch.float64)
        res_tol = torch.full_like(res_error, math.nan)
        # the point with the smallest step seen so far, returned by a sample that stalls
        # or runs out of iterations (its Banach bound is the best one on offer)
        best_step = torch.full_like(res_error, math.inf)
        best_fx, best_tol = x.clone(), res_tol.clone()
        since_best = torch.zeros(n, dtype=torch.long, device=x.device)
        it = 0
        while it < max_iter:
            it += 1
            if jacobian is not None:
                fx, jac = jacobian(x)
            else:
                fx, jac = f(x), None
            # Banach: ||f(x) - x*|| <= c / (1 - c) * ||f(x) - x||, for any point x, so the
            # bound stays rigorous at an accelerated (Anderson, Newton) point too.
            step = _sample_norm(fx - x, event_ndim).reshape(-1).double()
            size = _sample_norm(fx, event_ndim).reshape(-1).double()
            # a norm is inf or nan wherever fx is not finite (or overflows): only then is
            # the sample-by-sample check of fx needed (the usual iteration skips it)
            all_finite = bool(torch.isfinite(size).all())
            if not all_finite:
                finite = torch.isfinite(fx).reshape(n, -1).all(-1)
                step = torch.where(finite, step, math.inf)
                size = torch.where(finite, size, 0.0)
            error = factor * step
            tol = atol + rtol * size
            # rounding in f bounds how small a step can get, whatever the tolerance
            floor = 8 * eps * (size + math.sqrt(numel_event))
            accept = stepper.accept(x, fx, step)
            settled = converged | stalled
            # non-finite values at a point the solver had to take (the start or a Banach
            # step) have no fallback: the solve fails there
            if not all_finite:
                failed = ~settled & ~finite & accept
                if bool(failed.any()):
                    result = torch.where(per_sample(failed), fx, result)
                    res_error = torch.where(failed, math.inf, res_error)
                    res_tol = torch.where(failed, tol, res_tol)
                    break
            improved = step < best_step
            now_converged = ~settled & (error <= tol)
            if bool(improved.all()):
                # every sample's step shrank (the usual case): this point is the best one,
                # and no sample can be stalled; the selections below would copy fx whole
                best_step, best_fx, best_tol = step, fx, tol
                since_best = torch.zeros_like(since_best)
            else:
                best_step = torch.where(improved, step, best_step)
                best_fx = torch.where(per_sample(improved), fx, best_fx)
                best_tol = torch.where(improved, tol, best_tol)
                since_best = torch.where(improved, 0, since_best + 1)
                # at the floor the step no longer shrinks: more iterations cannot certify more
                stalled |= (
                    ~settled & ~now_converged & (best_step <= floor) & (since_best >= _PATIENCE)
                )
            if bool(now_converged.any()):
                result = torch.where(per_sample(now_converged), fx, result)
                res_error = torch.where(now_converged, error, res_error)
                res_tol = torch.where(now_converged, tol, res_tol)
                converged |= now_converged
            if bool((converged | stalled).all()):
                break
            x = stepper.propose(x, fx, jac, accept)
            if bool(converged.any()):
                x = torch.where(per_sample(converged), result, x)
        # a sample that stalled or ran out of iterations returns its best point, bound and all
        rest = ~converged & ~failed
        result = torch.where(per_sample(rest), best_fx, result)
        res_error = torch.where(rest, factor * best_step, res_error)
        res_tol = torch.where(rest, best_tol, res_tol)
        worst = int(torch.argmax(torch.nan_to_num(res_error - res_tol, nan=math.inf)))
        info = SolveInfo(
            it,
            float(res_error[worst]),
            float(res_tol[worst]),
            bool(converged.all()),
            bool((stalled & ~converged).any()),
        )
    if not info.converged:
        message = (
            f"{what} did not converge: error bound {info.error:.3g} > tolerance "
            f"{info.tolerance:.3g} after {info.iterations} iterations (max_iter={max_iter}); "
        )
        if bool(failed.any()):
            message += "f returned non-finite values; check the input and the network"
        elif info.stalled:
            message += (
                f"the step stopped shrinking at the rounding floor of {x0.dtype}, which the "
                f"bound amplifies by c/(1-c) = {factor:.3g}: loosen atol/rtol, compute in "
                f"{_wider_name(x0.dtype)}, or lower the Lipschitz coefficient"
            )
        else:
            message += "raise max_iter, loosen atol/rtol, or lower the Lipschitz coefficient"
        if strict:
            raise ConvergenceError(message)
        warnings.warn(message, ConvergenceWarning, stacklevel=3)
    return result, info


# iterations without a smaller step, at the rounding floor, before a sample counts as
# stalled: rounding makes the step there fluctuate rather than shrink
_PATIENCE = 3


class _Stepper:
    """The Banach step ``x <- f(x)``; every point is accepted."""

    def accept(self, x: Tensor, fx: Tensor, step: Tensor) -> Tensor:
        return torch.ones_like(step, dtype=torch.bool)

    def propose(self, x: Tensor, fx: Tensor, jac: Tensor | None, accept: Tensor) -> Tensor:
        return fx


class _SafeguardedStepper(_Stepper):
    """An accelerated step per sample, safeguarded by the Banach step.

    A sample's point is accepted when its step ``||f(x) - x||`` (infinite where ``f`` is
    not finite) is at most ``rate`` times the step at its last accepted point; a rejected
    sample goes back to the Banach step ``f`` of its last accepted point, which is
    accepted unconditionally (for a contraction its step shrinks by ``Lip(f)``), so a bad
    accelerated point (a near-singular linear system, an overshoot) costs one evaluation
    and never the solve.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.ref_step: Tensor | None = None  # step at the last accepted point
        self.ref_x: Tensor | None = None  # the last accepted point
        self.ref_fx: Tensor | None = None  # f there
        self.fallback: Tensor | None = None  # samples now at a Banach fallback point

    def accept(self, x: Tensor, fx: Tensor, step: Tensor) -> Tensor:
        if self.ref_step is None or self.ref_x is None or self.ref_fx is None:
            accept = torch.ones_like(step, dtype=torch.bool)
            self.ref_step, self.ref_x, self.ref_fx = step, x, fx
        else:
            accept = (step <= self.rate * self.ref_step) | self.fallback  # type: ignore[operator]
            self.ref_step = torch.where(accept, step, self.ref_step)
            self.ref_x = _where_sample(accept, x, self.ref_x)
            self.ref_fx = _where_sample(accept, fx, self.ref_fx)
        self.fallback = ~accept
        return accept

    def fall_back(self, proposal: Tensor, accept: Tensor) -> Tensor:
        """``proposal`` where accepted, else the Banach step from the last accepted point."""
        return _where_sample(accept, proposal, self.ref_fx)  # type: ignore[arg-type]


def _where_sample(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a`` for the samples in ``mask`` (flat over the batch), else ``b``."""
    flat = torch.where(mask[:, None], a.reshape(mask.shape[0], -1), b.reshape(mask.shape[0], -1))
    return flat.reshape(a.shape)


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the half precisions (torch's LU has no kernels for them), else ``dtype``."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def _guarded_solve(system: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """Solve ``(B, k, k) @ (B, k, 1)`` per sample without raising: ``(solution, ok)``.

    A sample whose system is singular or not finite gets ``ok = False`` (and a zero
    solution) instead of an exception for the whole batch.
    """
    usable = torch.isfinite(system).flatten(1).all(-1) & torch.isfinite(rhs).flatten(1).all(-1)
    # nothing non-finite may enter the factorisation: a harmless system stands in
    eye = torch.eye(system.shape[-1], dtype=system.dtype, device=system.device)
    system = torch.where(usable[:, None, None], system, eye)
    rhs = torch.where(usable[:, None, None], rhs, 0.0)
    solution, status = torch.linalg.solve_ex(system, rhs)
    ok = usable & (status == 0) & torch.isfinite(solution).flatten(1).all(-1)
    return torch.where(ok[:, None, None], solution, 0.0), ok


class _NewtonStepper(_SafeguardedStepper):
    """Safeguarded Newton steps for ``x = f(x)``, one event dimension, per sample.

    ``(I - J_f)`` is invertible when ``Lip(f) < 1``, but rounding (or a network whose
    bound is loose) can make it singular: the solve reports that instead of raising, and
    such a sample takes the Banach step.
    """

    def __init__(self, contraction: float | None) -> None:
        super().__init__(1.0 if contraction is None else float(contraction))

    def propose(self, x: Tensor, fx: Tensor, jac: Tensor | None, accept: Tensor) -> Tensor:
        assert jac is not None
        n, d, wide = accept.shape[0], x.shape[-1], _wide_dtype(x.dtype)
        eye = torch.eye(d, dtype=wide, device=x.device)
        system = (eye - jac.to(wide)).reshape(n, d, d)
        delta, good = _guarded_solve(system, (x - fx).to(wide).reshape(n, d, 1))
        x_new = (x - delta.reshape(x.shape)).to(x.dtype)
        good &= torch.isfinite(x_new).reshape(n, -1).all(-1)
        return self.fall_back(_where_sample(good, x_new, fx), accept)


class _AndersonStepper(_SafeguardedStepper):
    """Type-II Anderson mixing (Walker & Ni 2011) with per-sample coefficients.

    The coefficients solve the regularised normal equations of the least-squares problem
    ``min ||G_k - dG gamma||``,

    .. math::

        (dG^\\top dG + \\lambda I)\\,\\gamma = dG^\\top G_k, \\qquad
        \\lambda = 100\\,\\varepsilon \\max_i \\|dG_i\\|^2 ,

    a Tikhonov term above the dtype's rounding of the Gram matrix (a term below it, as
    1e-8 is in float32, is lost and a nearly linear ``f`` or repeated iterates make the
    system singular). The solve reports failure instead of raising; a sample whose
    system failed, or whose mixed point is not finite, takes the Banach step, and a mixed
    point whose step grew is rejected by the safeguard (rate 1: the residual must not
    grow).
    """

    def __init__(self, history: int, numel_event: int) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        super().__init__(1.0)
        # more differences than dimensions only makes the least-squares problem singular
        # (2-D, c = 0.9: history 5 takes 12-13 evaluations to 1e-6, history 2 takes 8)
        self.m = min(history, numel_event)
        self.n = numel_event
        self.xs: list[Tensor] = []
        self.gs: list[Tensor] = []

    def propose(self, x: Tensor, fx: Tensor, jac: Tensor | None, accept: Tensor) -> Tensor:
        # a rejected sample contributes its last accepted point again (a zero difference,
        # which the regularisation absorbs) so that nothing non-finite enters the history
        ref_x, ref_fx = self.ref_x, self.ref_fx
        assert ref_x is not None and ref_fx is not None
        self.xs.append(ref_x.reshape(-1, self.n))
        self.gs.append((ref_fx - ref_x).reshape(-1, self.n))
        if len(self.xs) > self.m + 1:
            self.xs.pop(0)
            self.gs.pop(0)
        if len(self.xs) < 2:
            return self.fall_back(fx, accept)
        wide = _wide_dtype(x.dtype)  # a half-precision Gram matrix overflows and rounds away
        G = torch.stack(self.gs, dim=-1).to(wide)  # (B, n, k): residuals f(x_i) - x_i
        X = torch.stack(self.xs, dim=-1).to(wide)
        dG = G[..., 1:] - G[..., :-1]
        dX = X[..., 1:] - X[..., :-1]
        A = dG.transpose(-1, -2) @ dG
        scale = A.diagonal(dim1=-2, dim2=-1).amax(-1)
        scale = torch.where(scale > 0, scale, 1.0)  # no two entries differ: gamma = 0
        eye = torch.eye(A.shape[-1], dtype=wide, device=A.device)
        reg = max(1e-8, 100 * torch.finfo(wide).eps)
        system = A + (reg * scale)[..., None, None] * eye
        gamma, good = _guarded_solve(system, dG.transpose(-1, -2) @ G[..., -1:])
        x_new = (X[..., -1:] + G[..., -1:] - (dX + dG) @ gamma).squeeze(-1)
        x_new = x_new.reshape(x.shape).to(x.dtype)
        good &= torch.isfinite(x_new).reshape(-1, self.n).all(-1)
        return self.fall_back(_where_sample(good, x_new, ref_fx), accept)


class _SecantStepper(_SafeguardedStepper):
    """Steps ``x <- x - H_i r(x)``: the batch's secant model, corrected by each sample.

    ``A`` is refitted after every evaluation from the running sums of the normalised pairs
    (see :class:`Secant`), taken on a fixed, evenly spaced subset of at most
    ``max(1024, 16 n)`` samples: the model is a mean over the batch, and a few thousand
    pairs pin down its ``n^2`` entries, so that for large batches learning costs a small
    fraction of the step itself. Pairs whose step is within the rounding of the iterate
    carry noise rather than slope and are left out.

    Each sample then corrects ``A^{-1}`` by one Broyden update with its own last pair,
    ``H_i = A^{-1} + (s - A^{-1} \\Delta r)\\, s^\\top A^{-1} / (s^\\top A^{-1} \\Delta r)``
    (exact along the direction it just travelled: a batch whose samples' Jacobians differ,
    one context each, converges in about half the evaluations the shared model alone
    takes at ``D = 2``; where they agree it changes little), skipped where the
    denominator is too small to trust. A model that cannot be inverted leaves the Banach
    step in place; the safeguard (rate: the contraction factor) rejects a step that did
    worse than a Banach step would have.
    """

    def __init__(self, contraction: float | None, numel_event: int, ridge: float) -> None:
        super().__init__(1.0 if contraction is None else float(contraction))
        self.n = numel_event
        self.ridge = ridge
        self.rows: Tensor | None = None  # the samples the model learns from
        self.ss: Tensor | None = None  # sum of s s^T over the pairs
        self.ds: Tensor | None = None  # sum of (dr - s) s^T
        self.prev: tuple[Tensor, Tensor] | None = None  # the last evaluated (x, r), flat
        self.step_map: Tensor | None = None  # A^{-T}: x <- x - r @ step_map

    def _learn(self, x: Tensor, s: Tensor, dr: Tensor) -> None:
        if self.rows is None:
            batch, keep = x.shape[0], max(1024, 16 * self.n)
            self.rows = torch.arange(batch, device=x.device)
            if batch > keep:
                self.rows = torch.linspace(0, batch - 1, keep, device=x.device).round().long()
        if len(self.rows) < x.shape[0]:
            x, s, dr = x[self.rows], s[self.rows], dr[self.rows]
        size = s.norm(dim=-1, keepdim=True)
        noise = 64 * torch.finfo(x.dtype).eps * (x.norm(dim=-1, keepdim=True) + 1.0)
        # a row sum is not finite wherever dr is not (or overflows: then left out too)
        usable = (size > noise) & torch.isfinite(dr.sum(-1, keepdim=True))
        weight = torch.where(usable, 1.0 / size.clamp_min(torch.finfo(s.dtype).tiny), 0.0)
        s, dr = s * weight, torch.where(usable, dr * weight, 0.0)
        ss, ds = s.T @ s, (dr - s).T @ s
        self.ss = ss if self.ss is None else self.ss + ss
        self.ds = ds if self.ds is None else self.ds + ds
        if bool(usable.any()):
            self.step_map = self._fit()

    def _fit(self) -> Tensor | None:
        assert self.ss is not None and self.ds is not None
        eye = torch.eye(self.n, dtype=self.ss.dtype, device=self.ss.device)
        scale = self.ss.diagonal().sum() / self.n
        gram = self.ss + self.ridge * scale * eye
        # J ~ ds gram^{-1}, then A = I + J, and the step map is A^{-T} (rows are samples)
        jac_t, info = torch.linalg.solve_ex(gram, self.ds.T)  # gram symmetric: (ds gram^-1)^T
        step_map, info2 = torch.linalg.inv_ex(eye + jac_t)
        if int(info) or int(info2) or not bool(torch.isfinite(step_map).all()):
            return None
        return step_map

    def _own_pair(self, d: Tensor, s: Tensor, dr: Tensor) -> Tensor:
        """``d = A^{-1} r`` corrected by each sample's Broyden update (rows as samples)."""
        assert self.step_map is not None
        h_dr = dr @ self.step_map
        den = (s * h_dr).sum(-1, keepdim=True)
        trust = den.abs() > 1e-6 * s.norm(dim=-1, keepdim=True) * h_dr.norm(dim=-1, keepdim=True)
        trust &= torch.isfinite(den)  # frozen samples (s = 0) and non-finite pairs: none
        coef = torch.where(trust, (s * d).sum(-1, keepdim=True) / torch.where(trust, den, 1.0), 0.0)
        return d + torch.where(trust, (s - h_dr) * coef, 0.0)

    def propose(self, x: Tensor, fx: Tensor, jac: Tensor | None, accept: Tensor) -> Tensor:
        wide = _wide_dtype(x.dtype)
        flat_x = x.reshape(-1, self.n).to(wide)
        flat_r = flat_x - fx.reshape(-1, self.n).to(wide)
        pair = None
        if self.prev is not None:
            pair = (flat_x - self.prev[0], flat_r - self.prev[1])
            self._learn(flat_x, *pair)
        self.prev = (flat_x, flat_r)
        if self.step_map is None:
            return self.fall_back(fx, accept)
        d = flat_r @ self.step_map
        if pair is not None:
            d = self._own_pair(d, *pair)
        x_new = (flat_x - d).reshape(x.shape).to(x.dtype)
        good = torch.isfinite(x_new.reshape(accept.shape[0], -1).sum(-1))
        if not bool(good.all()):
            x_new = _where_sample(good, x_new, fx)
        return self.fall_back(x_new, accept)
