"""The conditional one-hidden-layer residual block, explicit on the side the task scores.

.. math::

    r(z; c) = z + \\hat W_2 \\tanh(\\hat W_1 z + V c + b_1) + b_2, \\qquad
    \\|\\hat W_1\\|_2 \\le 1, \\quad \\|\\hat W_2\\|_2 \\le L < 1,

    J_r(z; c) = I + \\hat W_2\\, \\mathrm{diag}\\bigl(\\tanh'(\\hat W_1 z + V c + b_1)\\bigr)
    \\, \\hat W_1, \\qquad \\log|\\det J_r| = \\log\\det J_r \\;(\\text{one } D \\times D
    \\text{ LU per sample}).

The context enters only the hidden pre-activation's shift ``V c`` (``V`` and ``b_1`` free),
so ``Lip_z(r - id) <= L`` for every context and ``r(.; c)`` is invertible for each ``c``
(Behrmann et al., 2019). The caps ``\\hat W_k = W_k / \\max(1, \\|W_k\\|_2 / c_k)`` are exact
(as :class:`~pyro_invres.transforms.dense_residual.DenseResidual`), computed once per call.

With ``explicit="inverse"`` (the default, for neural posterior estimation) Pyro's inverse
(variable ``theta`` -> base) is ``r``, so training by ``log q(theta | x)`` never solves
anything; sampling (base -> ``theta``) is ``r^{-1}``. Then the forward log-det is
``-log det J_r`` at ``theta``. With ``explicit="forward"`` the roles swap.

The solve never forms a Jacobian per row (``H D^2`` work each, ``D / 2`` explicit passes):
``J_r`` is linear in the slopes ``tanh'``, so the inverse of the batch's average Jacobian is
one ``D x D`` matrix, and Broyden's method (:func:`~pyro_invres.ops.broyden.broyden_solve`)
corrects it row by row with rank-one updates from one evaluation of ``r`` per step. A row it
leaves after ``BROYDEN_STEPS`` steps goes to Newton's method, whose Jacobian ``J_r`` has
singular values in ``[1 - L, 1 + L]`` (never singular). The stopping rule is the same for
both: ``|r(z) - target| <= tol`` in every entry, with ``tol = max(atol (1 + |target|),
16 eps (1 + |target| + |b_2|))`` (the second term is the rounding of ``r``'s own terms, which
binds only for a large output bias ``b_2``), so ``z`` is within ``tol sqrt(D) / (1 - L)`` of
the exact solution.

References:
    [1] Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen, *Invertible Residual Networks*,
        ICML 2019. arXiv:1811.00995
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn
from torch.distributions import constraints
from torch.nn import functional as F

from ..nn.conditioners import ContextBound, _check_context
from ..ops.broyden import broyden_solve
from .base import InvertibleModule
from .dense_residual import capped_weights, near_identity_layers, solve_tolerance

__all__ = ["ConditionalDenseResidual", "ConditionedDenseResidual", "conditional_dense_residual"]

EXPLICIT = ("forward", "inverse")
# Broyden steps before Newton takes the rows left (a solve usually needs 4-6)
BROYDEN_STEPS = 16
_Weights = tuple[Tensor, Tensor, Tensor]


class ConditionalDenseResidual(ConditionalTransformModule):
    """``r(z; c) = z + W2 tanh(W1 z + V c + b1) + b2`` with ``Lip_z <= L``, exact log-det.

    ``.condition(context)`` returns a :class:`ConditionedDenseResidual` sharing these
    parameters. A context ``(C,)`` serves any batch; contexts ``(B, C)`` serve inputs
    ``(B, D)`` and ``(n, B, D)``.

    Arguments:
        input_dim: ``D``.
        context_dim: ``C``.
        hidden_dim: ``H``, the hidden units.
        lipschitz: ``L`` in ``(0, 1)``, the cap on ``||W2_hat||_2`` (``||W1_hat||_2 <= 1``).
        explicit: ``"inverse"`` (``r`` is the map variable -> base) or ``"forward"``
            (``r`` is the map base -> variable); the other direction is solved iteratively.
        atol: the solve's tolerance on ``|r(z) - target| / (1 + |target|)`` per entry (default
            ``eps ** 0.75`` of the dtype: about ``7e-6`` in float32, ``2e-12`` in float64),
            never below the rounding floor ``16 eps (1 + |target| + |b_2|)``, which no float
            can beat (a smaller ``atol`` is raised to it).
        max_iter: the solve's steps at most (Broyden's, then Newton's for the rows left).
        cache_size: 0 or 1, for each conditioned block.

    Example:
        >>> layer = conditional_dense_residual(2, 3, hidden_dim=8).double()
        >>> t = layer.condition(torch.randn(4, 3, dtype=torch.float64))
        >>> theta = torch.randn(5, 4, 2, dtype=torch.float64)
        >>> z = t.inv(theta)                       # explicit: r(theta; c)
        >>> torch.allclose(t(z.clone()), theta)    # solved (a new tensor: no cache hit)
        True
        >>> t.log_abs_det_jacobian(z, theta).shape
        torch.Size([5, 4])
    """

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dim: int = 64,
        lipschitz: float = 0.9,
        *,
        explicit: str = "inverse",
        atol: float | None = None,
        max_iter: int = 50,
        cache_size: int = 1,
    ) -> None:
        super().__init__()
        sizes = {"input_dim": input_dim, "context_dim": context_dim, "hidden_dim": hidden_dim}
        sizes["max_iter"] = max_iter
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(lipschitz, bool) or not (0 < lipschitz < 1):
            raise ValueError(f"lipschitz must be in (0, 1), got {lipschitz!r}")
        if explicit not in EXPLICIT:
            raise ValueError(f"explicit must be one of {EXPLICIT}, got {explicit!r}")
        if atol is not None and not atol > 0:
            raise ValueError(f"atol must be positive, got {atol!r}")
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        self.input_dim, self.context_dim, self.hidden_dim = input_dim, context_dim, hidden_dim
        self.lipschitz, self.explicit = float(lipschitz), explicit
        self.atol = None if atol is None else float(atol)
        self.max_iter, self.cache_size = max_iter, cache_size
        # the layout of DenseResidual, plus the context layer: near the identity, whatever
        # the context
        self.layer1, self.layer2 = near_identity_layers(input_dim, hidden_dim)
        v = torch.empty(hidden_dim, context_dim)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's default
        self.context_layer = nn.Parameter(v)

    def weights(self) -> tuple[Tensor, Tensor]:
        """``(W1_hat, W2_hat)`` with ``||W1_hat||_2 <= 1`` and ``||W2_hat||_2 <= L``."""
        names = ("layer1", "layer2", "context_layer")
        params = [getattr(self, n) for n in names]
        # one device sync: a non-finite V or bias would not fail the eigensolver, only poison y
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            bad = [n for n, p in zip(names, params) if not bool(torch.isfinite(p).all())]
            raise ValueError(
                f"ConditionalDenseResidual: expected finite weights, got non-finite values in "
                f"{bad} (the training diverged: lower the learning rate, clip gradients, or "
                "restart from a checkpoint)"
            )
        return capped_weights(self.layer1[:, :-1], self.layer2[:, :-1], self.lipschitz)

    def _weights(self, context: Tensor) -> _Weights:
        """The capped weights and the hidden shift ``V c + b1``: once per call."""
        w1, w2 = self.weights()
        return w1, w2, F.linear(context, self.context_layer, self.layer1[:, -1])

    def residual(self, z: Tensor, weights: _Weights) -> tuple[Tensor, Tensor]:
        """``r(z; c)`` and ``tanh'`` at the hidden pre-activation."""
        w1, w2, shift = weights
        a = torch.tanh(F.linear(z, w1) + shift)
        return z + F.linear(a, w2, self.layer2[:, -1]), 1 - a * a

    def forward(self, z: Tensor, context: Tensor) -> Tensor:
        """The branch ``g(z; c) = r(z; c) - z`` (what a bound context computes)."""
        return self.residual(z, self._weights(context))[0] - z

    @staticmethod
    def jacobian(slope: Tensor, weights: _Weights) -> Tensor:
        """``J_r = I + W2_hat diag(slope) W1_hat``, batched ``(..., D, D)``."""
        w1, w2, _ = weights
        eye = torch.eye(w1.shape[1], dtype=w1.dtype, device=w1.device)
        return eye + (w2 * slope.unsqueeze(-2)) @ w1

    def value(self, z: Tensor, weights: _Weights) -> Tensor:
        """``r(z; c)`` alone: what an iteration needs (no ``tanh'``)."""
        w1, w2, shift = weights
        return z + F.linear(torch.tanh(F.linear(z, w1) + shift), w2, self.layer2[:, -1])

    def solve(self, target: Tensor, weights: _Weights, direction: str) -> Tensor:
        """``z`` with ``r(z; c) = target``: Broyden's method, Newton's for any row it leaves.

        A row is done when ``|r(z) - target| <= max(atol (1 + |target|), 16 eps (1 + |target|
        + |b2|))`` in every entry: the second term (``eps`` of the dtype) only binds when the
        output bias ``b2`` is large, where the solution ``z ~ target - b2`` has float spacing
        above ``atol (1 + |target|)`` and no float could meet it.
        """
        atol = torch.finfo(target.dtype).eps ** 0.75 if self.atol is None else self.atol
        tol = solve_tolerance(target, atol, self.layer2[:, -1])
        with torch.no_grad():  # the iterates need no graph: the last step below carries it
            if target.numel() == 0:
                return target.clone()
            r0, slope0 = self.residual(target, weights)
            # one D x D matrix for the whole batch: the inverse of its average Jacobian
            # (J_r is linear in the slopes). Per-row Jacobians would cost H D^2 per row, D / 2
            # explicit passes each; Broyden's rank-one corrections cost O(D) per row and step
            mean_slope = slope0.reshape(-1, slope0.shape[-1]).mean(0)
            inverse = torch.linalg.inv(self.jacobian(mean_slope, weights))
            start = target - (r0 - target) @ inverse.mT
            z, done, evaluations = broyden_solve(
                lambda v: self.value(v, weights),
                target,
                start,
                inverse,
                tol,
                min(BROYDEN_STEPS, self.max_iter),
            )
            steps_left = self.max_iter - (evaluations - 1)
            while not bool(done.all()):
                # the rare row Broyden's method leaves: Newton (quadratic, never singular)
                if steps_left <= 0:
                    # how far it got, so the user can tell a slow solve from a hopeless one
                    worst = float(((self.value(z, weights) - target).abs() / tol).amax())
                    raise RuntimeError(
                        f"ConditionalDenseResidual (explicit={self.explicit!r}): the "
                        f"{direction} did not reach atol={atol:g} (times 1 + |target|) in "
                        f"max_iter={self.max_iter} steps (Broyden's, then Newton's): "
                        f"{int((~done).sum())} of {done.numel()} rows left, the worst at "
                        f"{worst:.3g} times its tolerance; raise max_iter or atol"
                    )
                r, slope = self.residual(z, weights)
                jac = self.jacobian(slope, weights)
                z = z - torch.linalg.solve(jac, (r - target).unsqueeze(-1))[..., 0]
                steps_left -= 1
                done = ((self.value(z, weights) - target).abs() <= tol).all(-1)
        if not torch.is_grad_enabled():
            return z
        # one more Newton step from the converged point, with the graph: its derivative is
        # the implicit function's, -J_r^{-1} d(r - target), at no cost in memory per step
        r, slope = self.residual(z, weights)
        return (
            z
            - torch.linalg.solve(self.jacobian(slope, weights), (r - target).unsqueeze(-1))[..., 0]
        )

    def condition(self, context: Tensor) -> ConditionedDenseResidual:
        """The block for ``context`` ``(..., C)``, sharing these parameters."""
        _check_context(context, self.context_dim)
        return ConditionedDenseResidual(self, context)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, context_dim={self.context_dim}, "
            f"hidden_dim={self.hidden_dim}, lipschitz={self.lipschitz}, "
            f"explicit={self.explicit!r}"
        )


class ConditionedDenseResidual(InvertibleModule):
    """A :class:`ConditionalDenseResidual` bound to one context (what ``.condition`` returns).

    The context's batch shape must expand to every input's batch shape; one that does not
    raises a ``ValueError`` naming both shapes.

    Example:
        >>> layer = ConditionalDenseResidual(2, 1, 4, explicit="forward")
        >>> t = layer.condition(torch.zeros(1))
        >>> t(torch.zeros(3, 2)).shape, t.event_shape
        (torch.Size([3, 2]), (2,))
    """

    sign = 1  # det(I + J_g) > 0 whenever Lip_z(g) < 1, and so is its inverse's

    def __init__(self, layer: ConditionalDenseResidual, context: Tensor) -> None:
        super().__init__((layer.input_dim,), cache_size=layer.cache_size)
        # a ContextBound: the cache keys on the parameters and the contexts found there
        self.bound = ContextBound(layer, context, event_dim=1)

    def _prepare(self, x: Tensor) -> tuple[ConditionalDenseResidual, _Weights]:
        layer, context = self.bound.net, self.bound.context
        _check_context(context, layer.context_dim, x)
        return layer, layer._weights(context)

    def _explicit(self, x: Tensor, sign: int) -> tuple[Tensor, Callable[[], Tensor]]:
        layer, weights = self._prepare(x)
        y, slope = layer.residual(x, weights)
        # det J_r > 0: every eigenvalue of I + (contraction) has a positive real part
        return y, lambda: sign * torch.linalg.slogdet(layer.jacobian(slope, weights))[1]

    def _solved(self, y: Tensor, sign: int, direction: str) -> tuple[Tensor, Callable[[], Tensor]]:
        layer, weights = self._prepare(y)
        x = layer.solve(y, weights, direction)

        def ladj() -> Tensor:
            # at the solution with its graph, so the log-det's gradient sees x move
            _, slope = layer.residual(x, weights)
            return sign * torch.linalg.slogdet(layer.jacobian(slope, weights))[1]

        return x, ladj

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Callable[[], Tensor]]:
        if self.bound.net.explicit == "forward":
            return self._explicit(x, +1)
        # forward = r^{-1}: its log-det is -log det J_r at the output
        return self._solved(x, -1, "forward (sampling)")

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Callable[[], Tensor]]:
        if self.bound.net.explicit == "inverse":
            return self._explicit(y, -1)
        return self._solved(y, +1, "inverse")

    def extra_repr(self) -> str:
        return f"context_shape={tuple(self.bound.context.shape)}"


def conditional_dense_residual(
    input_dim: int,
    context_dim: int,
    hidden_dim: int = 64,
    lipschitz: float = 0.9,
    explicit: str = "inverse",
) -> ConditionalDenseResidual:
    """Build a :class:`ConditionalDenseResidual` (near the identity at initialisation).

    Example:
        >>> layer = conditional_dense_residual(3, 2, hidden_dim=16)
        >>> [tuple(w.shape) for w in layer.weights()], layer.explicit
        ([(16, 3), (3, 16)], 'inverse')
    """
    return ConditionalDenseResidual(
        input_dim, context_dim, hidden_dim, lipschitz, explicit=explicit
    )
