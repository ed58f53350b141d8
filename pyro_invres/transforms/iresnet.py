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

Options are small typed objects, each carrying its own settings; a string stands for the
object with its defaults. Log-det estimators (``logdet=``, :mod:`pyro_invres.ops.logdet`):
:class:`~pyro_invres.ops.Exact` (``"exact"``: the full Jacobian, from ``D``
vector-Jacobian products or carried forward by a network that offers
``forward_with_jacobian``: small ``D``), :class:`~pyro_invres.ops.Series` (``"series"``:
truncated power series with Hutchinson probes; biased), :class:`~pyro_invres.ops.Roulette`
(``"roulette"``: unbiased Russian roulette), :class:`~pyro_invres.ops.Auto` (``"auto"``:
exact up to ``max_exact_dim`` dimensions, roulette above). Solvers of the iterative side
(``solver=``, :mod:`pyro_invres.ops.fixed_point`): :class:`~pyro_invres.ops.FixedPoint`,
:class:`~pyro_invres.ops.Anderson`, :class:`~pyro_invres.ops.Newton`. An option that
cannot apply to the block is an error, never silently ignored.

The flat keywords of earlier versions (``n_probes=``, ``atol=``, ``exact_max_dim=``, ...)
are still accepted and mapped onto these objects (:data:`LEGACY_OPTIONS`), so saved
configurations keep working; the same applicability rules hold for them.

References:
    [1] Behrmann et al., *Invertible Residual Networks*, ICML 2019. arXiv:1811.00995
    [2] Chen et al., *Residual Flows for Invertible Generative Modeling*, NeurIPS 2019.
        arXiv:1906.02735
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..nn.conditioners import ContextBound, _check_context
from ..nn.linearization import Linearization
from ..nn.lipschitz_cnn import LipschitzCNN
from ..nn.lipschitz_mlp import ConditionalLipschitzMLP, LipschitzMLP
from ..ops.fixed_point import (
    SECANT_MAX_DIM,
    FixedPoint,
    Newton,
    SolveInfo,
    SolverName,
    as_solver,
)
from ..ops.forward_gradient import logdet_with_forward_gradient
from ..ops.implicit import (
    _functorch_active,
    _functorch_data,
    _refuse_functorch,
    residual_inverse,
)
from ..ops.logdet import (
    Auto,
    Estimator,
    Exact,
    LogdetName,
    Roulette,
    Series,
    as_estimator,
    logdet_exact,
    logdet_from_jacobian,
    logdet_roulette,
    logdet_series,
    make_vjp,
)
from .base import InvertibleModule, LazyLadj, as_event_shape

# what the forward pass keeps for the log-det: (z, g(z), dg/dz, or g linearised at z, or
# None), z on the graph
_Memo = tuple[Tensor, Tensor, "Tensor | Linearization | None"]

__all__ = [
    "LEGACY_OPTIONS",
    "ConditionalInvertibleResidual",
    "InvertibleResidual",
    "SolveStats",
    "conditional_iresnet",
    "iresnet",
]

EXPLICIT = ("forward", "inverse")

#: The flat keywords of earlier versions and where each now lives: ``(object, field)``.
#: ``"estimator"`` fields belong to the :class:`~pyro_invres.ops.Series` /
#: :class:`~pyro_invres.ops.Roulette` / :class:`~pyro_invres.ops.Auto` object that
#: ``logdet=`` names, ``"solver"`` fields to the solver object.
LEGACY_OPTIONS: dict[str, tuple[str, str]] = {
    "exact_max_dim": ("estimator", "max_exact_dim"),
    "n_exact_terms": ("estimator", "n_exact_terms"),
    "roulette": ("estimator", "distribution"),
    "roulette_param": ("estimator", "param"),
    "n_series_terms": ("estimator", "n_terms"),
    "n_probes": ("estimator", "n_probes"),
    "probe": ("estimator", "probe"),
    "gradient": ("estimator", "gradient"),
    "atol": ("solver", "atol"),
    "rtol": ("solver", "rtol"),
    "max_iter": ("solver", "max_iter"),
    "strict": ("solver", "strict"),
    "warm_start": ("solver", "warm_start"),
}
_STOCHASTIC = ("n_probes", "probe", "gradient")
_APPLIES = {
    "exact": (),
    "series": ("n_series_terms", *_STOCHASTIC),
    "roulette": ("n_exact_terms", "roulette", "roulette_param", *_STOCHASTIC),
    "auto": ("exact_max_dim", "n_exact_terms", "roulette", "roulette_param", *_STOCHASTIC),
}


def _from_legacy(logdet: object, solver: object, legacy: Mapping[str, Any]) -> tuple[Any, Any]:
    """Map the flat keywords of earlier versions onto the estimator and solver objects."""
    unknown = sorted(set(legacy) - set(LEGACY_OPTIONS))
    if unknown:
        raise TypeError(
            f"unexpected option(s) {unknown}; the estimator's and the solver's options go on "
            "their objects, e.g. logdet=Roulette(n_probes=4), solver=Anderson(atol=1e-6)"
        )
    est = {k: v for k, v in legacy.items() if LEGACY_OPTIONS[k][0] == "estimator"}
    sol = {k: v for k, v in legacy.items() if LEGACY_OPTIONS[k][0] == "solver"}
    if est:
        if not isinstance(logdet, str):
            raise ValueError(
                f"options {sorted(est)} cannot be combined with the estimator object "
                f"{logdet!r}: set them on the object"
            )
        as_estimator(logdet)  # an unknown name says so first
        wrong = sorted(set(est) - set(_APPLIES[logdet]))
        if wrong:
            raise ValueError(
                f"option(s) {wrong} do not apply to logdet={logdet!r} (it takes "
                f"{list(_APPLIES[logdet]) or 'no options'})"
            )
        fields = {LEGACY_OPTIONS[k][1]: v for k, v in est.items()}
        if logdet == "auto":
            max_dim = fields.pop("max_exact_dim", 16)
            logdet = Auto(max_exact_dim=max_dim, otherwise=Roulette(**fields))
        else:
            logdet = (Series if logdet == "series" else Roulette)(**fields)
    if sol:
        if not isinstance(solver, str):
            raise ValueError(
                f"options {sorted(sol)} cannot be combined with the solver object "
                f"{solver!r}: set them on the object"
            )
        solver = type(as_solver(solver))(**{LEGACY_OPTIONS[k][1]: v for k, v in sol.items()})
    return logdet, solver


def _upgrade_flat_state(d: dict, event_shape: torch.Size) -> None:
    """Turn the flat option attributes of a block pickled by an earlier version into objects.

    The old state kept every estimator option whether or not it applied, so the objects are
    rebuilt from the ones the stored ``logdet`` used (the same numbers as before).
    """
    old = {k: d.pop(k) for k in [*LEGACY_OPTIONS, "logdet", "solver"] if k in d}
    solve = d.pop("solver_options", {})
    stochastic = {k: old[k] for k in _STOCHASTIC if k in old}
    roulette = {
        "n_exact_terms": old.get("n_exact_terms", 2),
        "distribution": old.get("roulette", "geometric"),
        "param": old.get("roulette_param", 0.5),
        **stochastic,
    }
    name = old.get("logdet", "auto")
    if name == "series":
        logdet: Estimator = Series(n_terms=old.get("n_series_terms", 10), **stochastic)
    elif name == "roulette":
        logdet = Roulette(**roulette)
    elif name == "exact":
        logdet = Exact()
    else:
        logdet = Auto(max_exact_dim=old.get("exact_max_dim", 16), otherwise=Roulette(**roulette))
    d["_logdet"] = logdet
    d["_estimator"] = logdet.resolve(math.prod(event_shape)) if isinstance(logdet, Auto) else logdet
    fields = {k: solve[k] for k in ("atol", "rtol", "max_iter", "strict") if k in solve}
    solver = as_solver(solve.get("method", old.get("solver", "fixed_point")))
    d["_solver"] = type(solver)(**fields, warm_start=old.get("warm_start", True))


def _hooked(net: nn.Module) -> bool:
    """Whether any module of ``net`` carries a forward (pre-)hook.

    Asked on every pass (hooks can be added at any time), so a plain walk over the module
    dicts rather than ``modules()``, which builds a name for every module on the way.
    """
    stack = [net]
    while stack:
        m = stack.pop()
        if m._forward_hooks or m._forward_pre_hooks:
            return True
        stack += [c for c in m._modules.values() if c is not None]
    return False


def _check_solver(solver: object, net: nn.Module, event_shape: torch.Size) -> FixedPoint:
    solver = as_solver(solver)
    if isinstance(solver, Newton):
        if not (len(event_shape) == 1 and hasattr(net, "forward_with_jacobian")):
            raise ValueError(
                "solver='newton' needs a vector event and a network with forward_with_jacobian "
                f"(such as LipschitzMLP); got event_shape {tuple(event_shape)} and "
                f"{type(net).__name__}"
            )
        if _hooked(net):
            raise ValueError(
                "solver='newton' evaluates the network through forward_with_jacobian, which "
                f"bypasses the forward hooks registered on {type(net).__name__}; remove the "
                "hooks or use solver='fixed_point' or 'anderson'"
            )
    return solver


def _check_estimator(logdet: object, event_shape: torch.Size) -> tuple[Estimator, Any]:
    """``(the estimator as given, the one it resolves to for this event shape)``."""
    logdet = as_estimator(logdet)
    if not isinstance(logdet, Auto):
        return logdet, logdet
    dim = math.prod(event_shape)
    resolved = logdet.resolve(dim)
    if isinstance(resolved, Exact) and logdet.otherwise != Roulette():
        raise ValueError(
            f"logdet={logdet!r} resolves to the exact log-det for this block (D = {dim} <= "
            f"max_exact_dim = {logdet.max_exact_dim}), so its stochastic options "
            f"{logdet.otherwise!r} cannot apply; pass logdet='exact', or the stochastic "
            "estimator itself (logdet=Roulette(...)) to use it at this dimension"
        )
    return logdet, resolved


def _check_lipschitz(net: nn.Module, lipschitz: float | None) -> float:
    lipschitz = getattr(net, "lipschitz", None) if lipschitz is None else lipschitz
    if lipschitz is None:
        raise ValueError("pass lipschitz=c, the bound on Lip(nn), for an arbitrary nn")
    if not 0.0 < float(lipschitz) < 1.0:
        raise ValueError(f"lipschitz must lie in (0, 1), got {lipschitz}")
    return float(lipschitz)


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
        nn: the residual branch ``g``, a module mapping the event shape to itself with
            ``Lip(g) <= lipschitz`` (e.g. :class:`~pyro_invres.nn.LipschitzMLP`).
        input_dim: the event: ``D`` (or ``(D,)``) for vectors, ``(C, H, W)`` for images.
        lipschitz: the bound ``c`` on ``Lip(g)`` (defaults to ``nn.lipschitz``); used as the
            contraction factor in the solver's error bound.
        explicit: ``"forward"`` or ``"inverse"`` (see the module docstring).
        logdet: the log-det estimator: :class:`~pyro_invres.ops.Auto` (default: exact up
            to 16 dimensions, roulette above), :class:`~pyro_invres.ops.Exact`,
            :class:`~pyro_invres.ops.Series` or :class:`~pyro_invres.ops.Roulette` (each
            with its terms, probes and gradient mode), or the name of one with its
            defaults. The exact log-det is always back-propagated.
        solver: the iterative side's solver with its tolerances, iteration cap,
            strictness and warm start: :class:`~pyro_invres.ops.FixedPoint` (Banach,
            default), :class:`~pyro_invres.ops.Anderson` or
            :class:`~pyro_invres.ops.Newton` (vector events and a network with
            ``forward_with_jacobian`` and no forward hooks, such as
            :class:`~pyro_invres.nn.LipschitzMLP`: each evaluation carries the ``D x D``
            Jacobian, so it suits small ``D``; the adjoint of the inverse is then one
            linear solve), or the name of one with its defaults.
        cache_size: 0 or 1 (Pyro's identity cache).
        **legacy: the flat keywords of earlier versions (:data:`LEGACY_OPTIONS`), mapped
            onto ``logdet`` and ``solver``.

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
        input_dim: int | Sequence[int],
        *,
        lipschitz: float | None = None,
        explicit: str = "forward",
        logdet: LogdetName | Estimator = "auto",
        solver: SolverName | FixedPoint = "fixed_point",
        cache_size: int = 1,
        **legacy: Any,
    ) -> None:
        super().__init__(as_event_shape(input_dim), cache_size=cache_size)
        self.nn = nn
        self.lipschitz = _check_lipschitz(nn, lipschitz)
        self.explicit = _choice("explicit", explicit, EXPLICIT)
        logdet, solver = _from_legacy(logdet, solver, legacy)
        self.logdet = logdet
        self.solver = solver
        self.solve_stats = SolveStats()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_solver" not in self.__dict__:
            _upgrade_flat_state(self.__dict__, self.event_shape)

    # -- the options ----------------------------------------------------------------------------
    @property
    def logdet(self) -> Estimator:
        """The log-det estimator (settable: an estimator object or its name)."""
        return self._logdet

    @logdet.setter
    def logdet(self, value: LogdetName | Estimator) -> None:
        self._logdet, self._estimator = _check_estimator(value, self.event_shape)

    @property
    def estimator(self) -> Exact | Series | Roulette:
        """The estimator in use: :attr:`logdet` with ``Auto`` resolved for this block."""
        return self._estimator

    @property
    def solver(self) -> FixedPoint:
        """The iterative side's solver (settable: a solver object or its name)."""
        return self._solver

    @solver.setter
    def solver(self, value: SolverName | FixedPoint) -> None:
        self._solver = _check_solver(value, self.nn, self.event_shape)

    @property
    def solver_options(self) -> dict[str, object]:
        """The keyword arguments of :func:`~pyro_invres.ops.solve_fixed_point` (read-only)."""
        return self._solver.options()

    @property
    def warm_start(self) -> bool:
        """Whether the solver warm-starts in training (settable; see ``FixedPoint``)."""
        return self._solver.warm_start

    @warm_start.setter
    def warm_start(self, value: bool) -> None:
        self._solver = dataclasses.replace(self._solver, warm_start=bool(value))

    def _state_key(self, state: list[Tensor], contexts: list[Tensor]) -> tuple:
        # a changed estimator or its options must not be answered from the memo
        return (*super()._state_key(state, contexts), self._estimator)

    # -- the two directions -----------------------------------------------------------------
    def _explicit(self, z: Tensor) -> tuple[Tensor, _Memo | None]:
        if not torch.is_grad_enabled():
            return z + self.nn(z), None
        # g is evaluated at a copy of z that the graph can differentiate against, and the
        # pair is kept so that the log-det of this very call reuses it.
        memo = self._graph_at(z)
        return memo[0] + memo[1], memo

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
            jacobian=self._newton_jacobian(),
            **self._solver.options(),
        )
        self.solve_stats.record(info)
        return z

    def _newton_jacobian(self) -> Any:
        if not isinstance(self._solver, Newton):
            return None
        if _hooked(self.nn):
            # hooks added after construction: Newton's carried-Jacobian pass would skip them
            raise RuntimeError(
                f"{type(self).__name__}: solver=Newton evaluates the network through "
                "forward_with_jacobian, which bypasses the forward hooks now registered on "
                f"{type(self.nn).__name__}; remove the hooks or set block.solver = "
                "'fixed_point' (or 'anderson')"
            )
        return self.nn.forward_with_jacobian

    @property
    def _iterative_side(self) -> str:
        return "inverse" if self.explicit == "forward" else "forward"

    # The block contract's hooks: the map and its forward log-det, lazily, so that sampling
    # without scoring never pays for the log-det (the exact one costs D backward passes).
    # The log-det is taken on the explicit side's input: x for explicit="forward", y (and
    # negated) for explicit="inverse"; the explicit pass hands over the graph it built.
    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, LazyLadj]:
        if self.explicit == "forward":
            y, memo = self._explicit(x)
            return y, lambda: self.residual_logdet(x, memo)
        y = self._iterative(x)
        return y, lambda: -self.residual_logdet(y)

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, LazyLadj]:
        if self.explicit == "inverse":
            x, memo = self._explicit(y)
            return x, lambda: -self.residual_logdet(y, memo)
        x = self._iterative(y)
        return x, lambda: self.residual_logdet(x)

    # -- the log-determinant ------------------------------------------------------------------
    @property
    def logdet_method(self) -> str:
        """The name of the estimator in use (``"auto"`` resolved for this block's dimension)."""
        return self._estimator.name

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
            elif grad and method != "exact" and self._gradient == "forward" and self._may_store():
                value = self._forward_gradient_logdet(z, memo, method, seed)
            else:
                generator = torch.Generator(device=zc.device).manual_seed(seed)
                lin = jac if isinstance(jac, Linearization) else None
                value = self._estimate(
                    zc, gz, generator, method=method, differentiable=grad, lin=lin
                )
                if grad and method != "exact" and self._gradient != "backprop":
                    # a Neumann gradient (the forward mode's fallback too) estimates the
                    # gradient; it is not the derivative of a differentiable value, so its
                    # own derivatives would be wrong (the stored forward gradient refuses
                    # on its own)
                    value = _FirstDerivativeOnly.apply(value, self._no_second_derivative(method))
        return value if grad else value.detach()

    def _forward_gradient_logdet(self, z: Tensor, memo: _Memo, method: str, seed: int) -> Tensor:
        zc, gz, jac = memo
        # the memo's kept factors serve the forward-pass estimate only: the closure must not
        # hold them (and the slopes' graph) until the backward, which would undo this
        # mode's memory saving
        first = [jac if isinstance(jac, Linearization) else None]
        rebuilt: dict[str, Any] = {}

        def rebuild() -> tuple[Tensor, Tensor]:
            leaf, g_leaf, lin_leaf = self._graph_at(z.detach())
            rebuilt.update(gx=g_leaf, lin=lin_leaf if isinstance(lin_leaf, Linearization) else None)
            return leaf, g_leaf

        def estimate(x: Tensor, gx: Tensor, generator: torch.Generator) -> Tensor:
            # the kept factors of the g(x) being differentiated (the memo's, or a rebuilt one)
            if gx is gz:
                use, first[0] = first[0], None
            else:
                use = rebuilt.pop("lin", None) if rebuilt.pop("gx", None) is gx else None
            return self._estimate(x, gx, generator, method=method, differentiable=True, lin=use)

        return logdet_with_forward_gradient(
            estimate,
            zc,
            gz,
            list(self.parameters()),
            rebuild=rebuild,
            seed=seed,
            event_dim=self.event_dim,
        )

    @property
    def _gradient(self) -> str:
        return getattr(self._estimator, "gradient", "backprop")

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
            f"{type(self).__name__}: the {method!r} log-det with gradient={self._gradient!r} "
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
        if jacobian and self._linearizes():
            # the stochastic log-det's vector-Jacobian products as explicit matrix products
            # of the kept weights and slopes: no autograd traversal per term, and the
            # gradient is one plain backward instead of a double backward
            # the memory-saving mode defers the slopes to its log-det: a flow runs every
            # block before any log-det, and eager slopes would all be alive at once
            gz, lin = self.nn.linearize(zc, lazy=self._gradient == "forward")
            return zc, gz, lin
        return zc, self.nn(zc), None

    def _linearizes(self) -> bool:
        if self.event_dim != 1 or self.logdet_method == "exact":
            return False
        can = getattr(self.nn, "can_linearize", None)
        # linearize bypasses Module.__call__: a hooked network keeps the path that calls it
        return can is not None and can() and not _hooked(self.nn)

    def _carries_jacobian(self) -> bool:
        if not (self.logdet_method == "exact" and self.event_dim == 1):
            return False
        if not hasattr(self.nn, "forward_with_jacobian"):
            return False
        # forward_with_jacobian bypasses Module.__call__: a network someone hooked (to
        # inspect or alter activations) keeps the path that calls it
        return not _hooked(self.nn)

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
        lin: Linearization | None = None,
    ) -> Tensor:
        if method == "exact":
            return logdet_exact(make_vjp(zc, gz, create_graph=differentiable), zc, self.event_dim)
        est = self._estimator
        backprop = differentiable and est.gradient == "backprop"
        if lin is not None:
            # the same products, from the network's kept factors (no autograd traversal)
            vjp = lin.graph_vjp if backprop else lin.vjp
            graph_vjp = lin.graph_vjp if differentiable and not backprop else None
        else:
            vjp = make_vjp(zc, gz, create_graph=backprop)
            graph_vjp = (
                make_vjp(zc, gz, create_graph=True) if differentiable and not backprop else None
            )
        options = {
            "n_probes": est.n_probes,
            "probe": est.probe,
            "generator": generator,
            "graph_vjp": graph_vjp,
        }
        if isinstance(est, Series):
            return logdet_series(vjp, zc, self.event_dim, n_terms=est.n_terms, **options)
        return logdet_roulette(
            vjp,
            zc,
            self.event_dim,
            n_exact_terms=est.n_exact_terms,
            distribution=est.distribution,
            param=est.param,
            **options,
        )

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        # a pair from scratch (not the one this block just computed)
        if self.explicit == "forward":
            return self.residual_logdet(x)
        return -self.residual_logdet(y)

    def extra_repr(self) -> str:
        return (
            f"event_shape={self.event_shape}, lipschitz={self.lipschitz}, "
            f"explicit={self.explicit!r}, logdet={self._logdet!r}, solver={self._solver!r}"
        )


class ConditionalInvertibleResidual(ConditionalTransformModule):
    """The conditional twin: ``z -> z + g(z; context)`` with ``Lip_z(g) < 1`` for every context.

    ``.condition(context)`` returns an :class:`InvertibleResidual` sharing this module's
    parameters, options and :attr:`solve_stats`, with every guarantee of the unconditional
    block (the bound holds in ``z``). The options are checked here, without running the
    network, so a network of any dtype or device builds.

    Arguments:
        nn: a module ``g(z, context=...)`` with ``Lip_z(g) <= lipschitz``
            (e.g. :class:`~pyro_invres.nn.ConditionalLipschitzMLP`).
        input_dim: the event of ``z``: ``D`` or a shape.
        lipschitz: the bound ``c`` on ``Lip_z(g)`` (defaults to ``nn.lipschitz``).
        explicit: ``"forward"`` or ``"inverse"``.
        logdet: the log-det estimator, as for :class:`InvertibleResidual`.
        solver: the solver, as for :class:`InvertibleResidual`.
        cache_size: 0 or 1, for each conditioned block.
        **legacy: the flat keywords of earlier versions (:data:`LEGACY_OPTIONS`).

    Example:
        >>> import torch
        >>> from pyro_invres import conditional_iresnet
        >>> block = conditional_iresnet(2, context_dim=3, hidden_dims=[16])
        >>> block.condition(torch.randn(3))(torch.randn(4, 2)).shape
        torch.Size([4, 2])
        >>> _ = block.condition(torch.randn(3)).inv(torch.randn(4, 2))
        >>> block.solve_stats.solves   # shared by every conditioned block
        1
    """

    bijective = True

    def __init__(
        self,
        nn: nn.Module,
        input_dim: int | Sequence[int],
        *,
        lipschitz: float | None = None,
        explicit: str = "forward",
        logdet: LogdetName | Estimator = "auto",
        solver: SolverName | FixedPoint = "fixed_point",
        cache_size: int = 1,
        **legacy: Any,
    ) -> None:
        super().__init__()
        self.nn = nn
        self.event_shape = as_event_shape(input_dim)
        self.lipschitz = _check_lipschitz(nn, lipschitz)
        self.explicit = _choice("explicit", explicit, EXPLICIT)
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        self.cache_size = cache_size
        logdet, solver = _from_legacy(logdet, solver, legacy)
        self.logdet = _check_estimator(logdet, self.event_shape)[0]
        self.solver = _check_solver(solver, nn, self.event_shape)
        self.solve_stats = SolveStats()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "solver" in self.__dict__ or "options" not in self.__dict__:
            return
        # pickled by an earlier version, which kept the keyword options as a dict
        options = dict(self.__dict__.pop("options"))
        self.lipschitz = _check_lipschitz(self.nn, options.pop("lipschitz", None))
        self.explicit = options.pop("explicit", "forward")
        self.cache_size = options.pop("cache_size", 1)
        solve = {k: options.pop(k) for k in ("atol", "rtol", "max_iter", "strict") if k in options}
        flat = {**options, "solver_options": {**solve, "method": options.get("solver")}}
        flat["solver_options"]["method"] = flat["solver_options"]["method"] or "fixed_point"
        _upgrade_flat_state(flat, self.event_shape)
        self.logdet, self.solver = flat["_logdet"], flat["_solver"]
        self.solve_stats = SolveStats()

    def condition(self, context: Tensor) -> InvertibleResidual:
        """The block for ``context``: shares parameters, options and :attr:`solve_stats`.

        ``context`` is ``(..., context_dim)``; its batch shape must expand to the batch
        shape of every input the block then sees (one context, ``(context_dim,)``, for a
        whole batch; ``(B, context_dim)`` for inputs ``(B, D)`` or ``(n, B, D)``), and a
        context that does not is refused with an error naming both shapes: a block keeps
        its input's shape, so it never broadcasts its input against a larger context.
        """
        context_dim = getattr(self.nn, "context_dim", None)
        if isinstance(context_dim, int) and context_dim > 0:
            _check_context(context, context_dim)
        block = InvertibleResidual(
            ContextBound(self.nn, context, event_dim=len(self.event_shape)),
            self.event_shape,
            lipschitz=self.lipschitz,
            explicit=self.explicit,
            logdet=self.logdet,
            solver=self.solver,
            cache_size=self.cache_size,
        )
        block.solve_stats = self.solve_stats
        return block


def _default_hidden(dim: int) -> list[int]:
    width = max(64, 10 * dim)
    return [width, width]


def iresnet(
    input_dim: int | Sequence[int],
    hidden_dims: Sequence[int] | None = None,
    *,
    lipschitz: float = 0.9,
    explicit: str = "forward",
    logdet: LogdetName | Estimator = "auto",
    solver: SolverName | FixedPoint = "fixed_point",
    activation: str = "lipswish",
    activation_kwargs: Mapping[str, object] | None = None,
    kernel_sizes: Sequence[int] | None = None,
    split: str = "equal",
    **legacy: Any,
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
        logdet: the log-det estimator (an object or its name, see
            :class:`InvertibleResidual`).
        solver: the solver of the iterative side (an object or its name).
        activation: a name from :data:`~pyro_invres.nn.activations.ACTIVATIONS`.
        kernel_sizes: images only: one odd kernel size per layer (default 3-1-...-1-3).
        split: vectors only: ``"equal"`` or ``"learned"`` sharing of ``c`` between the
            layers (see :class:`~pyro_invres.nn.LipschitzMLP`).
        activation_kwargs: options of the activation, e.g. ``{"beta": 16.0}``: a LipSwish
            that starts sharper (closer to a scaled ReLU) bends the block more per unit of
            distance; ``{"omega": 4.0}``: the starting frequency of ``"sine"``, which
            bends it many times and suits thin, repeated structure (concentric rings).
        **legacy: the flat keywords of earlier versions (:data:`LEGACY_OPTIONS`), mapped
            onto ``logdet`` and ``solver``.

    Example:
        >>> import torch
        >>> block = iresnet(3, [16, 16], lipschitz=0.8, explicit="inverse")
        >>> x = torch.randn(10, 3)
        >>> torch.allclose(block._inverse(block._call(x)), x, atol=1e-4)
        True
        >>> iresnet((2, 4, 4), [8])(torch.randn(5, 2, 4, 4)).shape
        torch.Size([5, 2, 4, 4])
        >>> from pyro_invres.ops import Roulette, Anderson
        >>> block = iresnet(32, logdet=Roulette(n_probes=2), solver=Anderson(atol=1e-6))
        >>> iresnet(2, n_probes=2)   # the log-det resolves to exact at D = 2
        Traceback (most recent call last):
        ...
        ValueError: logdet=Auto(...) resolves to the exact log-det ...
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
        net,
        input_dim,
        lipschitz=lipschitz,
        explicit=explicit,
        logdet=logdet,
        solver=solver,
        **legacy,
    )


def conditional_iresnet(
    input_dim: int | Sequence[int],
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    lipschitz: float = 0.9,
    explicit: str = "forward",
    logdet: LogdetName | Estimator = "auto",
    solver: SolverName | FixedPoint | None = None,
    activation: str = "lipswish",
    activation_kwargs: Mapping[str, object] | None = None,
    **legacy: Any,
) -> ConditionalInvertibleResidual:
    """Build a :class:`ConditionalInvertibleResidual` with a conditional Lipschitz MLP.

    Arguments:
        input_dim: the dimension ``D`` of the event, or ``(D,)`` (vector events only).
        context_dim: the dimension of the context.
        hidden_dims: hidden layer sizes (default ``[max(64, 10 D)] * 2``).
        lipschitz: the bound on ``Lip_z(g)``, in ``(0, 1)``.
        explicit: ``"forward"`` or ``"inverse"``.
        logdet: the log-det estimator (an object or its name).
        solver: the solver of the iterative side (an object or its name). Default:
            :class:`~pyro_invres.ops.fixed_point.Secant` (one secant model of the block
            shared by the batch: fewer evaluations than the fixed point when sampling many
            draws, ``examples/benchmarks/bench_conditional_sampling.py``), and
            ``"fixed_point"`` above :data:`~pyro_invres.ops.fixed_point.SECANT_MAX_DIM`
            dimensions.
        activation: a name from :data:`~pyro_invres.nn.activations.ACTIVATIONS`.
        activation_kwargs: options of the activation (``beta``, ``omega``).
        **legacy: the flat keywords of earlier versions (:data:`LEGACY_OPTIONS`).

    Example:
        >>> import torch, pyro.distributions as dist
        >>> block = conditional_iresnet(2, context_dim=1, hidden_dims=[16])
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> flow = dist.ConditionalTransformedDistribution(base, [block])
        >>> flow.condition(torch.ones(1)).sample((3,)).shape
        torch.Size([3, 2])
    """
    shape = as_event_shape(input_dim)
    if len(shape) != 1:
        raise ValueError(
            f"conditional_iresnet builds vector blocks: input_dim must be D or (D,), got "
            f"{input_dim!r}; for images pass a conditional network to "
            "ConditionalInvertibleResidual(nn, (C, H, W))"
        )
    input_dim = shape[0]
    if solver is None:
        solver = "secant" if input_dim <= SECANT_MAX_DIM else "fixed_point"
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
        net,
        input_dim,
        lipschitz=lipschitz,
        explicit=explicit,
        logdet=logdet,
        solver=solver,
        **legacy,
    )
