"""Exact gradients through the inverse of ``y = x + g(x)`` by implicit differentiation.

The solve itself runs without a graph and gives ``x*``. Its first derivatives come from
the adjoint equation

.. math::

    (I + J_g(x^\\star))^\\top a = v \\iff a = v - J_g(x^\\star)^\\top a ,

itself a contraction solved by the same fixed-point rule (or, when the solve is Newton's and
so has the Jacobian, by one direct linear solve). Then ``dL/dy = a`` and
``dL/dtheta = -a^T dg/dtheta(x*)`` are exact, whatever number of iterations the forward
solve used, with memory independent of it (no back-propagation through the iterations).
The parameter term flows through ``g(x*)`` evaluated once with the graph on, so every
tensor ``g`` depends on gets its gradient.

**Second derivatives** (``create_graph=True``: Hessians, Laplace approximations, gradient
penalties) are exact too. When the backward is asked for a graph, the adjoint is rebuilt
differentiably from the graph-free ``a`` and the differentiable solution ``x``:

.. math::

    a = (I + J^\\top)^{-1} r, \\qquad r = v - J_g(x)^\\top a ,

where ``r`` carries the graph, so that ``dr = dv - dJ^\\top a`` is the differential of the
adjoint equation's right side, and ``(I + J^\\top)^{-1}`` is a linear node whose own
backward solves ``(I + J) b = w``. The parameter term was taken at a graph-free ``x*``;
the derivative it lacks, ``-d/dx [a^T dg/dtheta] dx``, is added by a correction that is
zero in value,

.. math::

    c_\\theta = -\\frac{\\partial}{\\partial\\theta}
    \\big[(J_g(x^\\star)^\\top a)^\\top \\Delta\\big], \\qquad
    \\Delta = x - \\mathrm{stop}(x) = 0 ,

for the tensors ``g`` declares (a module's parameters and tensor attributes, or
``params=``); a second derivative that would need an undeclared tensor raises an error.
Third and higher derivatives raise an error too, never a wrong number; so do
:mod:`torch.func` transforms (``vmap``, ``jacrev``), which cannot run a solve that stops
on data-dependent tests (use :func:`torch.autograd.functional.jacobian`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from .fixed_point import SolveInfo, solve_fixed_point

__all__ = ["residual_inverse"]

_THIRD_ORDER = (
    "third and higher derivatives through the iterative side of an invertible residual "
    "block are not supported (first and second derivatives are exact): the second "
    "backward pass was asked for a graph (create_graph=True); compute it without one"
)


def _dense_solve(m: Tensor, v: Tensor) -> Tensor:
    """``m^{-1} v`` per sample; a singular ``m = I + J_g`` is an error, never a NaN gradient.

    ``I + J_g`` has singular values in ``[1 - c, 1 + c]`` while ``Lip(g) <= c < 1``, so a
    failed factorisation means the bound itself was broken (weights written by hand).
    """
    out, info = torch.linalg.solve_ex(m, v.unsqueeze(-1).to(m.dtype))
    if bool((info != 0).any()) or not bool(torch.isfinite(out).all()):
        raise FloatingPointError(
            "gradient of the iterative inverse: I + J_g is singular or the solve overflowed "
            f"for {int((info != 0).sum())} sample(s), so Lip(g) < 1 does not hold there; "
            "check the block's Lipschitz coefficient and any weights set by hand"
        )
    return out.squeeze(-1).to(v.dtype)


def _functorch_active() -> bool:
    """Whether a :mod:`torch.func` transform (vmap, grad, jacrev, ...) is running."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is not None and level() is not None


def _functorch_data(x: Tensor) -> Tensor:
    """The plain tensor under any :mod:`torch.func` wrappers (all of a vmapped batch).

    A data-dependent test (``bool(...)``) on a batched tensor fails inside ``vmap``; on
    the unwrapped data it checks every sample at once.
    """
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    while wrapped is not None and wrapped(x):
        x = torch._C._functorch.get_unwrapped(x)
    return x


def _refuse_functorch(what: str, grad: Tensor | None = None) -> None:
    """Raise a clear error inside a :mod:`torch.func` transform (vmap, grad, jacrev, ...).

    ``grad``: an incoming gradient, batched when autograd vectorises a backward pass
    (``is_grads_batched``, ``torch.autograd.functional.jacobian(vectorize=True)``).
    """
    legacy = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    batched = grad is not None and legacy is not None and bool(legacy(grad))
    if not (batched or _functorch_active()):
        return
    raise RuntimeError(
        f"{what}: torch.func transforms (vmap, grad, jacrev, jacfwd, hessian) and vectorised "
        "backward passes cannot run an iterative inverse, which stops on data-dependent "
        "convergence tests and is differentiated through a custom adjoint. Use "
        "torch.autograd.functional.jacobian or torch.autograd.functional.hessian with "
        "vectorize=False, or build the block with the other explicit= direction so that "
        "this side is the explicit one."
    )


def _will_run(node: object) -> bool:
    """Whether the running backward pass will execute ``node`` (``True`` when unsure)."""
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError, TypeError):
        return True


def _declared(g: Callable[[Tensor], Tensor], params: Sequence[Tensor] | None) -> list[Tensor]:
    """The tensors ``g`` depends on that may need gradients (see ``params=``)."""
    if params is not None:
        found = list(params)
        for t in found:
            if not isinstance(t, Tensor):
                raise TypeError(f"params must hold tensors, got {type(t).__name__}")
    elif isinstance(g, nn.Module):
        found = list(g.parameters())
        # tensors a module keeps as plain attributes (a conditioned block's context)
        for module in g.modules():
            found.extend(v for v in vars(module).values() if isinstance(v, Tensor))
    else:
        found = []
    out: list[Tensor] = []
    for t in found:
        if t.requires_grad and not any(t is seen for seen in out):
            out.append(t)
    return out


class _Linearisation:
    """``y = x + g(x)`` linearised at the solution: solves with ``(I + J_g)`` and its transpose."""

    def __init__(
        self,
        g: Callable[[Tensor], Tensor],
        jacobian: Callable[[Tensor], tuple[Tensor, Tensor]] | None,
        event_dim: int,
        contraction: float | None,
        solver_kwargs: dict,
        residual_node: object,
    ) -> None:
        self.g = g
        self.jacobian = jacobian
        self.event_dim = event_dim
        self.contraction = contraction
        self.solver_kwargs = solver_kwargs
        self.what = str(solver_kwargs.get("what", "iterative inverse"))
        self.residual_node = residual_node  # grad_fn of g(x*) built in the forward pass

    def _dense(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            jac = self.jacobian(x)[1]  # type: ignore[misc]
        if torch.finfo(jac.dtype).bits < 32:  # torch has no float16/bfloat16 LU
            jac = jac.float()
        return jac + torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)

    def _solve(self, f: Callable[[Tensor], Tensor], v: Tensor, what: str) -> Tensor:
        kwargs = dict(self.solver_kwargs)
        kwargs["what"] = what
        out, _ = solve_fixed_point(
            f, v, event_dim=self.event_dim, contraction=self.contraction, **kwargs
        )
        return out

    def transpose_solve(self, x: Tensor, v: Tensor) -> Tensor:
        """``a`` with ``(I + J_g(x))^T a = v``, without a graph."""
        if self.jacobian is not None:
            m = self._dense(x).transpose(-1, -2)
            return _dense_solve(m, v)
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            gs = self.g(xs)

        def jt(a: Tensor) -> Tensor:  # a -> J^T a
            (out,) = torch.autograd.grad(gs, xs, a, retain_graph=True, allow_unused=True)
            return torch.zeros_like(a) if out is None else out

        what = f"adjoint solve (gradient of the {self.what})"
        return self._solve(lambda a: v - jt(a), v, what)

    def solve(self, x: Tensor, w: Tensor) -> Tensor:
        """``b`` with ``(I + J_g(x)) b = w``, without a graph (the adjoint's own adjoint)."""
        if self.jacobian is not None:
            m = self._dense(x)
            return _dense_solve(m, w)
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            gs = self.g(xs)
            # J b by differentiating the linear map u -> J^T u (two reverse passes)
            u = torch.zeros_like(gs, requires_grad=True)
            (jtu,) = torch.autograd.grad(gs, xs, u, create_graph=True, allow_unused=True)
        if jtu is None or not jtu.requires_grad:
            return w

        def jv(b: Tensor) -> Tensor:  # b -> J b
            (out,) = torch.autograd.grad(jtu, u, b, retain_graph=True, allow_unused=True)
            return torch.zeros_like(b) if out is None else out

        what = f"second-order adjoint solve (Hessian through the {self.what})"
        return self._solve(lambda b: w - jv(b), w, what)

    def check_declared(self, declared: Sequence[Tensor]) -> None:
        """Raise if ``g(x*)`` depends on a tensor needing grad that ``g`` does not declare."""
        leaves = {id(t) for t in declared if t.grad_fn is None}
        stops = {t.grad_fn for t in declared if t.grad_fn is not None}
        stack, seen = [self.residual_node], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen or node in stops:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None:  # a leaf's AccumulateGrad
                if id(variable) not in leaves:
                    raise RuntimeError(
                        f"{self.what}: second derivatives (create_graph=True) need every tensor "
                        "the residual branch depends on to be declared, and it depends on a "
                        f"tensor of shape {tuple(variable.shape)} that is not among its module "
                        "parameters or tensor attributes; pass params=[...] to residual_inverse"
                    )
                continue
            stack.extend(fn for fn, _ in node.next_functions)

    def corrections(
        self, x: Tensor, declared: Sequence[Tensor], needed: Sequence[bool], a: Tensor
    ) -> list[Tensor | None]:
        """``-d/dtheta [(J_g(x*)^T a) . Delta]`` with ``Delta = x - stop(x)`` (zero in value)."""
        out: list[Tensor | None] = [None] * len(declared)
        wanted = [t for t, need in zip(declared, needed) if need]
        if not wanted:
            return out
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            (jta,) = torch.autograd.grad(self.g(xs), xs, a, create_graph=True, allow_unused=True)
            if jta is None or not jta.requires_grad:
                return out
            # Delta is a seed of this grad, never a path of it: the pass does not run back
            # through x (the solution's own node) and the result is linear in Delta
            delta = _FirstOrderOnly.apply(x) - x.detach()
            grads = torch.autograd.grad(jta, wanted, delta, create_graph=True, allow_unused=True)
        it = iter(grads)
        for i, need in enumerate(needed):
            if need:
                c = next(it)
                out[i] = None if c is None else -c
        return out


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward refuses to build a graph (the third-derivative guard)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        if torch.is_grad_enabled():
            raise RuntimeError(_THIRD_ORDER)
        return grad


class _AdjointMap(torch.autograd.Function):
    """``r -> (I + J^T)^{-1} r`` at a fixed ``J``; its value is the graph-free adjoint ``a``."""

    @staticmethod
    def forward(ctx, lin: _Linearisation, x: Tensor, a: Tensor, r: Tensor) -> Tensor:  # noqa: ANN001
        ctx.lin = lin
        ctx.save_for_backward(x)
        return a.clone()

    @staticmethod
    def backward(ctx, w: Tensor) -> tuple:  # noqa: ANN001
        lin: _Linearisation = ctx.lin
        if torch.is_grad_enabled():
            raise RuntimeError(f"{lin.what}: {_THIRD_ORDER}")
        _refuse_functorch(f"{lin.what} (second derivative)", w)
        (x,) = ctx.saved_tensors
        return None, None, None, lin.solve(x, w)


class _Solution(torch.autograd.Function):
    """The solution ``x*`` of ``x + g(x) = y``, differentiable in ``y`` and ``g``.

    Inputs: ``y``, ``g(x*)`` built with the graph (the route of every first derivative
    in ``g``'s tensors) and the tensors ``g`` declares (the route of the correction that
    makes second derivatives in them exact).
    """

    @staticmethod
    def forward(  # noqa: ANN205
        ctx,  # noqa: ANN001
        lin: _Linearisation,
        x_star: Tensor,
        y: Tensor,
        gx: Tensor,
        *declared: Tensor,
    ):
        ctx.lin = lin
        x = x_star.clone()
        ctx.save_for_backward(x, *declared)
        return x

    @staticmethod
    def backward(ctx, v: Tensor) -> tuple:  # noqa: ANN001
        lin: _Linearisation = ctx.lin
        _refuse_functorch(f"{lin.what} (backward)", v)
        x, *declared = ctx.saved_tensors
        want_y, want_g = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        if not torch.is_grad_enabled():
            a = lin.transpose_solve(x.detach(), v)
            return (None, None, a if want_y else None, -a if want_g else None) + (None,) * len(
                declared
            )
        # create_graph: the adjoint as a differentiable function of v, x and g's tensors
        edges = ctx.next_functions  # one per tensor input: x_star, y, g(x*), *declared
        if want_g and _will_run(edges[2][0]):
            lin.check_declared(declared)
        a = lin.transpose_solve(x.detach(), v.detach())
        with torch.enable_grad():
            (jta,) = torch.autograd.grad(lin.g(x), x, a, create_graph=True, allow_unused=True)
            r = v if jta is None else v - jta
            a_graph = _AdjointMap.apply(lin, x.detach(), a, r)
        needed = [
            bool(ctx.needs_input_grad[4 + i]) and _will_run(edges[3 + i][0])
            for i in range(len(declared))
        ]
        fixes = lin.corrections(x, declared, needed, a)
        return (
            None,
            None,
            a_graph if want_y else None,
            -a_graph if want_g else None,
            *fixes,
        )


def residual_inverse(
    g: Callable[[Tensor], Tensor],
    y: Tensor,
    *,
    x0: Tensor | None = None,
    event_dim: int = 1,
    contraction: float | None = None,
    solve_context: Callable[[], AbstractContextManager] = nullcontext,
    jacobian: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    params: Sequence[Tensor] | None = None,
    **solver_kwargs: object,
) -> tuple[Tensor, SolveInfo]:
    """Solve ``x + g(x) = y`` for ``x``, differentiably in ``y`` and in ``g``'s parameters.

    First and second derivatives are exact (see the module docstring); third and higher
    derivatives, and :mod:`torch.func` transforms, raise an error.

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
        params: the tensors ``g`` depends on, for exact second derivatives in them
            (default: a module's parameters and tensor attributes; none for a plain
            function). First derivatives reach every tensor whatever this says; a second
            derivative that would need an undeclared one raises an error.
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
        >>> torch.autograd.gradgradcheck(lambda y: residual_inverse(g, y, contraction=0.5)[0], y)
        True
    """
    what = str(solver_kwargs.get("what", "iterative inverse"))
    _refuse_functorch(what)
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
    # g at the solution with the graph on: the route of every first derivative in the
    # tensors g depends on (whatever they are), and y's
    gx = g(x_star)
    if not (y.requires_grad or gx.requires_grad):
        return x_star.detach(), info
    lin = _Linearisation(
        g,
        jacobian if newton else None,
        event_dim,
        contraction,
        dict(solver_kwargs),
        gx.grad_fn,
    )
    x = _Solution.apply(lin, x_star.detach(), y, gx, *_declared(g, params))
    return x, info
