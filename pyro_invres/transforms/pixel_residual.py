"""A pixelwise residual block for images: a nonlinear 1x1 convolution with an exact log-det.

.. math::

    y_{:, i, j} = x_{:, i, j} + g(x_{:, i, j}), \\qquad
    g(v) = \\hat W_2 \\tanh(\\hat W_1 v + b_1) + b_2, \\qquad
    \\mathrm{Lip}(g) \\le \\|\\hat W_2\\|_2 \\|\\hat W_1\\|_2 \\le c < 1,

    \\log|\\det J(x)| = \\sum_{i, j} \\log\\det\\bigl(I_C + \\hat W_2\\,
    \\mathrm{diag}(\\tanh'(\\hat W_1 x_{:, i, j} + b_1))\\, \\hat W_1\\bigr).

The i-ResNet block of Behrmann et al. (2019) with a one-hidden-layer branch applied to each
pixel's channel vector: the same map at every pixel, as Glow's invertible 1x1 convolution
(Kingma & Dhariwal, 2018) is the same matrix at every pixel, but nonlinear. Pixels do not
interact, so the Jacobian of the whole image is block diagonal with one ``C x C`` block per
pixel, and the log-det is exact and cheap: one ``C x C`` determinant per pixel (``C`` is a
handful of channels after a multi-scale flow's squeezes), by elimination without pivoting
over all pixels at once (:func:`~pyro_invres.ops.accretive.accretive_logdet`). The caps
are exact spectral norms (:func:`~pyro_invres.transforms.dense_residual.capped_weights`),
so ``Lip(g) <= c`` holds at every step.

The explicit direction is this module's forward, ``x -> x + g(x)``; in a multi-scale image
flow built data-to-latent (:func:`~pyro_invres.flows.glow_residual`) that is the scoring
direction, one pass per block in training. The inverse (sampling there) is solved per pixel:
Broyden's method from the inverse of the batch's average Jacobian
(:func:`~pyro_invres.ops.broyden.broyden_solve`), Newton's method for any pixel it leaves,
and one Newton step with the graph so that gradients through the inverse are the implicit
function's.

References:
    [1] Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen, *Invertible Residual Networks*,
        ICML 2019. arXiv:1811.00995
    [2] Kingma & Dhariwal, *Glow: Generative Flow with Invertible 1x1 Convolutions*,
        NeurIPS 2018. arXiv:1807.03039
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from ..ops.accretive import accretive_logdet
from ..ops.broyden import broyden_solve
from ..ops.implicit import _functorch_active
from .base import InvertibleModule, LazyLadj
from .dense_residual import checked_capped_weights, near_identity_layers, solve_tolerance

__all__ = ["PixelResidual", "pixel_residual"]

#: Broyden steps before the pixels left over go to Newton's method.
BROYDEN_STEPS = 16


def _image_event(input_shape: int | Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` from a channel count (any ``H``, ``W``: ``-1``) or a shape."""
    if isinstance(input_shape, int):
        shape: tuple[int, ...] = (int(input_shape), -1, -1)
    else:
        shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or shape[0] < 1 or any(d < 1 and d != -1 for d in shape[1:]):
        raise ValueError(
            "PixelResidual: expected an image event shape (C, H, W) with C >= 1 and H, W "
            f">= 1 (or -1: any), or a channel count; got {input_shape!r}"
        )
    return shape  # type: ignore[return-value]


def _outer(w1: Tensor, w2: Tensor) -> Tensor:
    """``K[h, i C + j] = W2[i, h] W1[h, j]`` (``Hd x C^2``): the Jacobian is ``I + slope K``."""
    c = w1.shape[1]
    return (w2.mT.unsqueeze(-1) * w1.unsqueeze(-2)).reshape(-1, c * c)


class PixelResidual(InvertibleModule):
    """``y = x + W2 tanh(W1 x + b1) + b2`` at every pixel; ``Lip <= c``, exact log-det.

    Arguments:
        input_shape: the event shape ``(C, H, W)`` (``H``, ``W`` may be ``-1``: any size), or
            ``C`` alone (any size).
        hidden_channels: ``Hd``, the hidden units of the per-pixel branch.
        lipschitz: ``c`` in ``(0, 1)``, the bound on ``Lip(g)``.
        atol: the inverse's tolerance on ``|x + g(x) - y| / (1 + |y|)`` (every entry; default
            ``eps ** 0.75`` of the input's dtype), never below the rounding floor
            ``16 eps (1 + |y| + |b2|)`` that no float can beat (a smaller ``atol`` is raised
            to it).
        max_iter: the inverse's steps at most (Broyden's and Newton's together).
        cache_size: 0 or 1.

    Example:
        >>> block = PixelResidual((2, 3, 3), 8, lipschitz=0.5).double()
        >>> x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
        >>> y, ladj = block.call_and_ladj(x, cached=False)
        >>> y.shape, ladj.shape
        (torch.Size([4, 2, 3, 3]), torch.Size([4]))
        >>> torch.allclose(block.inverse(y, cached=False), x, atol=1e-10)
        True
    """

    sign = +1  # det(I + J_g) > 0 whenever Lip(g) < 1

    def __init__(
        self,
        input_shape: int | Sequence[int],
        hidden_channels: int,
        lipschitz: float = 0.9,
        *,
        atol: float | None = None,
        max_iter: int = 50,
        cache_size: int = 1,
    ) -> None:
        shape = _image_event(input_shape)
        hidden = int(hidden_channels)
        if hidden < 1:
            raise ValueError(f"hidden_channels must be >= 1, got {hidden_channels}")
        if not (0 < lipschitz < 1):
            raise ValueError(f"lipschitz must be in (0, 1), got {lipschitz}")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        super().__init__(shape, cache_size=cache_size)
        channels = shape[0]
        self.lipschitz = float(lipschitz)
        self.atol = None if atol is None else float(atol)
        self.max_iter = int(max_iter)
        self.layer1, self.layer2 = near_identity_layers(channels, hidden)

    @property
    def channels(self) -> int:
        """``C``, the channels each pixel's branch maps."""
        return self.event_shape[0]

    def weights(self) -> tuple[Tensor, Tensor]:
        """``(W1_hat, W2_hat)`` with ``||W1_hat||_2 <= 1`` and ``||W2_hat||_2 <= c``, exactly.

        Example:
            >>> w1, w2 = PixelResidual(3, 5, lipschitz=0.5).weights()
            >>> tuple(w1.shape), tuple(w2.shape), bool(torch.linalg.matrix_norm(w2, 2) <= 0.5)
            ((5, 3), (3, 5), True)
        """
        # exact spectral norms (one small eigenvalue call): no iteration state to go stale
        return checked_capped_weights("PixelResidual", self.layer1, self.layer2, self.lipschitz)

    # -- per-pixel arithmetic on channels-last rows (..., C) ---------------------------------
    def _branch(self, v: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
        """``g(v)`` and ``tanh'`` at the hidden pre-activation, rows ``(..., C)``."""
        a = torch.tanh(F.linear(v, w1, self.layer1[:, -1]))
        return F.linear(a, w2, self.layer2[:, -1]), 1 - a * a

    def _value(self, v: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        return v + self._branch(v, w1, w2)[0]

    @staticmethod
    def _jacobian(slope: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        """``I + W2 diag(slope) W1`` per row: ``(..., C, C)``.

        Written as one product ``slope @ K`` with ``K[h, i, j] = W2[i, h] W1[h, j]`` (built
        once per call, ``Hd x C^2``): a single matrix product over every pixel instead of a
        broadcast ``(..., C, Hd)`` product and a batched one, the same arithmetic.
        """
        c = w1.shape[1]
        eye = torch.eye(c, dtype=w1.dtype, device=w1.device)
        return eye + (slope @ _outer(w1, w2)).unflatten(-1, (c, c))

    def _ladj_lapack(self, slope: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        """:meth:`_ladj` by LAPACK's ``slogdet`` of the ``(..., C, C)`` Jacobians (``det J >
        0``, so ``log|det J|`` is ``log det J``)."""
        return torch.linalg.slogdet(self._jacobian(slope, w1, w2))[1].sum((-2, -1))

    def _ladj(self, slope: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        """The image's log-det from the per-pixel slopes ``(..., H, W, Hd)``.

        Each pixel's ``I + W2 diag(slope) W1`` has a positive definite symmetric part
        (``Lip(g) < 1``), so on the CPU its log-det is pivot-free elimination over all
        pixels at once (:func:`~pyro_invres.ops.accretive.accretive_logdet`), with the
        pixels as the last dimension: built in that layout by one product,
        ``K^T slope^T``. On a GPU and under :mod:`torch.func`, LAPACK's ``slogdet``.
        """
        if slope.device.type != "cpu" or _functorch_active():
            # measured faster on the CPU only; and torch.func has no rule for its custom
            # backward
            return self._ladj_lapack(slope, w1, w2)
        c = w1.shape[1]
        rows = slope.reshape(-1, slope.shape[-1])
        eye = torch.eye(c, dtype=w1.dtype, device=w1.device).unsqueeze(-1)
        jac = eye + (_outer(w1, w2).t() @ rows.t()).reshape(c, c, -1)
        return accretive_logdet(jac).reshape(slope.shape[:-1]).sum((-2, -1))

    @staticmethod
    def _rows(x: Tensor) -> Tensor:
        return x.movedim(-3, -1)  # (..., C, H, W) -> (..., H, W, C)

    @staticmethod
    def _image(v: Tensor) -> Tensor:
        return v.movedim(-1, -3)

    # -- the hooks ----------------------------------------------------------------------
    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, LazyLadj]:
        w1, w2 = self.weights()
        v = self._rows(x)
        g, slope = self._branch(v, w1, w2)
        return self._image(v + g), lambda: self._ladj(slope, w1, w2)

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, LazyLadj]:
        w1, w2 = self.weights()
        v = self._solve(self._rows(y), w1, w2)
        return self._image(v), lambda: self._ladj(self._branch(v, w1, w2)[1], w1, w2)

    def _solve(self, target: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        """Rows ``v`` with ``v + g(v) = target``: Broyden's, Newton's for any row left."""
        atol = torch.finfo(target.dtype).eps ** 0.75 if self.atol is None else self.atol
        tol = solve_tolerance(target, atol, self.layer2[:, -1])
        with torch.no_grad():  # the iterates need no graph: the last step below carries it
            w1d, w2d = w1.detach(), w2.detach()
            if target.numel() == 0:
                return target.clone()
            g0, slope0 = self._branch(target, w1d, w2d)
            # one C x C matrix for every pixel of the batch: the inverse of the average
            # Jacobian (linear in the slopes); Broyden's rank-one corrections fit each pixel
            mean_slope = slope0.reshape(-1, slope0.shape[-1]).mean(0)
            inverse = torch.linalg.inv(self._jacobian(mean_slope, w1d, w2d))
            start = target - g0 @ inverse.mT
            steps = min(BROYDEN_STEPS, self.max_iter)
            v, done, evaluations = broyden_solve(
                lambda z: self._value(z, w1d, w2d), target, start, inverse, tol, steps
            )
            steps_left = self.max_iter - (evaluations - 1)
            if not bool(done.all()) and not bool(torch.isfinite(target).all()):
                # checked only on this rare path (no cost when the solve succeeds): a nan or
                # inf pixel (cached=False or validation off skip the input check) would
                # otherwise exhaust max_iter and blame the tolerance
                raise ValueError(
                    "PixelResidual: input of the inverse has non-finite values (nan or inf)"
                )
            while not bool(done.all()):
                # the rare pixel Broyden's method leaves: Newton (quadratic, never singular:
                # the Jacobian's singular values lie in [1 - c, 1 + c])
                if steps_left <= 0:
                    raise RuntimeError(
                        f"PixelResidual inverse did not reach atol={atol:g} (times 1 + |y|) "
                        f"in max_iter={self.max_iter} steps (Broyden's, then Newton's)"
                    )
                g, slope = self._branch(v, w1d, w2d)
                jac = self._jacobian(slope, w1d, w2d)
                v = v - torch.linalg.solve(jac, (v + g - target).unsqueeze(-1))[..., 0]
                steps_left -= 1
                done = ((self._value(v, w1d, w2d) - target).abs() <= tol).all(-1)
        if not torch.is_grad_enabled():
            return v
        # one more Newton step from the converged point, with the graph: its derivative is
        # the implicit function's, -J^{-1} d(v + g(v) - target)
        g, slope = self._branch(v, w1, w2)
        jac = self._jacobian(slope, w1, w2)
        return v - torch.linalg.solve(jac, (v + g - target).unsqueeze(-1))[..., 0]

    def extra_repr(self) -> str:
        hidden = self.layer1.shape[0]
        return (
            f"input_shape={self.event_shape}, hidden_channels={hidden}, lipschitz={self.lipschitz}"
        )


def pixel_residual(
    input_shape: int | Sequence[int], hidden_channels: int = 32, lipschitz: float = 0.9
) -> PixelResidual:
    """Build a :class:`PixelResidual` block (near the identity at initialisation).

    Example:
        >>> block = pixel_residual((4, 2, 2), 16)
        >>> block(torch.zeros(3, 4, 2, 2)).shape
        torch.Size([3, 4, 2, 2])
    """
    return PixelResidual(input_shape, hidden_channels, lipschitz)
