"""Soft spectral normalisation as a :mod:`torch.nn.utils.parametrize` parametrization.

The weight a layer sees is

.. math::

    \\tilde W = \\frac{W}{\\max(1, \\hat\\sigma(W) / c)},

where :math:`\\hat\\sigma(W)` is a warm-started Lanczos estimate of the operator norm of the
layer and :math:`c` the Lipschitz coefficient: weights whose norm is already below ``c``
are left alone (Behrmann et al. 2019, Chen et al. 2019). Dense layers with a side of at
most 8 (the first and last layers of 2-D flows) get the exact norm instead, from the
eigen-decomposition of the Gram matrix of that side (``W^T W`` or ``W W^T``).

Unlike the reference implementations there is no manual ``update_lipschitz`` step:
the power-iteration vectors live in buffers and are refreshed *inside* the forward pass,
but only when the weight has changed since the last refresh (an optimizer step, a
``load_state_dict``, a ``.to()``, or a write through ``p.data`` as Pyro's ``ClippedAdam``
does, which the version counter does not see: values are compared too). Between two
optimizer steps the layer is therefore a fixed function, in training mode too.
Every refresh is warm-started and runs until the
estimate stops moving (relative tolerance from the dtype), capped at
``n_power_iterations`` in training mode and ``max_eval_iterations`` in evaluation mode,
where a refresh that hit the training cap is topped up. A couple of fixed iterations per
step, as in the references, is not enough: the optimizer grows the directions the
estimate does not see, and the bound is broken by 10% within 30 Adam steps.

A state dict carries the vectors, a ``fresh`` flag and a digest of the weight they were
saved with. Loaded vectors are trusted only for that exact weight; any other loaded
weight (averaged or edited state dicts, vectors from another run) is refreshed to
convergence at its first use, in training mode too: trusting the flag alone let averaged
weights reach ``Lip(g) = 11`` at ``c = 0.9``.

:mod:`~torch.nn.utils.parametrize` refuses to pickle a parametrized module; a layer
normalised here pickles all the same (``torch.save`` of a whole flow, ``pickle``,
``copy.deepcopy``, multiprocessing): it is stored as its plain class and its
parametrization, registered again on loading.

References:
    [1] Behrmann et al., *Invertible Residual Networks*, ICML 2019. arXiv:1811.00995
    [2] Chen et al., *Residual Flows for Invertible Generative Modeling*, NeurIPS 2019.
        arXiv:1906.02735
    [3] Miyato et al., *Spectral Normalization for GANs*, ICLR 2018. arXiv:1802.05957
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "SpectralNormScale",
    "ConvSpectralNormScale",
    "spectral_norm",
    "default_power_tolerance",
    "operator_norm",
]

# refreshes are rare (only after a weight changed): one lock for all layers is enough
_REFRESH_LOCK = threading.RLock()
# the weight "seen" by a refresh that ran inside torch.jit.trace (values unreadable there)
_TRACED = torch.empty(0)


def default_power_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance on the power-iteration estimate that ``dtype`` can actually meet.

    A refresh stops once successive estimates agree to it:

    .. math::

        |\\hat\\sigma_k - \\hat\\sigma_{k-1}| \\le \\mathrm{tol}\\,\\hat\\sigma_k .

    A tolerance of 1e-7 is never met in float32 and would run every refresh to its cap.

    Example:
        >>> import torch
        >>> default_power_tolerance(torch.float32), default_power_tolerance(torch.float64)
        (1e-05, 1e-10)
    """
    return 1e-5 if torch.finfo(dtype).bits <= 32 else 1e-10


_LANCZOS_BASIS = 32
# The check of a converged refresh (SpectralNormScale.complement_sigma): Lanczos steps on
# the complement of the top vector found, restarts it may trigger, and how often a
# training-mode refresh is checked (every refresh in evaluation mode and after a load).
_CHECK_STEPS = 16
_CHECK_RESTARTS = 3
_CHECK_EVERY = 16
# Dense layers with a side this small (the 2 -> h and h -> 2 layers of 2-D flows) get the
# exact norm from the eigen-decomposition of the Gram matrix of that side: no estimation
# error, and fewer operations than Lanczos. Not for larger sides: LAPACK's eigh of a
# 32 x 32 matrix is multi-threaded by OpenBLAS, and its spinning threads made a 2-D fit
# step's refreshes 6x slower (36 ms instead of 6) when another process shared the CPU.
_EXACT_MAX_SIDE = 8
_HOST_DTYPES = (torch.float32, torch.float64)
# Above this, numpy's products run multi-threaded in OpenBLAS (ignoring torch's thread
# setting; 2x slower at 2048 x 2048 when another process shares the CPU) while torch's
# dispatch overhead no longer matters next to the product itself.
_HOST_MAX_NUMEL = 1 << 20


def _weight_digest(weight: Tensor, *vectors: Tensor) -> Tensor:
    """Four float64 numbers that any edit of a weight (or of its singular vectors) changes.

    The singular vectors ``vectors`` are digested with the weight: a state dict whose
    ``u``/``v`` were replaced (vectors of another run, orthogonal junk) must not be
    trusted for a weight it did not come with, or a capped training-mode refresh would
    start from them and underestimate the norm.

    The sum, the norm and two position-weighted sums ``sum_k w_k k / n`` and
    ``sum_k w_k sin(k)``: averaging, rescaling, permuting rows or columns (model merging)
    or mixing in another run's values all move them. Computed only when a state dict is
    saved or loaded, in numpy, whose pairwise sums do not depend on the thread count.
    """
    w = weight.detach()
    if w.device.type == "meta":  # no values: nothing to vouch for
        return torch.full((4,), math.nan, dtype=torch.float64)
    parts = [w.reshape(-1), *(v.detach().reshape(-1) for v in vectors)]
    flat = torch.cat([t.to("cpu", torch.float64) for t in parts]).numpy()
    k = np.arange(flat.size, dtype=np.float64)
    sums = [flat.sum(), math.sqrt((flat * flat).sum()), (flat * (k / max(flat.size, 1))).sum()]
    return torch.tensor([*sums, (flat * np.sin(k)).sum()], dtype=torch.float64)


def _normalize(v: Tensor, eps: float = 1e-12) -> Tensor:
    return v / v.norm().clamp_min(eps)


# ``np.linalg.eigvalsh`` is a Python wrapper (type checks, an error-state context) around
# this generalized ufunc; a Lanczos step calls it once, on at most 32 x 32 float64, where
# the wrapper cost as much as LAPACK itself (11 us against 6 per call). The same LAPACK
# routine (syevd, lower triangle) gives the same eigenvalues; the public function is the
# fallback should numpy move its private module.
try:
    from numpy.linalg import _umath_linalg

    _EIGVALSH_LO = _umath_linalg.eigvalsh_lo
    _EIGH_LO = _umath_linalg.eigh_lo
except (ImportError, AttributeError):  # pragma: no cover - depends on numpy's internals
    _EIGVALSH_LO = _EIGH_LO = None


def _top_eigenvalue(tri: np.ndarray, k: int) -> float:
    """Largest eigenvalue of the symmetric tridiagonal ``tri[:k, :k]`` (float64)."""
    if k == 1:
        return float(tri[0, 0])
    if k == 2:  # closed form: the one or two Lanczos steps of thin layers are common
        a, b, d = tri[0, 0], tri[0, 1], tri[1, 1]
        return float(0.5 * (a + d) + math.hypot(0.5 * (a - d), b))
    if _EIGVALSH_LO is not None:
        top = float(_EIGVALSH_LO(tri[:k, :k], signature="d->d")[-1])
        if math.isfinite(top):
            return top
        # non-finite entries (NaN weights; the call above has warned) or no convergence:
        # the public function's answer (it raises LinAlgError where LAPACK did not converge)
    return float(np.linalg.eigvalsh(tri[:k, :k])[-1])


def _top_eigenvector(tri: np.ndarray, k: int) -> np.ndarray:
    """Unit eigenvector of the largest eigenvalue of ``tri[:k, :k]``."""
    if k == 1:
        return np.ones(1)
    if _EIGH_LO is not None:  # as in _top_eigenvalue: the ufunc under np.linalg.eigh
        values, vectors = _EIGH_LO(tri[:k, :k], signature="d->dd")
        if math.isfinite(float(values[-1])):
            return np.ascontiguousarray(vectors[:, -1])
    return np.ascontiguousarray(np.linalg.eigh(tri[:k, :k])[1][:, -1])


def _top_gram_vector(gram: np.ndarray) -> np.ndarray:
    """Unit eigenvector of the largest eigenvalue of a small symmetric PSD matrix (float64).

    A 2 x 2 matrix ``[[a, b], [b, d]]`` (the thin layers of 2-D flows) in closed form: the
    top eigenvalue is ``l = (a + d) / 2 + hypot((a - d) / 2, b)`` and ``(b, l - a)`` or
    ``(l - d, b)`` its eigenvector, whichever is the longer (the other can vanish).
    """
    n = gram.shape[0]
    if n == 1:
        return np.ones(1)
    if n == 2:
        a, b, d = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
        top = 0.5 * (a + d) + math.hypot(0.5 * (a - d), b)
        x, y = (b, top - a) if top - a >= top - d else (top - d, b)
        norm = math.hypot(x, y)
        return np.array([x / norm, y / norm]) if norm > 0 else np.array([1.0, 0.0])
    return np.ascontiguousarray(np.linalg.eigh(gram)[1][:, -1])


def _lanczos_iteration(
    gram: Callable[[Any], Any], basis: Any, sigma: float, tol: float, floor: float
) -> tuple[float, bool, np.ndarray | None]:
    """Lanczos on a symmetric operator from the unit vector ``basis[0]``.

    Written with array operators only, so that it runs on torch tensors and on numpy
    arrays alike. ``basis`` has room for ``steps + 1`` vectors (its first dimension), and
    a Krylov space of ``R^n`` has at most ``n`` of them. Returns ``(sqrt(theta),
    converged, s)`` with ``theta`` the top Ritz value and ``s`` its eigenvector in the
    basis, or ``s = None`` when the first step already met the tolerance against ``sigma``.
    """
    n = basis.shape[1]
    steps = min(basis.shape[0] - 1, n)
    tri = np.zeros((steps, steps))  # T_k, filled in place (no per-step rebuild)
    converged = False
    beta_prev = 0.0
    k = 0
    for step in range(steps):
        k = step + 1
        q = basis[step]
        z = gram(q)
        alpha = float(q @ z)
        z = z - alpha * q
        if step:
            z -= beta_prev * basis[step - 1]
        stacked = basis[:k]
        z -= stacked.T @ (stacked @ z)  # full re-orthogonalisation
        beta = float(z @ z) ** 0.5
        tri[step, step] = alpha
        sigma_new = math.sqrt(max(_top_eigenvalue(tri, k), 0.0))
        if abs(sigma_new - sigma) <= tol * sigma_new:
            converged = True
            if step == 0:
                return sigma, True, None
        sigma = sigma_new
        # the whole space, or an invariant subspace up to rounding: the pair is exact
        if converged or k == n or beta <= floor * max(sigma_new**2, 1e-30):
            converged = True
            break
        if k < steps:
            tri[step, k] = tri[k, step] = beta
        basis[k] = z / beta
        beta_prev = beta
    return sigma, converged, _top_eigenvector(tri, k)


class SpectralNormScale(nn.Module):
    """Parametrization ``W -> W / max(1, sigma(W) / c)`` of a dense weight ``(out, in)``.

    Arguments:
        weight: the weight being parametrized (used for shapes, device and dtype only).
        lipschitz: the bound ``c`` on the operator norm, ``0 < c``.
        n_power_iterations: cap on the warm-started iterations of a training-mode refresh.
        max_eval_iterations: cap on iterations for an evaluation-mode refresh.
        tol: relative tolerance on ``sigma`` (``None``: chosen from the dtype).

    Example:
        >>> import torch
        >>> from pyro_invres.nn import spectral_norm
        >>> layer = spectral_norm(torch.nn.Linear(4, 4), lipschitz=0.5)
        >>> bool(torch.linalg.matrix_norm(layer.weight, ord=2) <= 0.5 + 1e-4)
        True
    """

    _exact_ok = True  # dense layers: the Gram matrix of the smaller side is explicit
    # defaults for layers pickled before these existed (unchecked, schedule from zero)
    _checked = False
    _refreshes = 0
    # bookkeeping that state_dict() writes without changing the map: a transform's cached
    # pair survives it (see pyro_invres.transforms.base)
    _cache_exempt_buffers = ("fresh", "weight_digest")

    def __init__(
        self,
        weight: Tensor,
        lipschitz: float,
        n_power_iterations: int = 20,
        max_eval_iterations: int = 200,
        tol: float | None = None,
    ) -> None:
        super().__init__()
        if not lipschitz > 0:
            raise ValueError(f"lipschitz must be positive, got {lipschitz}")
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        self.lipschitz = float(lipschitz)
        self.n_power_iterations = int(n_power_iterations)
        self.max_eval_iterations = int(max_eval_iterations)
        self.tol = tol
        u0, v0 = self._init_vectors(weight)
        self.register_buffer("u", _normalize(u0))
        self.register_buffer("v", _normalize(v0))
        # Whether (u, v) were refreshed for the weight as it is now; written into the
        # state dict so that a reloaded model refreshes exactly when the original would.
        self.register_buffer("fresh", torch.zeros((), dtype=torch.bool))
        # A digest of the weight the state dict was saved with: the flag above vouches for
        # that weight only, and a loaded weight that differs from it (averaged, edited,
        # taken from another run) gets a full refresh instead (NaN: no weight known).
        self.register_buffer("weight_digest", torch.full((4,), math.nan, dtype=torch.float64))
        self._seen: tuple | None = None
        # a copy of the weight (u, v) were refreshed for: writes through ``p.data`` keep the
        # version counter, so the values are compared (one copy per refresh, cheaper than
        # digesting the values; compared only when the fingerprint still matches)
        self._weight_seen: Tensor | None = None
        self._converged = False
        self._full_refresh = False  # set by a load the buffers cannot vouch for
        # whether the last refresh was checked against a false convergence (refresh's
        # ``check``), and refreshes so far (training mode checks one in _CHECK_EVERY)
        self._checked = False
        self._refreshes = 0

    # -- the operator; subclasses change these three for convolutions ------------------
    def _init_vectors(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        g = torch.Generator(device="cpu").manual_seed(0x5EED)
        u = torch.randn(weight.shape[0], generator=g, dtype=weight.dtype)
        v = torch.randn(weight.shape[1], generator=g, dtype=weight.dtype)
        return u.to(weight.device), v.to(weight.device)

    def _matvec(self, weight: Tensor, v: Tensor) -> Tensor:
        return weight @ v

    def _rmatvec(self, weight: Tensor, u: Tensor) -> Tensor:
        return weight.t() @ u

    # -- power iteration -----------------------------------------------------------------
    @staticmethod
    def _fingerprint(weight: Tensor) -> tuple:
        # In-place optimizer updates bump _version; .to() and re-assignment change the
        # storage. Either means the weight is no longer the one (u, v) were refreshed for.
        return (weight.data_ptr(), weight._version, weight.dtype, weight.device)

    @torch.no_grad()
    def refresh(
        self, weight: Tensor, max_iterations: int | None = None, check: bool | None = None
    ) -> bool:
        """Refine ``(u, v)`` by warm-started Lanczos; return whether it converged.

        Lanczos runs on the Gram operator of the smaller side, ``W^T W`` from
        ``v_1 = W^T u / ||W^T u||`` (or ``W W^T`` from ``W v``). Its Krylov space holds
        every power iterate, and its top Ritz value converges far faster when the top
        singular values are close (wide layers): power iteration left 256-wide layers 5%
        under their norm while Adam moved the weights; see
        ``examples/benchmarks/check_spectral_bound.py``. Each step costs one product with
        ``W`` and one with ``W^T``, as a power step does; the basis is re-orthogonalised in
        full at every step and restarted from the Ritz vector every 32 steps. Iteration
        stops once the relative change of ``sigma`` is below the tolerance, or when the
        Krylov space is invariant or fills the space. The first step is exactly a power
        step: when it already meets the tolerance nothing is committed, so refreshing a
        converged state leaves the buffers bit-for-bit unchanged. Dense layers with a side
        of at most 8 are solved exactly instead (always converged).

        A warm start nearly orthogonal to the top singular vector (the weight jumped, or
        two singular values crossed) can stall at the *second* value, which the stopping
        rule cannot tell from convergence: float32 layers stopped 3% under the norm. With
        ``check`` (default: in evaluation mode) a converged refresh is then checked by
        :meth:`complement_sigma`, Lanczos from a fixed random start on the complement of
        the top vector found; a larger value there restarts the refresh from it.
        """
        weight = weight.detach()
        u, v = self._buffers["u"], self._buffers["v"]
        if self._exact_ok and min(u.numel(), v.numel()) <= _EXACT_MAX_SIDE:
            self._exact(weight)
            return True
        if max_iterations is None:
            max_iterations = self.n_power_iterations if self.training else self.max_eval_iterations
        tol = self.tol if self.tol is not None else default_power_tolerance(weight.dtype)
        if self._on_host(weight):
            sigma = float(u.numpy() @ (weight.numpy() @ v.numpy()))
        else:
            sigma = float(torch.dot(u, self._matvec(weight, v)))
        check = (not self.training) if check is None else check
        converged = False
        for _ in range(_CHECK_RESTARTS + 1):
            while max_iterations > 0 and not converged:
                # restarted from the Ritz vector every _LANCZOS_BASIS steps: bounded memory
                steps = min(max_iterations, _LANCZOS_BASIS)
                sigma, converged = self._lanczos(weight, steps, sigma, tol)
                max_iterations -= steps
            if not (converged and check):
                break
            other, found = self.complement_sigma(weight, tol)
            if found is None or other <= sigma * (1 + tol):
                break
            # a false convergence: the complement holds a larger value; go on from there
            self._commit(weight, found, self.v.numel() <= self.u.numel())
            sigma, converged = other, False
            max_iterations = max(max_iterations, _LANCZOS_BASIS)
        return converged

    @torch.no_grad()
    def complement_sigma(self, weight: Tensor, tol: float) -> tuple[float, Tensor | None]:
        """The largest norm of the layer on the complement of its current top vector.

        Lanczos (at most ``_CHECK_STEPS`` steps) on ``P G P``, with ``G`` the Gram operator
        of the smaller side and ``P`` the projection off the stored top vector ``x``,
        from a fixed pseudo-random start: when ``x`` is the top singular vector the
        answer is at most the second singular value; a larger answer than the stored
        estimate proves the refresh stopped short. Returns ``(sigma, vector)``, the Ritz
        value's square root and its unit vector (``None`` for a one-dimensional side).
        """
        weight = weight.detach()
        u, v = self._buffers["u"], self._buffers["v"]
        on_inputs = v.numel() <= u.numel()
        x = _normalize(v if on_inputs else u)
        n = x.numel()
        if n <= 1:
            return 0.0, None
        g = torch.Generator(device="cpu").manual_seed(0xC0C4EC)
        start = torch.randn(n, generator=g, dtype=x.dtype).to(x.device)
        if self._on_host(weight):
            # numpy views, as in _lanczos: a step is a few tiny products, where torch's
            # per-operation dispatch would cost more than the arithmetic
            w, x, start = weight.numpy(), x.numpy(), start.numpy()
            if on_inputs:
                operator = lambda q: w.T @ (w @ q)  # noqa: E731
            else:
                operator = lambda q: w @ (w.T @ q)  # noqa: E731
        elif on_inputs:
            operator = lambda q: self._rmatvec(weight, self._matvec(weight, q))  # noqa: E731
        else:
            operator = lambda q: self._matvec(weight, self._rmatvec(weight, q))  # noqa: E731

        def gram(q: Any) -> Any:
            z = operator(q - x * (x @ q))
            return z - x * (x @ z)

        start = start - x * (x @ start)
        if isinstance(start, np.ndarray):
            basis = np.empty((min(_CHECK_STEPS, n - 1) + 1, n), dtype=start.dtype)
            basis[0] = start / max(float(np.sqrt(start @ start)), 1e-12)
        else:
            basis = start.new_empty((min(_CHECK_STEPS, n - 1) + 1, n))
            basis[0] = _normalize(start)
        floor = 16 * torch.finfo(weight.dtype).eps
        sigma, _, ritz = _lanczos_iteration(gram, basis, 0.0, tol, floor)
        if ritz is None:
            return sigma, None
        k = ritz.shape[0]
        if isinstance(basis, np.ndarray):
            top = torch.from_numpy(basis[:k].T @ ritz.astype(basis.dtype))
        else:
            top = basis[:k].t() @ torch.from_numpy(ritz).to(basis)
        return sigma, _normalize(top.to(weight))

    def _exact(self, weight: Tensor) -> None:
        u, v = self._buffers["u"], self._buffers["v"]
        on_inputs = v.numel() <= u.numel()
        if weight.device.type == "cpu" and weight.dtype in _HOST_DTYPES:
            # all in float64 numpy: a handful of tiny products, where torch's per-operation
            # dispatch would cost more than the arithmetic
            w = weight.numpy().astype(np.float64)
            top = _top_gram_vector(w.T @ w if on_inputs else w @ w.T)
            other = w @ top if on_inputs else w.T @ top
            other /= max(float(np.sqrt(other @ other)), 1e-12)
            first, second = (v, u) if on_inputs else (u, v)
            first.copy_(torch.from_numpy(top))
            second.copy_(torch.from_numpy(other))
            return
        gram = weight.t() @ weight if on_inputs else weight @ weight.t()
        # float64 on the host: the matrix is at most 8 x 8
        vectors = np.linalg.eigh(gram.detach().to("cpu", torch.float64).numpy())[1]
        top = torch.from_numpy(np.ascontiguousarray(vectors[:, -1])).to(weight)
        self._commit(weight, top, on_inputs)

    def _lanczos(self, weight: Tensor, steps: int, sigma: float, tol: float) -> tuple[float, bool]:
        # Run on the Gram operator of the smaller side (W^T W on inputs or W W^T on
        # outputs): a 32 x 2 layer then needs at most two steps.
        u, v = self._buffers["u"], self._buffers["v"]
        on_inputs = v.numel() <= u.numel()
        floor = 16 * torch.finfo(weight.dtype).eps
        if self._on_host(weight):
            # A dense layer on the CPU: the same iteration on numpy views of the tensors,
            # whose per-operation overhead is a fraction of torch's (a 256-wide step took
            # ~150 us in torch, mostly dispatch).
            w = weight.numpy()
            if on_inputs:
                start = w.T @ u.numpy()

                def gram(q: Any) -> Any:
                    return w.T @ (w @ q)
            else:
                start = w @ v.numpy()

                def gram(q: Any) -> Any:
                    return w @ (w.T @ q)

            basis = np.empty((min(steps, start.size) + 1, start.size), dtype=start.dtype)
            basis[0] = start / max(float(np.sqrt(start @ start)), 1e-12)
        else:
            if on_inputs:
                start = self._rmatvec(weight, u)

                def gram(q: Any) -> Any:
                    return self._rmatvec(weight, self._matvec(weight, q))
            else:
                start = self._matvec(weight, v)

                def gram(q: Any) -> Any:
                    return self._matvec(weight, self._rmatvec(weight, q))

            basis = start.new_empty((min(steps, start.numel()) + 1, start.numel()))
            basis[0] = _normalize(start)
        sigma, converged, ritz = _lanczos_iteration(gram, basis, sigma, tol, floor)
        if ritz is None:
            return sigma, True  # the first step met the tolerance: commit nothing
        k = ritz.shape[0]
        if isinstance(basis, np.ndarray):
            # the pair in numpy too, then two copies into the buffers
            top = basis[:k].T @ ritz.astype(basis.dtype)
            top /= max(float(np.sqrt(top @ top)), 1e-12)
            other = w @ top if on_inputs else w.T @ top
            other /= max(float(np.sqrt(other @ other)), 1e-12)
            first, second = (v, u) if on_inputs else (u, v)
            first.copy_(torch.from_numpy(top))
            second.copy_(torch.from_numpy(other))
            return sigma, converged
        top = basis[:k].t() @ torch.from_numpy(ritz).to(weight)
        self._commit(weight, _normalize(top), on_inputs)
        return sigma, converged

    def _on_host(self, weight: Tensor) -> bool:
        # a dense layer on the CPU: numpy views of the tensors, whose per-operation
        # overhead is a fraction of torch's
        return (
            self._exact_ok
            and weight.device.type == "cpu"
            and weight.dtype in _HOST_DTYPES
            and weight.numel() <= _HOST_MAX_NUMEL
        )

    def _commit(self, weight: Tensor, top: Tensor, on_inputs: bool) -> None:
        """Store the top singular pair from the unit top vector of the smaller side."""
        if on_inputs:
            self.v.copy_(top)
            self.u.copy_(_normalize(self._matvec(weight, top)))
        else:
            self.u.copy_(top)
            self.v.copy_(_normalize(self._rmatvec(weight, top)))

    def sigma(self, weight: Tensor) -> Tensor:
        """The current estimate ``u^T W v`` (differentiable in ``weight``)."""
        buffers = self._buffers  # not ``self.u``: Module.__getattr__ costs a failed lookup
        return torch.dot(buffers["u"], self._matvec(weight, buffers["v"]))

    @staticmethod
    def _snapshot(weight: Tensor) -> Tensor:
        if torch.jit.is_tracing():
            # a trace would record the copy; nothing writes the weights while it runs, and
            # outside the trace this marker never matches a weight
            return _TRACED
        return weight.detach().clone()

    def _changed(self, weight: Tensor) -> bool:
        if self._fingerprint(weight) != self._seen or self._weight_seen is None:
            return True
        # writes through ``p.data`` (Pyro's ClippedAdam) leave the version counter alone:
        # compare the values too
        if torch.jit.is_tracing():
            # a trace cannot read values; nothing writes the weights while it runs
            return False
        if self._weight_seen is _TRACED:
            return True
        # exact comparison: a permutation of entries through ``p.data`` keeps the sum and
        # the norm but can change the operator norm
        return not torch.equal(weight.detach(), self._weight_seen)

    def _needs_refresh(self, weight: Tensor) -> bool:
        if self._changed(weight):
            return True
        # evaluation tops up a capped training refresh and checks an unchecked one, once
        return not self.training and not (self._converged and self._checked)

    def _mark_seen(self, weight: Tensor) -> None:
        # plain attributes written straight into __dict__: Module.__setattr__ (several
        # isinstance tests per write) cost more than a thin layer's whole refresh
        self.__dict__.update(_seen=self._fingerprint(weight), _weight_seen=self._snapshot(weight))

    def forward(self, weight: Tensor) -> Tensor:
        if self.training and torch.jit.is_tracing():
            # a trace would freeze the refresh (a data-dependent loop, partly in numpy):
            # as the weights train, the bound would silently go stale
            raise RuntimeError(
                "a spectrally normalised layer cannot be traced in training mode: its "
                "norm refresh is a data-dependent loop that a trace would freeze, and the "
                "Lipschitz bound would go stale as the weights change; trace an eval-mode "
                "module (frozen weights) or train with Trace_ELBO instead of JitTrace_ELBO"
            )
        # Evaluation tops up, once, a training-mode refresh that stopped at its cap, and
        # checks it against a false convergence; after that the layer is fixed until the
        # weight changes, converged or not.
        if self._needs_refresh(weight):
            # two threads may meet a changed weight at once: one refreshes the vectors in
            # place, the other waits and then finds them fresh (a half-written u or v
            # would give a wrong sigma and a broken bound)
            with _REFRESH_LOCK:
                if self._needs_refresh(weight):
                    # after a load the buffers could not vouch for, refresh to convergence
                    # in every mode: a capped training refresh from vectors of another
                    # weight may stop short of the norm
                    cap = self.max_eval_iterations if self._full_refresh else None
                    count = self._refreshes + 1
                    check = self._full_refresh or not self.training or count % _CHECK_EVERY == 0
                    converged = self.refresh(weight, cap, check)
                    self.__dict__.update(
                        _full_refresh=False,
                        _converged=converged or not self.training,
                        _checked=check,
                        _refreshes=count,
                    )
                    self._mark_seen(weight)
                    self._buffers["fresh"].fill_(True)
        scale = torch.clamp(self.sigma(weight) / self.lipschitz, min=1.0)
        return weight / scale

    def mark_state(self, weight: Tensor) -> None:
        """Reconcile the refresh bookkeeping with a state dict just loaded.

        The loaded ``(u, v)`` are trusted only for the exact weight they were saved with
        (same digest): then the model refreshes exactly when the original would have. Any
        other weight (averaged or edited state dicts, buffers from another run, a
        checkpoint without the digest) is refreshed to convergence at its first use, in
        training mode too, so ``Lip <= c`` holds whatever was loaded.
        """
        saved = self.weight_digest.cpu()
        # compared at the buffer's precision (a .float() module keeps it in float32)
        genuine = bool(torch.isfinite(saved).all()) and torch.equal(
            saved, _weight_digest(weight, self.u, self.v).to(saved.dtype)
        )
        if genuine and bool(self.fresh):
            self._mark_seen(weight)
        else:
            self._seen, self._weight_seen = None, None
        self._full_refresh = not genuine
        self._converged = False

    def note_saving(self, weight: Tensor) -> None:
        """Record in ``fresh`` whether (u, v) match the weight being saved, and its digest."""
        self.fresh.fill_(not self._changed(weight))
        self.weight_digest.copy_(_weight_digest(weight, self.u, self.v))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        key = prefix + "weight_digest"
        if key not in state_dict:
            # a checkpoint from before the digest: load it, but do not trust its (u, v)
            state_dict[key] = torch.full_like(self.weight_digest, math.nan)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # the fingerprint names a tensor of this process; a copy's owner re-marks it
        state = dict(self.__dict__)
        state["_seen"], state["_weight_seen"] = None, None
        return state

    def extra_repr(self) -> str:
        return f"lipschitz={self.lipschitz}, n_power_iterations={self.n_power_iterations}"


class ConvSpectralNormScale(SpectralNormScale):
    """The same parametrization for a 2-D convolution, normed as an operator.

    The norm of a ``k x k`` convolution is *not* the norm of its reshaped kernel; power
    iteration runs on the convolution itself (``conv2d`` and ``conv_transpose2d`` over the
    input shape), as Residual Flows do: for a kernel ``K`` and inputs of ``input_shape``,

    .. math::

        \\sigma(K) = \\max_{\\|x\\| = 1} \\|K \\star x\\| .

    Arguments:
        weight: the kernel ``(out, in, k, k)``.
        lipschitz: the bound ``c``.
        input_shape: ``(C, H, W)`` of the layer's input.
        stride: the convolution's stride.
        padding: the convolution's padding.
        **kwargs: passed to :class:`SpectralNormScale`.

    Example:
        A 3 x 3 box filter on 6 x 6 zero-padded images has norm ``(1 + 2 cos(pi / 7))^2``,
        while its kernel reshaped to a ``1 x 9`` matrix has norm 3:

        >>> import torch
        >>> kernel = torch.ones(1, 1, 3, 3)
        >>> sn = ConvSpectralNormScale(kernel, 1.0, input_shape=(1, 6, 6), padding=1)
        >>> scaled = sn(kernel)   # refreshes the estimate, then rescales
        >>> round(float(sn.sigma(kernel)), 3), round((1 + 2 * math.cos(math.pi / 7)) ** 2, 3)
        (7.851, 7.851)
        >>> round(float(torch.linalg.matrix_norm(kernel.reshape(1, 9), ord=2)), 3)
        3.0
        >>> round(float(sn.sigma(scaled)), 3)
        1.0
    """

    _exact_ok = False  # the operator is the convolution, not its kernel matrix

    def __init__(
        self,
        weight: Tensor,
        lipschitz: float,
        input_shape: Sequence[int],
        stride: int = 1,
        padding: int = 0,
        **kwargs: object,
    ) -> None:
        self.input_shape = tuple(int(s) for s in input_shape)
        self.stride = int(stride)
        self.padding = int(padding)
        super().__init__(weight, lipschitz, **kwargs)  # type: ignore[arg-type]

    def _init_vectors(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        g = torch.Generator(device="cpu").manual_seed(0x5EED)
        v = torch.randn(self.input_shape, generator=g, dtype=weight.dtype).to(weight.device)
        with torch.no_grad():
            out = self._conv(weight, v)
        self.output_shape = tuple(out.shape)
        k = weight.shape[-1]
        # output_padding recovers the exact input size when the stride drops pixels.
        self.output_padding = tuple(
            n - ((m - 1) * self.stride - 2 * self.padding + k)
            for n, m in zip(self.input_shape[1:], self.output_shape[1:])
        )
        return torch.randn_like(out).flatten(), v.flatten()

    def _conv(self, weight: Tensor, v: Tensor) -> Tensor:
        return F.conv2d(v.unsqueeze(0), weight, stride=self.stride, padding=self.padding)[0]

    def _matvec(self, weight: Tensor, v: Tensor) -> Tensor:
        return self._conv(weight, v.view(self.input_shape)).flatten()

    def _rmatvec(self, weight: Tensor, u: Tensor) -> Tensor:
        out = F.conv_transpose2d(
            u.view(1, *self.output_shape),
            weight,
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
        )
        return out.flatten()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", input_shape={self.input_shape}"


def _note_saving(name: str, mod: nn.Module, prefix: str, keep_vars: bool) -> None:
    plist = mod.parametrizations[name]
    plist[0].note_saving(plist.original)


def _mark_loaded(name: str, mod: nn.Module, incompatible: object) -> None:
    plist = mod.parametrizations[name]
    plist[0].mark_state(plist.original)


_OWNER_HOOKS = (_note_saving, _mark_loaded)


def _owner_hooks(module: nn.Module, name: str) -> None:
    # module-level functions, not closures: the hooks travel with a pickled module
    module.register_state_dict_pre_hook(functools.partial(_note_saving, name))
    module.register_load_state_dict_post_hook(functools.partial(_mark_loaded, name))


def _reduce_parametrized(module: nn.Module, protocol: int) -> tuple:
    """``__reduce_ex__`` of a spectrally normalised layer (pickle, ``torch.save``, deepcopy).

    :mod:`torch.nn.utils.parametrize` swaps the layer's class for a generated one that
    refuses to pickle. The layer is stored instead as its plain class, its other state,
    and per parametrized tensor the original parameter and the parametrizations, which
    :func:`_rebuild_parametrized` registers again. Whether the power-iteration vectors
    matched the weight travels too, so the copy computes exactly what the original does.
    """
    state = dict(module.__dict__)
    modules = state["_modules"].copy()
    plists = modules.pop("parametrizations")
    state["_modules"] = modules
    for key in ("_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
        # ours are registered afresh on rebuilding (hook ids are per process)
        state[key] = type(state[key])(
            (k, h) for k, h in state[key].items() if getattr(h, "func", None) not in _OWNER_HOOKS
        )
    specs = []
    for name, plist in plists.items():
        marks = [
            (not p._changed(plist.original), p._converged)
            if isinstance(p, SpectralNormScale)
            else (False, False)
            for p in plist
        ]
        specs.append((name, list(plist), plist.original, bool(plist.unsafe), marks))
    return _rebuild_parametrized, (type(module).__bases__[0], state, specs)


def _rebuild_parametrized(base: type, state: dict[str, Any], specs: list[tuple]) -> nn.Module:
    """Inverse of :func:`_reduce_parametrized`."""
    module = base.__new__(base)
    module.__setstate__(state)
    for name, params, original, unsafe, marks in specs:
        if isinstance(original, nn.Parameter):
            module.register_parameter(name, original)
        else:
            module.register_buffer(name, original)
        # registering runs the parametrization once (torch checks its output's shape),
        # which refreshes a weight the copy has not seen: a capped step further for an
        # unconverged state, one refresh on in the check schedule. Put back what came.
        keys = ("_seen", "_weight_seen", "_converged", "_full_refresh", "_checked", "_refreshes")
        kept = [
            (p.u.clone(), p.v.clone(), p.fresh.clone(), {k: getattr(p, k) for k in keys})
            if isinstance(p, SpectralNormScale)
            else None
            for p in params
        ]
        for p in params:
            parametrize.register_parametrization(module, name, p, unsafe=unsafe)
        plist = module.parametrizations[name]
        for p, (fresh, converged), saved in zip(plist, marks, kept):
            if saved is not None:
                p.u.copy_(saved[0])
                p.v.copy_(saved[1])
                p.fresh.copy_(saved[2])
                p.__dict__.update(saved[3])
            if fresh:
                p._mark_seen(plist.original)
                p._converged = converged
        if isinstance(plist[0], SpectralNormScale):
            _owner_hooks(module, name)
    _make_picklable(module)
    return module


def _make_picklable(module: nn.Module) -> None:
    """Let a parametrized layer pickle, deep-copy and cross process boundaries.

    Its class is the one :mod:`~torch.nn.utils.parametrize` generated for it alone, so
    changing the class changes no other module.
    """
    cls = type(module)
    cls.__reduce_ex__ = _reduce_parametrized  # type: ignore[method-assign, assignment]
    # deepcopy then goes through the same reduction (one code path for every copy)
    if "__deepcopy__" in cls.__dict__:
        del cls.__deepcopy__


def spectral_norm(
    module: nn.Module,
    lipschitz: float = 0.9,
    *,
    name: str = "weight",
    input_shape: Sequence[int] | None = None,
    **kwargs: object,
) -> nn.Module:
    """Constrain ``module``'s operator norm to at most ``lipschitz`` (in place; returns it).

    Arguments:
        module: an :class:`~torch.nn.Linear` or :class:`~torch.nn.Conv2d`.
        lipschitz: the bound ``c`` on the layer's operator norm.
        name: the parameter to constrain.
        input_shape: ``(C, H, W)`` of a convolution's input (required for convolutions).
        **kwargs: ``n_power_iterations``, ``max_eval_iterations``, ``tol``.

    Returns:
        The same module, with ``module.weight`` now the normalised weight.

    Example:
        >>> import torch
        >>> conv = spectral_norm(torch.nn.Conv2d(2, 2, 3, padding=1), 0.7, input_shape=(2, 5, 5))
        >>> conv(torch.randn(1, 2, 5, 5)).shape
        torch.Size([1, 2, 5, 5])
    """
    weight = getattr(module, name)
    if isinstance(module, nn.Conv2d):
        if input_shape is None:
            raise ValueError("spectral_norm of a Conv2d needs input_shape=(C, H, W)")
        if module.padding_mode != "zeros" or module.dilation != (1, 1) or module.groups != 1:
            raise ValueError("spectral_norm supports zero-padded, undilated, ungrouped convs")
        param = ConvSpectralNormScale(
            weight,
            lipschitz,
            input_shape,
            stride=module.stride[0],
            padding=module.padding[0],
            **kwargs,
        )
    elif weight.dim() == 2:
        param = SpectralNormScale(weight, lipschitz, **kwargs)  # type: ignore[arg-type]
    else:
        raise ValueError(f"spectral_norm expects a Linear or Conv2d, got {type(module).__name__}")
    parametrize.register_parametrization(module, name, param)
    _owner_hooks(module, name)
    _make_picklable(module)
    return module


def operator_norm(module: nn.Module) -> Tensor:
    """The spectral norm of a (spectrally normalised) layer's current weight, by SVD.

    .. math::

        \\|W\\|_2 = \\sigma_{\\max}(W) = \\max_{\\|v\\| = 1} \\|W v\\|

    For tests and diagnostics; convolutions report their power-iteration estimate.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 2)
        >>> layer.weight.data = torch.tensor([[3.0, 0.0], [0.0, -4.0]])
        >>> float(operator_norm(layer))
        4.0
        >>> round(float(operator_norm(spectral_norm(layer, lipschitz=0.5))), 6)
        0.5
    """
    weight = module.weight
    plist = getattr(module, "parametrizations", None)
    if plist is not None and isinstance(plist["weight"][0], ConvSpectralNormScale):
        sn = plist["weight"][0]
        sn.refresh(weight, max_iterations=2000, check=True)
        return sn.sigma(weight)
    return torch.linalg.matrix_norm(weight.detach(), ord=2)
