"""A one-hidden-layer residual block with an exact, cheap log-det for small vector events.

.. math::

    y = x + g(x), \\qquad g(x) = \\hat W_2 \\tanh(\\hat W_1 x + b_1) + b_2, \\qquad
    \\hat W_k = W_k / \\max\\bigl(1, \\|W_k\\|_2 / c_k\\bigr), \\quad c_1 c_2 = c < 1,

    J(x) = I + \\hat W_2\\, \\mathrm{diag}\\bigl(\\tanh'(\\hat W_1 x + b_1)\\bigr)\\, \\hat W_1,
    \\qquad \\log|\\det J(x)| = \\log\\det J(x) \\;\\text{(one } D \\times D
    \\text{ LU per sample)}.

The i-ResNet block of Behrmann et al. (2019) with the shallowest branch: ``Lip(g) <= c``
makes it invertible, and with one hidden layer the Jacobian is a product of two small
matrices and a diagonal, so at the ``D`` of a posterior (tens of latents) the exact log-det
is one batched ``D x D`` determinant instead of ``D`` forward-mode passes or a power series.
The spectral norms ``||W_k||_2`` are computed exactly (the top eigenvalue of a small
Gram matrix): no power-iteration state to refresh or to go stale, so the bound holds at every
step, in either module mode. Sampling (``x -> y``) is explicit; the inverse (points the
flow did not draw) is Newton's method on ``x + g(x) = y``, whose Jacobian is never
singular (its singular values lie in ``[1 - c, 1 + c]``).

References:
    [1] Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen, *Invertible Residual Networks*,
        ICML 2019. arXiv:1811.00995
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import InvertibleModule

__all__ = [
    "DenseResidual",
    "capped_weights",
    "checked_capped_weights",
    "dense_residual",
    "near_identity_layers",
    "solve_tolerance",
    "spectral_norms",
]


def spectral_norms(w: Tensor) -> Tensor:
    """``||W||_2`` of each matrix of a batch: ``sqrt(lambda_max(W^T W))``, exact and smooth.

    The largest eigenvalue of the smaller Gram matrix (``W^T W`` or ``W W^T``) by a
    symmetric eigensolver: the same value as the largest singular value (to the Gram
    product's rounding, about ``min(m, n) eps`` relative), with the same gradient
    ``u v^T``, twice differentiable, and cheaper than an SVD (``matrix_norm(w, ord=2)``)
    with its backward for the small matrices of a posterior guide's blocks, where the
    solver call, not its arithmetic, is the cost (the step it saves is measured by
    ``examples/benchmarks/bench_guide_step.py``). An all-zero matrix
    has norm ``sqrt(tiny)`` (a finite gradient, 0, instead of ``sqrt``'s infinite one).
    Raises ``torch.linalg.LinAlgError`` for non-finite entries, or entries whose squares
    overflow the dtype (an SVD would give a finite norm there; training has diverged).

    Example:
        >>> w = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> spectral_norms(w).item()
        3.0
    """
    gram = w.mT @ w if w.shape[-2] >= w.shape[-1] else w @ w.mT
    # the trace is ||W||_F^2 >= lambda_max: finite iff every entry is finite and the
    # squares do not overflow; the eigensolver does not fail on every such input (a 2 x 2
    # NaN matrix gives NaN eigenvalues), and an infinite norm would cap W to 0, silently
    if not bool(torch.isfinite(gram.diagonal(dim1=-2, dim2=-1).sum())):
        raise torch.linalg.LinAlgError(
            "spectral_norms: expected finite weights whose squares do not overflow "
            f"({w.dtype}), got a non-finite Frobenius norm"
        )
    top = torch.linalg.eigvalsh(gram)[..., -1]
    return top.clamp_min(torch.finfo(top.dtype).tiny).sqrt()


def capped_weights(w1: Tensor, w2: Tensor, lipschitz: float) -> tuple[Tensor, Tensor]:
    """``(W1 / max(1, ||W1||_2), W2 / max(1, ||W2||_2 / c))``: ``Lip(W2 a(W1 x)) <= c``.

    Both spectral norms come from one batched symmetric eigenvalue call
    (:func:`spectral_norms`; ``W2`` and ``W2^T`` share their singular values), exactly, so
    the bound holds at every step with no iteration state. Raises
    ``torch.linalg.LinAlgError`` for non-finite weights (:func:`spectral_norms` refuses them).

    Example:
        >>> w1, w2 = capped_weights(3 * torch.eye(2), torch.eye(2), 0.5)
        >>> torch.linalg.matrix_norm(w1, ord=2).item(), torch.linalg.matrix_norm(w2, ord=2).item()
        (1.0, 0.5)
    """
    sigma = spectral_norms(torch.stack([w1, w2.T]))
    cap = torch.clamp(sigma / sigma.new_tensor([1.0, lipschitz]), min=1.0)
    return w1 / cap[0], w2 / cap[1]


def checked_capped_weights(
    owner: str, layer1: Tensor, layer2: Tensor, lipschitz: float
) -> tuple[Tensor, Tensor]:
    """:func:`capped_weights` of two ``[weights | bias]`` layers, naming non-finite ones.

    :func:`spectral_norms` refuses only non-finite (or overflowing) weights; the error then
    says which layer of ``owner`` diverged instead of a linear-algebra failure.

    Example:
        >>> bad = torch.full((2, 3), float("nan"))
        >>> checked_capped_weights("Block", bad, torch.zeros(2, 3), 0.5)
        Traceback (most recent call last):
        ...
        ValueError: Block: expected finite weights, got non-finite values in ['layer1'] ...
    """
    try:
        return capped_weights(layer1[:, :-1], layer2[:, :-1], lipschitz)
    except torch.linalg.LinAlgError as err:
        layers = {"layer1": layer1, "layer2": layer2}
        bad = [n for n, t in layers.items() if not bool(torch.isfinite(t).all())]
        raise ValueError(
            f"{owner}: expected finite weights, got non-finite values in {bad or 'a layer'} "
            "(the training diverged: lower the learning rate, clip gradients, or restart from "
            "a checkpoint)"
        ) from err


def near_identity_layers(dim: int, hidden: int) -> tuple[nn.Parameter, nn.Parameter]:
    """The two ``[weights | bias]`` layers of a one-hidden-layer branch, near the identity.

    One parameter tensor per layer (few tensors: the optimizer's per-tensor work outweighs
    the arithmetic at a posterior's size): ``W1`` orthogonal, ``W2`` small, so the block
    ``x + g(x)`` starts within about ``0.01`` of the identity; biases zero.

    Example:
        >>> l1, l2 = near_identity_layers(3, 8)
        >>> tuple(l1.shape), tuple(l2.shape)
        ((8, 4), (3, 9))
    """
    w1 = torch.empty(hidden, dim)
    nn.init.orthogonal_(w1)
    layer1 = nn.Parameter(torch.cat([w1, torch.zeros(hidden, 1)], dim=1))
    w2 = 0.01 * torch.randn(dim, hidden) / math.sqrt(hidden)
    layer2 = nn.Parameter(torch.cat([w2, torch.zeros(dim, 1)], dim=1))
    return layer1, layer2


def solve_tolerance(target: Tensor, atol: float, output_bias: Tensor) -> Tensor:
    """``max(atol (1 + |t|), 16 eps (1 + |t| + |b2|))``: a solve's per-entry tolerance.

    Relative to the target's size (an absolute ``7e-6`` is below float32's rounding of a
    value of size 100), and never below the rounding of the residual map's own terms: the
    output bias ``b2`` is not capped (training may make it ``1e3``), and the solution
    ``~ t - b2`` then has a float spacing that no step can beat.

    Example:
        >>> t = torch.zeros(2)
        >>> solve_tolerance(t, 1e-5, torch.tensor([0.0, 1e3])) > 1e-5
        tensor([False,  True])
    """
    size = 1 + target.detach().abs()
    rounding = 16 * torch.finfo(target.dtype).eps * (size + output_bias.detach().abs())
    return torch.maximum(atol * size, rounding)


class DenseResidual(InvertibleModule):
    """``y = x + W2 tanh(W1 x + b1) + b2`` with ``Lip <= c``, exact log-det, explicit forward.

    Arguments:
        input_dim: ``D``.
        hidden_dim: ``H``, the branch's hidden units.
        lipschitz: ``c`` in ``(0, 1)``, the bound on ``Lip(g)`` (split as ``1 * c``).
        atol: the inverse's tolerance on ``|x + g(x) - y| / (1 + |y|)`` (every entry; default
            ``eps ** 0.75`` of the input's dtype: about ``7e-6`` in float32, ``2e-12`` in
            float64, which Newton's quadratic convergence reaches in a few steps), never
            below the rounding floor ``16 eps (1 + |y| + |b2|)`` that no float can beat (a
            smaller ``atol`` is raised to it).
        max_iter: the inverse's Newton steps at most.
        cache_size: 0 or 1.

    Example:
        >>> block = dense_residual(3, 8, lipschitz=0.5)
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> block = block.double()
        >>> y = block(x)
        >>> torch.allclose(block.inverse(y.clone(), cached=False), x, atol=1e-10)
        True
    """

    sign = +1

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        lipschitz: float = 0.9,
        *,
        atol: float | None = None,
        max_iter: int = 50,
        cache_size: int = 1,
    ) -> None:
        dim, hidden = int(input_dim), int(hidden_dim)
        if dim < 1 or hidden < 1:
            raise ValueError(f"input_dim and hidden_dim must be >= 1, got {dim}, {hidden}")
        if not (0 < lipschitz < 1):
            raise ValueError(f"lipschitz must be in (0, 1), got {lipschitz}")
        super().__init__((dim,), cache_size=cache_size)
        self.lipschitz = float(lipschitz)
        self.atol = None if atol is None else float(atol)
        self.max_iter = int(max_iter)
        self.layer1, self.layer2 = near_identity_layers(dim, hidden)

    def weights(self) -> tuple[Tensor, Tensor]:
        """``(W1_hat, W2_hat)`` with ``||W1_hat||_2 <= 1`` and ``||W2_hat||_2 <= c``."""
        return checked_capped_weights("DenseResidual", self.layer1, self.layer2, self.lipschitz)

    def _branch(self, x: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
        """``g(x)`` and ``tanh'`` at the hidden pre-activation."""
        a = torch.tanh(F.linear(x, w1, self.layer1[:, -1]))
        return F.linear(a, w2, self.layer2[:, -1]), 1 - a * a

    def _jacobian(self, slope: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        eye = torch.eye(w1.shape[1], dtype=w1.dtype, device=w1.device)
        return eye + (w2 * slope.unsqueeze(-2)) @ w1

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w1, w2 = self.weights()
        g, slope = self._branch(x, w1, w2)
        # det J > 0: every eigenvalue of I + (contraction) has a positive real part
        return x + g, lambda: torch.linalg.slogdet(self._jacobian(slope, w1, w2))[1]

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        w1, w2 = self.weights()
        x = y - self._branch(y, w1, w2)[0]  # one fixed-point step as the start
        atol = torch.finfo(y.dtype).eps ** 0.75 if self.atol is None else self.atol
        tol = solve_tolerance(y, atol, self.layer2[:, -1])
        for _ in range(self.max_iter):
            g, slope = self._branch(x, w1, w2)
            res = x + g - y
            if bool((res.detach().abs() <= tol).all()):
                break
            step = torch.linalg.solve(self._jacobian(slope, w1, w2), res.unsqueeze(-1))
            x = x - step.squeeze(-1)
        else:
            raise RuntimeError(
                f"DenseResidual inverse did not reach atol={atol:g} (times 1 + |y|) in "
                f"{self.max_iter} steps"
            )
        _, slope = self._branch(x, w1, w2)
        return x, torch.linalg.slogdet(self._jacobian(slope, w1, w2))[1]

    def extra_repr(self) -> str:
        hidden, dim = self.layer1.shape[0], self.layer1.shape[1] - 1
        return f"input_dim={dim}, hidden_dim={hidden}, lipschitz={self.lipschitz}"


def dense_residual(input_dim: int, hidden_dim: int, lipschitz: float = 0.9) -> DenseResidual:
    """Build a :class:`DenseResidual` block (near the identity at initialisation).

    Example:
        >>> [tuple(w.shape) for w in dense_residual(4, 16).weights()]
        [(16, 4), (4, 16)]
    """
    return DenseResidual(input_dim, hidden_dim, lipschitz)
