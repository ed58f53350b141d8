"""Exact gradients through the inverse of ``y = x + g(x)`` by implicit differentiation.

The solve itself runs without a graph. One more step, ``x = y - g(x*)``, is taken with
the graph on (it connects ``x`` to ``y`` and to the parameters of ``g``), and a hook on
``x`` replaces the upstream gradient ``v`` by the solution ``a`` of the adjoint equation

.. math::

    (I + J_g(x^\\star))^\\top a = v \\iff a = v - J_g(x^\\star)^\\top a ,

itself a contraction solved by the same fixed-point rule (or, when the solve is Newton's and
so has the Jacobian, by one direct linear solve). Then ``dL/dy = a`` and
``dL/dtheta = -a^T dg/dtheta`` are exact, whatever number of iterations the forward solve
used, with memory independent of it (no back-propagation through the iterations).

Anything that differentiates *with respect to* ``x`` (a log-det at ``x``) must work on a
copy of ``x``, or the hook would also transform that inner gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from .fixed_point import SolveInfo, solve_fixed_point

__all__ = ["residual_inverse"]


def residual_inverse(
    g: Callable[[Tensor], Tensor],
    y: Tensor,
    *,
    x0: Tensor | None = None,
    event_dim: int = 1,
    contraction: float | None = None,
    solve_context: Callable[[], AbstractContextManager] = nullcontext,
    jacobian: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    **solver_kwargs: object,
) -> tuple[Tensor, SolveInfo]:
    """Solve ``x + g(x) = y`` for ``x``, differentiably in ``y`` and in ``g``'s parameters.

    Arguments:
        g: the residual branch, ``Lip(g) < 1``.
        y: the point to invert, ``batch_shape + event_shape``.
        x0: a starting point (default ``y``).
        event_dim: number of trailing event dimensions.
        contraction: a bound on ``Lip(g)`` for the error bound.
        solve_context: a context entered around the graph-free solves only, e.g.
            :func:`torch.nn.utils.parametrize.cached` so that normalised weights are
            computed once per solve rather than once per iteration.
        jacobian: ``x -> (g(x), J_g(x))`` (one event dimension), needed by
            ``method="newton"``; the adjoint is then one linear solve with
            ``(I + J_g(x*))^T``.
        **solver_kwargs: passed to :func:`~pyro_invres.ops.solve_fixed_point`
            (``atol``, ``rtol``, ``max_iter``, ``method``, ``strict``, ``what``).

    Returns:
        ``(x, info)``.

    Example:
        >>> import torch
        >>> y = torch.tensor([[0.3, -1.0]], dtype=torch.float64, requires_grad=True)
        >>> g = lambda x: 0.5 * torch.sin(x)
        >>> x, info = residual_inverse(g, y, contraction=0.5)
        >>> torch.autograd.gradcheck(lambda y: residual_inverse(g, y, contraction=0.5)[0], y)
        True
    """
    start = y if x0 is None else x0
    newton = solver_kwargs.get("method") == "newton"
    if newton and jacobian is None:
        raise ValueError("method='newton' needs jacobian=(x -> (g(x), J_g(x)))")

    def f_and_jacobian(x: Tensor) -> tuple[Tensor, Tensor]:
        gx, jac = jacobian(x)  # type: ignore[misc]
        return y - gx, -jac

    with torch.no_grad(), solve_context():
        x_star, info = solve_fixed_point(
            lambda x: y - g(x),
            start,
            event_dim=event_dim,
            contraction=contraction,
            jacobian=f_and_jacobian if newton else None,
            **solver_kwargs,  # type: ignore[arg-type]
        )
    if not torch.is_grad_enabled():
        return x_star, info
    x = y - g(x_star)
    if not x.requires_grad:
        return x.detach(), info
    adjoint_kwargs = dict(solver_kwargs)
    adjoint_kwargs["what"] = "adjoint solve (gradient of the iterative inverse)"

    def adjoint(v: Tensor | None) -> Tensor | None:
        if v is None:  # an undefined gradient stays undefined
            return None
        if newton:
            with torch.no_grad():
                jac = jacobian(x_star)[1]  # type: ignore[misc]
                eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
                a = torch.linalg.solve((eye + jac).transpose(-1, -2), v.unsqueeze(-1))
            return a.squeeze(-1)
        with torch.enable_grad():
            xs = x_star.detach().requires_grad_(True)
            gs = g(xs)

        def jt(a: Tensor) -> Tensor:
            (out,) = torch.autograd.grad(gs, xs, a, retain_graph=True)
            return out

        a, _ = solve_fixed_point(
            lambda a: v - jt(a),
            v,
            event_dim=event_dim,
            contraction=contraction,
            **adjoint_kwargs,  # type: ignore[arg-type]
        )
        return a

    x.register_hook(adjoint)
    return x, info
