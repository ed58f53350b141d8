"""The invertible residual block (i-ResNet) as a Pyro transform.

.. math::

    F(z) = z + g(z), \\qquad \\mathrm{Lip}(g) \\le c < 1 .

``F`` is a bijection: its inverse is the unique fixed point of ``z = w - g(z)``, found by
Banach iteration, and ``log|det J_F(z)| = log det(I + J_g(z))`` (positive determinant).

Which side of Pyro's transform is explicit is a choice, and both are first class:

* ``explicit="forward"``: ``_call(x) = x + g(x)``, ``_inverse`` iterates. Sampling is
  cheap; scoring a sample the flow produced is free through the cache (variational
  posteriors: a guide scores its own samples), scoring fresh data iterates.
* ``explicit="inverse"``: ``_inverse(y) = y + g(y)``, ``_call`` iterates. Scoring data is
  cheap (density estimation); sampling iterates. Pyro's forward log-det is then
  ``-log det(I + J_g(y))``, evaluated at ``y``.

Gradients through the iterative side are exact, by implicit differentiation
(:func:`~pyro_invres.ops.residual_inverse`), second derivatives included (Hessians,
Laplace approximations); the log-det is differentiable in the parameters and in the input.
Third derivatives, the second derivatives of a Neumann-gradient log-det, and
:mod:`torch.func` transforms of the iterative side (``vmap``, ``jacrev``) raise a clear
error instead (``torch.autograd.functional.jacobian`` works there).

Log-det estimators (``logdet=``): ``"exact"`` (the full Jacobian, from ``D``
vector-Jacobian products or carried forward by a network that offers
``forward_with_jacobian``: small ``D``), ``"series"`` (truncated power series with
Hutchinson probes; biased), ``"roulette"`` (unbiased Russian roulette), ``"auto"`` (exact
up to ``exact_max_dim`` dimensions, roulette above).

References:
    [1] Behrmann et al., *Invertible Residual Networks*, ICML 2019. arXiv:1811.00995
    [2] Chen et al., *Residual Flows for Invertible Generative Modeling*, NeurIPS 2019.
        arXiv:1906.02735
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..nn.conditioners import ContextBound
from ..nn.lipschitz_cnn import LipschitzCNN
from ..nn.lipschitz_mlp import ConditionalLipschitzMLP, LipschitzMLP
from ..ops.fixed_point import SOLVER_METHODS, SolveInfo, _check_tolerance
from ..ops.forward_gradient import logdet_with_forward_gradient
from ..ops.implicit import (
    _functorch_active,
    _functorch_data,
    _refuse_functorch,
    residual_inverse,
)
from ..ops.logdet import (
    PROBES,
    ROULETTE_DISTRIBUTIONS,
    logdet_exact,
    logdet_from_jacobian,
    logdet_roulette,
    logdet_series,
    make_vjp,
)
from .base import InvertibleModule, as_event_shape

# what the forward pass keeps for the log-det: (z, g(z), dg/dz or None), z on the graph
_Memo = tuple[Tensor, Tensor, "Tensor | None"]

__all__ = [
    "ConditionalInvertibleResidual",
    "InvertibleResidual",
    "SolveStats",
    "conditional_iresnet",
    "iresnet",
]

EXPLICIT = ("forward", "inverse")
LOGDETS = ("auto", "exact", "series", "roulette")
GRADIENTS = ("neumann", "backprop", "forward")


@dataclass
class SolveStats:
    """Counts of the iterative solves a block ran (not saved in the state dict).

    Attributes:
        solves: how many inverse solves ran.
        iterations: their total iterations (evaluations of ``g``).
        warm_starts: solves that started from the (stale) cached solution.
        last: the :class:`~pyro_invres.ops.SolveInfo` of the latest solve.

    Example:
        >>> import torch
        >>> from pyro_invres import iresnet
        >>> block = iresnet(2, [8])   # explicit forward: the inverse iterates
        >>> x = block.inv(torch.zeros(3, 2))
        >>> stats = block.solve_stats
        >>> stats.solves, stats.iterations == stats.last.iterations, stats.last.converged
        (1, True, True)
        >>> stats.reset()
        >>> stats.solves, stats.iterations, stats.last
        (0, 0, None)
    """

    solves: int = 0
    iterations: int = 0
    warm_starts: int = 0
    last: SolveInfo | None = field(default=None)

    def record(self, info: SolveInfo) -> None:
        """Count one solve and its iterations, and keep ``info`` as :attr:`last`."""
        self.solves += 1
        self.iterations += info.iterations
        self.last = info

    def reset(self) -> None:
        """Zero the counts and forget the last solve."""
        self.solves, self.iterations, self.warm_starts, self.last = 0, 0, 0, None


class _FirstDerivativeOnly(torch.autograd.Function):
    """Identity on a log-det whose backward refuses to build a graph for higher derivatives."""

    @staticmethod
    def forward(ctx, value: Tensor, message: str) -> Tensor:  # noqa: ANN001
        ctx.message = message
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        if torch.is_grad_enabled():
            raise RuntimeError(ctx.message)
        return grad, None


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(allowed)}")
    return value


class InvertibleResidual(InvertibleModule):
    """``z -> z + g(z)`` with ``Lip(g) < 1``, explicit in the direction of your choice.

    Arguments:
        nn: the residual branch ``g``, a module mapping ``event_shape`` to itself with
            ``Lip(g) <= lipschitz`` (e.g. :class:`~pyro_invres.nn.LipschitzMLP`).
        event_shape: ``(D,)`` or ``(C, H, W)``.
        lipschitz: the bound ``c`` on ``Lip(g)`` (defaults to ``nn.lipschitz``); used as the
            contraction factor in the solver's error bound.
        explicit: ``"forward"`` or ``"inverse"`` (see the module docstring).
        logdet: ``"auto"``, ``"exact"``, ``"series"`` or ``"roulette"``.
        exact_max_dim: the largest ``D`` for which ``"auto"`` is exact.
        n_exact_terms: terms the roulette estimator always computes.
        roulette: ``"geometric"`` or ``"poisson"``, the law of the extra terms.
        roulette_param: ``p`` of the geometric law or ``lambda`` of the Poisson.
        n_series_terms: terms of the truncated series.
        n_probes: Hutchinson probes per sample.
        probe: ``"gaussian"`` or ``"rademacher"``.
        atol: absolute tolerance of the iterative side (default: from the dtype).
        rtol: relative tolerance of the iterative side (default: from the dtype).
        max_iter: the most iterations of one solve.
        solver: ``"fixed_point"`` (Banach), ``"anderson"`` or ``"newton"`` (vector events
            and a network with ``forward_with_jacobian``, such as
            :class:`~pyro_invres.nn.LipschitzMLP`: each evaluation carries the ``D x D``
            Jacobian, so it suits small ``D``; the adjoint of the inverse is then one
            linear solve).
        strict: raise :class:`~pyro_invres.ops.ConvergenceError` rather than warn when a
            solve does not converge.
        gradient: how a stochastic log-det is differentiated. ``"neumann"`` (default): the
            Neumann-series gradient, memory flat in the number of terms; ``"backprop"``:
            through every term (memory grows with the terms); ``"forward"``: the Neumann
            gradient computed in the forward pass and its graph freed at once (lowest peak
            memory); exact when samples carry different upstream weights, through a
            recomputation. The value is always the estimate itself, never a surrogate.
            The exact log-det is always back-propagated.
        warm_start: in training, after the parameters changed, start the iterative side
            from the last cached solution where that is closer than a cold start (one
            extra evaluation of ``g``). Never between two optimizer steps nor in
            evaluation, so results do not depend on call history there.
        cache_size: 0 or 1 (Pyro's identity cache).

    Cost and cache: the explicit direction is one pass of ``g``; the iterative one is
    ``O(log(tol) / log(c))`` passes (``solve_stats`` counts them). With ``cache_size=1``
    scoring the tensor the block just produced reuses the pair and the log-det is
    computed once per pair.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> from pyro_invres import iresnet
        >>> block = iresnet(2, [32, 32])
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> flow = dist.TransformedDistribution(base, [block])
        >>> y = flow.rsample((5,))
        >>> flow.log_prob(y).shape, block.solve_stats.solves   # scored from the cache
        (torch.Size([5]), 0)
    """

    sign = 1  # det(I + J_g) > 0 whenever Lip(g) < 1

    def __init__(
        self,
        nn: nn.Module,
        event_shape: int | Sequence[int],
        *,
        lipschitz: float | None = None,
        explicit: str = "forward",
        logdet: str = "auto",
        exact_max_dim: int = 16,
        n_exact_terms: int = 2,
        roulette: str = "geometric",
        roulette_param: float = 0.5,
        n_series_terms: int = 10,
        n_probes: int = 1,
        probe: str = "gaussian",
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int = 1000,
        solver: str = "fixed_point",
        strict: bool = False,
        gradient: str = "neumann",
        warm_start: bool = True,
        cache_size: int = 1,
    ) -> None:
        super().__init__(as_event_shape(event_shape), cache_size=cache_size)
        self.nn = nn
        lipschitz = getattr(nn, "lipschitz", None) if lipschitz is None else lipschitz
        if lipschitz is None:
            raise ValueError("pass lipschitz=c, the bound on Lip(nn), for an arbitrary nn")
        if not 0.0 < float(lipschitz) < 1.0:
            raise ValueError(f"lipschitz must lie in (0, 1), got {lipschitz}")
        self.lipschitz = float(lipschitz)
        self.explicit = _choice("explicit", explicit, EXPLICIT)
        self.logdet = _choice("logdet", logdet, LOGDETS)
        self.roulette = _choice("roulette", roulette, ROULETTE_DISTRIBUTIONS)
        self.probe = _choice("probe", probe, PROBES)
        self.solver = _choice("solver", solver, SOLVER_METHODS)
        if solver == "newton" and not (
            len(self.event_shape) == 1 and hasattr(nn, "forward_with_jacobian")
        ):
            raise ValueError(
                "solver='newton' needs a vector event and a network with forward_with_jacobian "
                f"(such as LipschitzMLP); got event_shape {tuple(self.event_shape)} and "
                f"{type(nn).__name__}"
            )
        self.gradient = _choice("gradient", gradient, GRADIENTS)
        self.warm_start = bool(warm_start)
        for name, value, low in [
            ("exact_max_dim", exact_max_dim, 0),
            ("n_exact_terms", n_exact_terms, 0),
            ("n_series_terms", n_series_terms, 1),
            ("n_probes", n_probes, 1),
            ("max_iter", max_iter, 1),
        ]:
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value}")
        if roulette == "geometric" and not 0.0 < roulette_param < 1.0:
            raise ValueError(
                f"roulette_param (geometric p) must lie in (0, 1), got {roulette_param}"
            )
        if roulette == "poisson" and not roulette_param > 0.0:
            raise ValueError(f"roulette_param (poisson lambda) must be > 0, got {roulette_param}")
        self.exact_max_dim = int(exact_max_dim)
        self.n_exact_terms = int(n_exact_terms)
        self.roulette_param = float(roulette_param)
        self.n_series_terms = int(n_series_terms)
        self.n_probes = int(n_probes)
        self.solver_options = {
            "atol": _check_tolerance("atol", atol),
            "rtol": _check_tolerance("rtol", rtol),
            "max_iter": int(max_iter),
            "method": solver,
            "strict": bool(strict),
        }
        self.solve_stats = SolveStats()

    def _state_key(self) -> tuple:
        # a changed estimator or its options must not be answered from the memo
        options = (
            self.logdet,
            self.exact_max_dim,
            self.n_exact_terms,
            self.roulette,
            self.roulette_param,
            self.n_series_terms,
            self.n_probes,
            self.probe,
            self.gradient,
        )
        return (*super()._state_key(), options)

    # -- the two directions -----------------------------------------------------------------
    def _explicit(self, z: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return z + self.nn(z)
        # g is evaluated at a copy of z that the graph can differentiate against, and the
        # pair is kept so that the log-det of this very call reuses it.
        memo = self._graph_at(z)
        self._remember_ladj(memo)
        return memo[0] + memo[1]

    def _warm_start(self, w: Tensor) -> Tensor | None:
        """A starting point from the last cached pair, where it beats starting at ``w``.

        After an optimizer step the cached pair is stale but its solution is close to the
        new one: start from it, shifted by the change of input, ``z_old + (w - w_old)``,
        sample by sample wherever its residual is smaller than the cold start's.
        """
        # Only in training and only from a stale pair (the parameters moved since): a
        # result must not depend on call history between two optimizer steps, and
        # evaluation must be reproducible bit for bit.
        if not (self.warm_start and self.training and self._cache_size):
            return None
        if self._pair_is_current():
            return None
        x_old, y_old = self._cached_x_y
        w_old, z_old = (y_old, x_old) if self.explicit == "forward" else (x_old, y_old)
        if not isinstance(z_old, Tensor) or not isinstance(w_old, Tensor):
            return None
        if _functorch_data(z_old) is not z_old or _functorch_data(w_old) is not w_old:
            return None  # a pair cached inside a torch.func transform: dead wrappers
        if w_old.shape != w.shape or w_old.dtype != w.dtype or w_old.device != w.device:
            return None
        with torch.no_grad():
            candidate = z_old.detach() + (w - w_old.detach())
            starts = torch.stack([w, candidate])
            residual = (starts + self.nn(starts) - w).flatten(starts.dim() - self.event_dim)
            better = residual.norm(dim=-1)[1] < residual.norm(dim=-1)[0]
            if not bool(better.any()):
                return None
            self.solve_stats.warm_starts += 1
            mask = better.reshape(better.shape + (1,) * self.event_dim)
            return torch.where(mask, candidate, w)

    def _iterative(self, w: Tensor) -> Tensor:
        what = f"{type(self).__name__} iterative {self._iterative_side}"
        _refuse_functorch(what)  # before the warm start's data-dependent tests
        z, info = residual_inverse(
            self.nn,
            w,
            x0=self._warm_start(w),
            solve_context=parametrize.cached,
            event_dim=self.event_dim,
            contraction=self.lipschitz,
            what=what,
            jacobian=self.nn.forward_with_jacobian if self.solver == "newton" else None,
            **self.solver_options,
        )
        self.solve_stats.record(info)
        return z

    @property
    def _iterative_side(self) -> str:
        return "inverse" if self.explicit == "forward" else "forward"

    def _call(self, x: Tensor) -> Tensor:
        return self._explicit(x) if self.explicit == "forward" else self._iterative(x)

    def _inverse(self, y: Tensor) -> Tensor:
        return self._explicit(y) if self.explicit == "inverse" else self._iterative(y)

    # -- the log-determinant ------------------------------------------------------------------
    @property
    def logdet_method(self) -> str:
        """The estimator in use (``"auto"`` resolved for this block's dimension)."""
        if self.logdet != "auto":
            return self.logdet
        return "exact" if math.prod(self.event_shape) <= self.exact_max_dim else "roulette"

    def residual_logdet(self, z: Tensor, memo: _Memo | None = None) -> Tensor:
        """``log det(I + J_g(z))`` with this block's estimator, shaped like the batch."""
        grad = torch.is_grad_enabled()
        method = self.logdet_method
        with torch.enable_grad():
            if memo is None:
                memo = self._graph_at(z)
            zc, gz, jac = memo
            if (jac is None or method != "exact") and not zc.requires_grad:
                self._refuse_vjp_under_vmap(method)
            # one seed per estimate, so a recomputation can replay the same probes and draw
            seed = int(torch.randint(0, 2**62, ())) if method != "exact" else 0
            if jac is not None and method == "exact":
                value = logdet_from_jacobian(jac)
            elif grad and method != "exact" and self.gradient == "forward" and self._may_store():
                value = logdet_with_forward_gradient(
                    partial(self._estimate, method=method, differentiable=True),
                    zc,
                    gz,
                    list(self.parameters()),
                    rebuild=lambda: self._graph_at(z.detach(), jacobian=False)[:2],
                    seed=seed,
                    event_dim=self.event_dim,
                )
            else:
                generator = torch.Generator(device=zc.device).manual_seed(seed)
                value = self._estimate(zc, gz, generator, method=method, differentiable=grad)
                if grad and method != "exact" and self.gradient != "backprop":
                    # a Neumann gradient (the forward mode's fallback too) estimates the
                    # gradient; it is not the derivative of a differentiable value, so its
                    # own derivatives would be wrong (the stored forward gradient refuses
                    # on its own)
                    value = _FirstDerivativeOnly.apply(value, self._no_second_derivative(method))
        return value if grad else value.detach()

    def _refuse_vjp_under_vmap(self, method: str) -> None:
        if _functorch_active():
            raise RuntimeError(
                f"{type(self).__name__}: under torch.func.vmap the {method!r} log-det needs "
                "autograd inside the transform, which torch.func refuses; use logdet='exact' "
                "on a vector event with a branch that carries its Jacobian (LipschitzMLP), "
                "call the block on the whole batch, or torch.autograd.functional.jacobian"
            )

    def _no_second_derivative(self, method: str) -> str:
        return (
            f"{type(self).__name__}: the {method!r} log-det with gradient={self.gradient!r} "
            "has no second derivatives (its gradient is a Neumann-series estimate, not the "
            "derivative of a differentiable value), and a backward pass asked for them "
            "(create_graph=True: a Hessian, a Laplace approximation); use logdet='exact' "
            "(small dimensions) or gradient='backprop'"
        )

    def _graph_at(self, z: Tensor, jacobian: bool = True) -> _Memo:
        if z.requires_grad:
            zc = z.clone()
        elif _functorch_active():
            # torch.func refuses requires_grad_ inside its transforms (vmap): no graph
            # here, so only a carried Jacobian can give the log-det (residual_logdet)
            zc = z
        else:
            zc = z.detach().requires_grad_(True)
        if jacobian and self._carries_jacobian():
            # the exact log-det from a Jacobian carried forward: training then needs one
            # plain backward instead of a double backward through D vector-Jacobian
            # products, and torch.jit.trace can record it
            gz, jac = self.nn.forward_with_jacobian(zc)
            return zc, gz, jac
        return zc, self.nn(zc), None

    def _carries_jacobian(self) -> bool:
        if not (self.logdet_method == "exact" and self.event_dim == 1):
            return False
        if not hasattr(self.nn, "forward_with_jacobian"):
            return False
        # forward_with_jacobian bypasses Module.__call__: a network someone hooked (to
        # inspect or alter activations) keeps the path that calls it
        return not any(m._forward_hooks or m._forward_pre_hooks for m in self.nn.modules())

    def _may_store(self) -> bool:
        # gradients stored in the forward pass only cover x and the parameters: a context
        # that itself requires grad (an encoder's output) needs the ordinary backward
        context = getattr(self.nn, "context", None)
        return not (isinstance(context, Tensor) and context.requires_grad)

    def _estimate(
        self,
        zc: Tensor,
        gz: Tensor,
        generator: torch.Generator,
        *,
        method: str,
        differentiable: bool,
    ) -> Tensor:
        if method == "exact":
            return logdet_exact(make_vjp(zc, gz, create_graph=differentiable), zc, self.event_dim)
        backprop = differentiable and self.gradient == "backprop"
        vjp = make_vjp(zc, gz, create_graph=backprop)
        graph_vjp = make_vjp(zc, gz, create_graph=True) if differentiable and not backprop else None
        options = {
            "n_probes": self.n_probes,
            "probe": self.probe,
            "generator": generator,
            "graph_vjp": graph_vjp,
        }
        if method == "series":
            return logdet_series(vjp, zc, self.event_dim, n_terms=self.n_series_terms, **options)
        return logdet_roulette(
            vjp,
            zc,
            self.event_dim,
            n_exact_terms=self.n_exact_terms,
            distribution=self.roulette,
            param=self.roulette_param,
            **options,
        )

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor, memo: object) -> Tensor:
        if self.explicit == "forward":
            return self.residual_logdet(x, memo)  # type: ignore[arg-type]
        return -self.residual_logdet(y, memo)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (
            f"event_shape={self.event_shape}, lipschitz={self.lipschitz}, "
            f"explicit={self.explicit!r}, logdet={self.logdet!r}, solver={self.solver!r}"
        )


class ConditionalInvertibleResidual(ConditionalTransformModule):
    """The conditional twin: ``z -> z + g(z; context)`` with ``Lip_z(g) < 1`` for every context.

    ``.condition(context)`` returns an :class:`InvertibleResidual` sharing this module's
    parameters, with every guarantee of the unconditional block (the bound holds in ``z``).

    Arguments:
        nn: a module ``g(z, context=...)`` with ``Lip_z(g) <= lipschitz``
            (e.g. :class:`~pyro_invres.nn.ConditionalLipschitzMLP`).
        event_shape: the event shape of ``z``.
        **kwargs: every keyword option of :class:`InvertibleResidual`.

    Example:
        >>> import torch
        >>> from pyro_invres import conditional_iresnet
        >>> block = conditional_iresnet(2, context_dim=3, hidden_dims=[16])
        >>> block.condition(torch.randn(3))(torch.randn(4, 2)).shape
        torch.Size([4, 2])
    """

    bijective = True

    def __init__(self, nn: nn.Module, event_shape: int | Sequence[int], **kwargs: object) -> None:
        super().__init__()
        self.nn = nn
        self.event_shape = as_event_shape(event_shape)
        kwargs.setdefault("lipschitz", getattr(nn, "lipschitz", None))
        self.options = kwargs
        # build one conditioned block now so bad options fail here, not at first use
        InvertibleResidual(ContextBound(nn, torch.zeros(1)), self.event_shape, **kwargs)

    def condition(self, context: Tensor) -> InvertibleResidual:
        return InvertibleResidual(ContextBound(self.nn, context), self.event_shape, **self.options)


def _default_hidden(dim: int) -> list[int]:
    width = max(64, 10 * dim)
    return [width, width]


def iresnet(
    input_dim: int | Sequence[int],
    hidden_dims: Sequence[int] | None = None,
    *,
    lipschitz: float = 0.9,
    explicit: str = "forward",
    logdet: str = "auto",
    activation: str = "lipswish",
    kernel_sizes: Sequence[int] | None = None,
    split: str = "equal",
    activation_kwargs: Mapping[str, object] | None = None,
    **kwargs: object,
) -> InvertibleResidual:
    """Build an :class:`InvertibleResidual` block for vectors or images.

    For an int ``input_dim`` the branch is a :class:`~pyro_invres.nn.LipschitzMLP`; for a
    shape ``(C, H, W)`` it is a :class:`~pyro_invres.nn.LipschitzCNN` whose convolutions
    are normalised as operators on that shape.

    Arguments:
        input_dim: the dimension ``D`` of a vector event, or an image shape ``(C, H, W)``.
        hidden_dims: hidden layer sizes (vectors: default ``[max(64, 10 D)] * 2``) or hidden
            channels (images: default ``[32, 32]``).
        lipschitz: the bound ``c`` on ``Lip(g)``, in ``(0, 1)``.
        explicit: ``"forward"`` (cheap sampling) or ``"inverse"`` (cheap scoring).
        logdet: ``"auto"``, ``"exact"``, ``"series"`` or ``"roulette"``.
        activation: ``"lipswish"``, ``"clipswish"``, ``"elu"`` or ``"sine"``.
        kernel_sizes: images only: one odd kernel size per layer (default 3-1-...-1-3).
        split: vectors only: ``"equal"`` or ``"learned"`` sharing of ``c`` between the
            layers (see :class:`~pyro_invres.nn.LipschitzMLP`).
        activation_kwargs: options of the activation, e.g. ``{"beta": 16.0}``: a LipSwish
            that starts sharper (closer to a scaled ReLU) bends the block more per unit of
            distance; ``{"omega": 4.0}``: the starting frequency of ``"sine"``, which
            bends it many times and suits thin, repeated structure (concentric rings).
        **kwargs: further options of :class:`InvertibleResidual`.

    Example:
        >>> import torch
        >>> block = iresnet(3, [16, 16], lipschitz=0.8, explicit="inverse")
        >>> x = torch.randn(10, 3)
        >>> torch.allclose(block._inverse(block._call(x)), x, atol=1e-4)
        True
        >>> iresnet((2, 4, 4), [8])(torch.randn(5, 2, 4, 4)).shape
        torch.Size([5, 2, 4, 4])
    """
    if isinstance(input_dim, int):
        if kernel_sizes is not None:
            raise ValueError("kernel_sizes applies to image blocks, input_dim=(C, H, W)")
        hidden = _default_hidden(input_dim) if hidden_dims is None else list(hidden_dims)
        net: nn.Module = LipschitzMLP(
            input_dim,
            hidden,
            lipschitz=lipschitz,
            activation=activation,
            split=split,
            activation_kwargs=activation_kwargs,
        )
    else:
        if split != "equal":
            raise ValueError(f"split={split!r} applies to vector blocks; images use 'equal'")
        shape = as_event_shape(input_dim)
        if len(shape) != 3:
            raise ValueError(f"input_dim must be an int or (C, H, W), got {input_dim!r}")
        hidden = [32, 32] if hidden_dims is None else list(hidden_dims)
        net = LipschitzCNN(
            shape,
            hidden,
            kernel_sizes,
            lipschitz=lipschitz,
            activation=activation,
            activation_kwargs=activation_kwargs,
        )
    return InvertibleResidual(
        net, input_dim, lipschitz=lipschitz, explicit=explicit, logdet=logdet, **kwargs
    )


def conditional_iresnet(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    lipschitz: float = 0.9,
    explicit: str = "forward",
    logdet: str = "auto",
    activation: str = "lipswish",
    activation_kwargs: Mapping[str, object] | None = None,
    **kwargs: object,
) -> ConditionalInvertibleResidual:
    """Build a :class:`ConditionalInvertibleResidual` with a conditional Lipschitz MLP.

    Arguments:
        input_dim: the dimension ``D`` of the event.
        context_dim: the dimension of the context.
        hidden_dims: hidden layer sizes (default ``[max(64, 10 D)] * 2``).
        lipschitz: the bound on ``Lip_z(g)``, in ``(0, 1)``.
        explicit: ``"forward"`` or ``"inverse"``.
        logdet: ``"auto"``, ``"exact"``, ``"series"`` or ``"roulette"``.
        activation: ``"lipswish"``, ``"clipswish"``, ``"elu"`` or ``"sine"``.
        activation_kwargs: options of the activation (``beta``, ``omega``).
        **kwargs: further options of :class:`InvertibleResidual`.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> block = conditional_iresnet(2, context_dim=1, hidden_dims=[16])
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> flow = dist.ConditionalTransformedDistribution(base, [block])
        >>> flow.condition(torch.ones(1)).sample((3,)).shape
        torch.Size([3, 2])
    """
    hidden = _default_hidden(input_dim) if hidden_dims is None else list(hidden_dims)
    net = ConditionalLipschitzMLP(
        input_dim,
        context_dim,
        hidden,
        lipschitz=lipschitz,
        activation=activation,
        activation_kwargs=activation_kwargs,
    )
    return ConditionalInvertibleResidual(
        net, input_dim, lipschitz=lipschitz, explicit=explicit, logdet=logdet, **kwargs
    )
