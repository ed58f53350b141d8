"""Broyden's method for a batch of small root problems sharing one starting inverse Jacobian.

Solve ``f(z) = t`` row by row (every leading index of ``t`` is its own ``D``-dimensional
problem) with the "good" Broyden update of an approximate inverse Jacobian ``H``:

.. math::

    z_{k+1} = z_k - H_k F_k, \\qquad F_k = f(z_k) - t, \\qquad
    s_k = z_{k+1} - z_k, \\quad y_k = F_{k+1} - F_k,

    H_{k+1} = H_k + \\frac{(s_k - H_k y_k)\\, s_k^\\top H_k}{s_k^\\top H_k y_k}.

Every row starts from the same ``H_0 = M`` (a ``D x D`` matrix the caller supplies, e.g.
the inverse of the batch's average Jacobian). With full steps the update factors as
``H_{k+1} = (I + s_{k+1} s_k^\\top / \\|s_k\\|^2) H_k`` (Kelley, 1995), so each row's
steps are its whole memory and a step costs one evaluation of ``f``, one ``D x D`` product
and ``k`` dot products per row: no per-row ``D x D`` Jacobian is ever formed or factorised.
Near the root the convergence is superlinear (Broyden, 1965; Dennis & Moré, 1977); the
better ``M`` matches the rows' Jacobians, the fewer steps.

The stopping rule is the caller's: a row is done when ``|F| <= tol`` in every entry, and
done rows stop moving (a converged row taking noise-sized steps could corrupt its update).
Rows that are not done after ``max_iter`` steps are reported, never hidden: the caller
decides what to do with them (the residual blocks hand them to Newton's method).

References:
    [1] Broyden, *A Class of Methods for Solving Nonlinear Simultaneous Equations*,
        Math. Comp. 19(92), 1965.
    [2] Kelley, *Iterative Methods for Linear and Nonlinear Equations*, SIAM 1995, sec. 7.3
        (the limited-memory form stored as steps).
    [3] Nocedal & Wright, *Numerical Optimization*, 2nd ed., Springer 2006, sec. 11.1
        (Broyden's method, the inverse update by Sherman-Morrison).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["broyden_solve"]


def broyden_solve(
    fn: Callable[[Tensor], Tensor],
    target: Tensor,
    start: Tensor,
    inverse_jacobian: Tensor,
    tol: Tensor,
    max_iter: int,
) -> tuple[Tensor, Tensor, int]:
    """Rows of ``fn(z) = target`` by Broyden's good method from a shared ``H_0``.

    Arguments:
        fn: ``z (..., D) -> f(z) (..., D)``, row by row.
        target: ``t``, shape ``(..., D)``.
        start: ``z_0``, the shape of ``target``.
        inverse_jacobian: ``H_0``, a ``(D, D)`` approximation of ``J_f^{-1}`` for every row.
        tol: the per-entry tolerance on ``|f(z) - t|``, broadcastable to ``target``.
        max_iter: steps at most (each one evaluation of ``fn``).

    Returns:
        ``(z, done, evaluations)``: the last iterate (finite: a row whose update overflowed is
        returned at ``start``), a boolean ``(...)`` mask of the rows within ``tol``, and the
        number of evaluations of ``fn`` made (the start's included).

    Example:
        >>> a = torch.tensor([[2.0, 0.3], [0.1, 1.5]], dtype=torch.float64)
        >>> f = lambda z: z @ a.T + 0.1 * torch.sin(z)
        >>> t = torch.randn(5, 2, dtype=torch.float64)
        >>> z, done, n = broyden_solve(f, t, t, torch.linalg.inv(a), torch.tensor(1e-12), 30)
        >>> bool(done.all()), bool(torch.allclose(f(z), t, atol=1e-12))
        (True, True)
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    h0_t = inverse_jacobian.mT  # rows times H_0^T is H_0 applied to each row
    tiny = torch.finfo(target.dtype).tiny
    z = start
    residual = fn(z) - target
    evaluations = 1
    done = (residual.abs() <= tol).all(-1, keepdim=True)
    # with full steps, H_{k+1} = (I + s_{k+1} s_k^T / |s_k|^2) H_k: the steps are the whole
    # memory, and H_k F costs one D x D product plus k dot products per row
    steps: list[Tensor] = []
    norms: list[Tensor] = []
    step = (-(residual @ h0_t)).masked_fill(done, 0.0)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        z = z + step
        residual = fn(z) - target
        evaluations += 1
        done = (residual.abs() <= tol).all(-1, keepdim=True)
        steps.append(step)
        norms.append((step * step).sum(-1, keepdim=True).clamp_min(tiny))
        direction = -(residual @ h0_t)  # -H_0 F, then the factors in order
        for j in range(len(steps) - 1):
            coef = (steps[j] * direction).sum(-1, keepdim=True) / norms[j]
            direction = torch.addcmul(direction, steps[j + 1], coef)
        scale = 1 - (step * direction).sum(-1, keepdim=True) / norms[-1]
        # a breakdown (scale ~ 0) keeps the unscaled direction: slower, never wrong, as the
        # stopping rule alone decides
        usable = (scale.abs() > 1e-6) & torch.isfinite(scale)
        step = torch.where(usable, direction / torch.where(usable, scale, 1.0), direction)
        step = step.masked_fill(done, 0.0)
    done = done.squeeze(-1)
    finite = torch.isfinite(z).all(-1)
    if not bool(finite.all()):
        z = torch.where(finite.unsqueeze(-1), z, start)
        done = done & finite
    return z, done, evaluations
