"""Estimators of ``log det(I + J_g(x))`` for a residual branch with ``Lip(g) < 1``.

Every estimator takes a vector-Jacobian product ``vjp(v) = v^T J_g(x)`` (batched over the
samples; an extra leading dimension of ``v`` is a batch of probes) rather than a network,
and returns one value per sample. With ``Lip(g) < 1`` the eigenvalues of ``J_g`` lie in
the unit disc, ``det(I + J_g) > 0`` and

.. math::

    \\log\\det(I + J_g) = \\sum_{k=1}^{\\infty} \\frac{(-1)^{k+1}}{k}\\,\\mathrm{tr}(J_g^k),
    \\qquad \\mathrm{tr}(J_g^k) = \\mathbb{E}_v\\big[v^\\top J_g^k v\\big]

for probes with ``E[v v^T] = I`` (Hutchinson). ``logdet_series`` truncates the series
(biased, see :func:`series_truncation_bound`); ``logdet_roulette`` draws a random number
of extra terms and reweights them (unbiased "Russian roulette", Chen et al. 2019);
``logdet_exact`` forms the Jacobian with ``D`` batched vector-Jacobian products;
``logdet_from_jacobian`` takes a Jacobian the network already carried forward
(:meth:`~pyro_invres.nn.LipschitzMLP.forward_with_jacobian`), which is cheaper to
differentiate.

All are differentiable when the vjp is built with ``create_graph=True``.

An i-ResNet block chooses among them through a small typed object that carries the
estimator's own options: :class:`Exact`, :class:`Series` (terms, probes, probe kind,
gradient mode), :class:`Roulette` (exact terms, law of the extra terms and its parameter,
probes, probe kind, gradient mode) or :class:`Auto` (exact up to a dimension, a stochastic
estimator above). Each object checks its options when built; the block checks that it
applies (an ``Auto`` whose stochastic options could never be used is an error).

References:
    [1] Behrmann et al., *Invertible Residual Networks*, ICML 2019. arXiv:1811.00995
    [2] Chen et al., *Residual Flows for Invertible Generative Modeling*, NeurIPS 2019.
        arXiv:1906.02735
    [3] Hutchinson, *A stochastic estimator of the trace of the influence matrix*, 1989.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

__all__ = [
    "Auto",
    "Exact",
    "LogdetName",
    "Roulette",
    "Series",
    "make_vjp",
    "logdet_exact",
    "logdet_from_jacobian",
    "logdet_series",
    "logdet_roulette",
    "roulette_tail_probability",
    "series_truncation_bound",
    "sample_probes",
    "PROBES",
    "ROULETTE_DISTRIBUTIONS",
]

PROBES = ("gaussian", "rademacher")
ROULETTE_DISTRIBUTIONS = ("geometric", "poisson")
Vjp = Callable[[Tensor], Tensor]
#: the string shorthands a block accepts for its log-det estimator
LogdetName = Literal["auto", "exact", "series", "roulette"]
Probe = Literal["gaussian", "rademacher"]
#: how a stochastic log-det is differentiated (see :class:`Series`)
Gradient = Literal["neumann", "backprop", "forward"]
GRADIENTS = ("neumann", "backprop", "forward")


def _count(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


@dataclass(frozen=True)
class Exact:
    """The exact log-det: the full Jacobian (``D`` vector-Jacobian products, or carried).

    Deterministic and always back-propagated; costs grow with ``D``, so it suits small
    events. The string ``"exact"`` stands for it.

    Example:
        >>> Exact().name
        'exact'
    """

    name: ClassVar[str] = "exact"


@dataclass(frozen=True)
class Series:
    """The truncated power series with Hutchinson probes (biased by the truncation).

    Attributes:
        n_terms: terms of the series.
        n_probes: Hutchinson probes per sample.
        probe: ``"gaussian"`` or ``"rademacher"``.
        gradient: ``"neumann"`` (default): the Neumann-series gradient, memory flat in
            the number of terms; ``"backprop"``: through every term; ``"forward"``: the
            Neumann gradient computed in the forward pass and its graph freed at once
            (lowest peak memory). The value is always the estimate, never a surrogate.

    Example:
        >>> Series(n_terms=5, probe="rademacher").n_terms
        5
        >>> Series(probe="uniform")
        Traceback (most recent call last):
        ...
        ValueError: unknown probe 'uniform'; expected one of ('gaussian', 'rademacher')
    """

    name: ClassVar[str] = "series"
    n_terms: int = 10
    n_probes: int = 1
    probe: Probe = "gaussian"
    gradient: Gradient = "neumann"

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_terms", _count("n_terms", self.n_terms, 1))
        object.__setattr__(self, "n_probes", _count("n_probes", self.n_probes, 1))
        _one_of("probe", self.probe, PROBES)
        _one_of("gradient", self.gradient, GRADIENTS)


@dataclass(frozen=True)
class Roulette:
    """The unbiased Russian-roulette estimator (Chen et al. 2019).

    Attributes:
        n_exact_terms: terms always computed.
        distribution: ``"geometric"`` or ``"poisson"``, the law of the extra terms.
        param: ``p`` of the geometric law (in ``(0, 1)``) or ``lambda`` of the Poisson.
        n_probes: Hutchinson probes per sample.
        probe: ``"gaussian"`` or ``"rademacher"``.
        gradient: as for :class:`Series`.

    Example:
        >>> Roulette(n_exact_terms=4, distribution="poisson", param=2.0).param
        2.0
        >>> Roulette(param=1.5)
        Traceback (most recent call last):
        ...
        ValueError: param (geometric p) must lie in (0, 1), got 1.5
    """

    name: ClassVar[str] = "roulette"
    n_exact_terms: int = 2
    distribution: Literal["geometric", "poisson"] = "geometric"
    param: float = 0.5
    n_probes: int = 1
    probe: Probe = "gaussian"
    gradient: Gradient = "neumann"

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_exact_terms", _count("n_exact_terms", self.n_exact_terms, 0))
        object.__setattr__(self, "n_probes", _count("n_probes", self.n_probes, 1))
        _one_of("distribution", self.distribution, ROULETTE_DISTRIBUTIONS)
        _one_of("probe", self.probe, PROBES)
        _one_of("gradient", self.gradient, GRADIENTS)
        param = float(self.param)
        if self.distribution == "geometric" and not 0.0 < param < 1.0:
            raise ValueError(f"param (geometric p) must lie in (0, 1), got {self.param}")
        if self.distribution == "poisson" and not (param > 0.0 and math.isfinite(param)):
            raise ValueError(f"param (poisson lambda) must be > 0, got {self.param}")
        object.__setattr__(self, "param", param)


@dataclass(frozen=True)
class Auto:
    """:class:`Exact` up to ``max_exact_dim`` event dimensions, ``otherwise`` above.

    A block resolves it once, from its event shape: an ``otherwise`` estimator other than
    the default cannot apply to a block that resolves to exact, and the block says so.

    Attributes:
        max_exact_dim: the largest ``D`` for which the log-det is exact.
        otherwise: the stochastic estimator above it (default :class:`Roulette`).

    Example:
        >>> Auto().resolve(2)
        Exact()
        >>> Auto(otherwise=Series(n_terms=4)).resolve(100).n_terms
        4
    """

    name: ClassVar[str] = "auto"
    max_exact_dim: int = 16
    otherwise: Series | Roulette = field(default_factory=Roulette)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_exact_dim", _count("max_exact_dim", self.max_exact_dim, 0))
        if not isinstance(self.otherwise, (Series, Roulette)):
            raise ValueError(
                "Auto(otherwise=...) must be a Series or Roulette estimator, "
                f"got {self.otherwise!r}"
            )

    def resolve(self, dim: int) -> Exact | Series | Roulette:
        """The estimator for an event of ``dim`` dimensions."""
        return Exact() if dim <= self.max_exact_dim else self.otherwise


#: a log-det estimator object
Estimator = Exact | Series | Roulette | Auto
ESTIMATOR_TYPES = (Exact, Series, Roulette, Auto)
_ESTIMATORS: dict[str, type] = {
    "auto": Auto,
    "exact": Exact,
    "series": Series,
    "roulette": Roulette,
}


def as_estimator(logdet: object) -> Estimator:
    """An estimator object from an object or its string shorthand (a clear error otherwise)."""
    if isinstance(logdet, (Exact, Series, Roulette, Auto)):
        return logdet
    if isinstance(logdet, str) and logdet in _ESTIMATORS:
        return _ESTIMATORS[logdet]()
    raise ValueError(
        f"unknown logdet {logdet!r}; expected one of {tuple(_ESTIMATORS)} or an "
        "Exact/Series/Roulette/Auto object"
    )


def make_vjp(x: Tensor, gx: Tensor, create_graph: bool) -> Vjp:
    """``v -> v^T dgx/dx``; a ``v`` with one more leading dimension is a batch of probes.

    .. math::

        \\mathrm{vjp}(v) = v^\\top J_g(x), \\qquad J_g(x) = \\frac{\\partial g(x)}{\\partial x}

    ``gx`` must have been computed from ``x`` with the graph on.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 2.0]], requires_grad=True)
        >>> vjp = make_vjp(x, 0.5 * x**2, create_graph=False)   # J = diag(x)
        >>> vjp(torch.tensor([[3.0, 1.0]]))
        tensor([[3., 2.]])
        >>> vjp(torch.ones(4, 1, 2)).shape   # a batch of 4 probes
        torch.Size([4, 1, 2])
    """

    def vjp(v: Tensor) -> Tensor:
        batched = v.dim() > gx.dim()
        if batched and v.shape[0] == 1:
            # one probe: a plain backward, without the vmap that batching costs
            return vjp(v[0]).unsqueeze(0)
        (out,) = torch.autograd.grad(
            gx, x, v, retain_graph=True, create_graph=create_graph, is_grads_batched=batched
        )
        return out

    return vjp


def _wide(jac: Tensor) -> Tensor:
    """``jac`` in at least float32 (a differentiable cast; a no-op otherwise).

    torch's LU has no float16 or bfloat16 kernels, and in those types ``1 + J`` keeps
    only 2-3 digits of ``J``: the log-determinant is formed in float32 and cast back.
    """
    return jac.float() if torch.finfo(jac.dtype).bits < 32 else jac


def _event_sum(t: Tensor, event_dim: int) -> Tensor:
    if event_dim == 1:
        return t.sum(-1)
    return t.flatten(start_dim=t.dim() - event_dim).sum(-1) if event_dim else t


def logdet_exact(vjp: Vjp, x: Tensor, event_dim: int = 1) -> Tensor:
    """``log det(I + J)`` from the full Jacobian (``D`` vector-Jacobian products).

    Arguments:
        vjp: see :func:`make_vjp`.
        x: the point, ``batch_shape + event_shape`` (used for shapes only).
        event_dim: number of event dimensions.

    Returns:
        A tensor of shape ``batch_shape``.

    Example:
        >>> import torch
        >>> x = torch.randn(3, 2, requires_grad=True)
        >>> vjp = make_vjp(x, 0.5 * torch.tanh(x), create_graph=False)
        >>> logdet_exact(vjp, x).shape
        torch.Size([3])
    """
    batch_shape = x.shape[: x.dim() - event_dim]
    d = math.prod(x.shape[x.dim() - event_dim :])
    if d == 0 or math.prod(batch_shape) == 0:
        return x.new_zeros(batch_shape)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    probes = eye.reshape(d, *([1] * len(batch_shape)), *x.shape[x.dim() - event_dim :])
    probes = probes.expand(d, *x.shape)
    rows = vjp(probes).reshape(d, *batch_shape, d)  # rows[i] = e_i^T J
    jac = _wide(rows.movedim(0, -2))
    return torch.linalg.slogdet(jac + eye.to(jac.dtype)).logabsdet.to(x.dtype)


def logdet_from_jacobian(jac: Tensor) -> Tensor:
    """``log|det(I + J)|`` for a batch of square Jacobians ``J`` shaped ``(..., D, D)``.

    One and two dimensions use the closed forms, which are a few elementwise operations
    (a batched LU factorisation costs more than the whole network at ``D = 2``):

    .. math::

        \\log|1 + J_{11}|, \\qquad \\log|(1 + J_{11})(1 + J_{22}) - J_{12} J_{21}| ;

    larger ``D`` uses :func:`torch.linalg.slogdet`. float16 and bfloat16 Jacobians are
    evaluated in float32 and the value cast back.

    Example:
        >>> import torch
        >>> jac = torch.tensor([[[0.5, 0.2], [0.1, -0.3]]])
        >>> round(float(logdet_from_jacobian(jac)[0]), 6) == round(math.log(1.5 * 0.7 - 0.02), 6)
        True
    """
    d = jac.shape[-1]
    if jac.dim() < 2 or jac.shape[-2] != d:
        raise ValueError(f"expected square Jacobians (..., D, D), got shape {tuple(jac.shape)}")
    dtype, jac = jac.dtype, _wide(jac)
    if d == 1:
        return torch.log(torch.abs(1 + jac[..., 0, 0])).to(dtype)
    if d == 2:
        a, b = 1 + jac[..., 0, 0], jac[..., 0, 1]
        c, e = jac[..., 1, 0], 1 + jac[..., 1, 1]
        return torch.log(torch.abs(a * e - b * c)).to(dtype)
    eye = torch.eye(d, dtype=jac.dtype, device=jac.device)
    return torch.linalg.slogdet(jac + eye).logabsdet.to(dtype)


def sample_probes(
    x: Tensor, n_probes: int, kind: str = "gaussian", generator: torch.Generator | None = None
) -> Tensor:
    """``n_probes`` Hutchinson probes shaped like ``x`` (stacked on a new first dimension).

    Gaussian and Rademacher (``+-1``) probes both have

    .. math::

        \\mathbb{E}[v v^\\top] = I, \\qquad \\mathrm{tr}(A) = \\mathbb{E}[v^\\top A v] .

    Example:
        >>> import torch
        >>> x = torch.zeros(4, 3)
        >>> v = sample_probes(x, 2, "rademacher", generator=torch.Generator().manual_seed(0))
        >>> v.shape, bool((v.abs() == 1).all())
        (torch.Size([2, 4, 3]), True)
    """
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; expected one of {PROBES}")
    shape = (n_probes, *x.shape)
    v = torch.randn(shape, dtype=x.dtype, device=x.device, generator=generator)
    if kind == "rademacher":
        v = torch.sign(v)
        v[v == 0] = 1.0
    return v


def _series(
    vjp: Vjp,
    v: Tensor,
    coefficients: list[float],
    event_dim: int,
    graph_vjp: Vjp | None,
) -> Tensor:
    """``sum_k a_k v^T J^k v`` (mean over probes), with a Neumann gradient if asked.

    Without ``graph_vjp`` the terms are differentiated by back-propagation through every
    vector-Jacobian product (memory grows with the number of terms). With it, the powers
    are taken without a graph and the gradient comes from one differentiable product,

    .. math::

        \\nabla \\sum_k a_k v^\\top J^k v \\approx \\nabla \\big[ w^\\top J v \\big],
        \\qquad w^\\top = \\textstyle\\sum_k k\\, a_k\\, v^\\top J^{k-1} \\text{ held fixed},

    unbiased for the gradient of the log-det (Chen et al. 2019, eq. 8) and flat in memory.
    The value returned is the estimate itself, not the surrogate.
    """
    # The terms are accumulated as vectors, sum_k a_k v^T J^k, and dotted with v once at
    # the end: one operation per term instead of a product, a reduction and two scalings.
    w = vjp(v)
    weighted = coefficients[0] * w
    neumann = None
    if graph_vjp is not None:
        # graph-free powers (vjp builds no graph here): accumulated in place
        neumann = coefficients[0] * v
    for k, a in enumerate(coefficients[1:], start=2):
        if neumann is not None:
            neumann.add_(w, alpha=k * a)
        w = vjp(w)
        weighted = torch.add(weighted, w, alpha=a)
    value = _event_sum(weighted * v, event_dim).mean(0)
    if neumann is None:
        return value
    surrogate = _event_sum(graph_vjp(neumann) * v, event_dim).mean(0)
    return value.detach() + (surrogate - surrogate.detach())


def logdet_series(
    vjp: Vjp,
    x: Tensor,
    event_dim: int = 1,
    *,
    n_terms: int = 10,
    n_probes: int = 1,
    probe: str = "gaussian",
    generator: torch.Generator | None = None,
    graph_vjp: Vjp | None = None,
) -> Tensor:
    """The power series truncated after ``n_terms`` terms, traces by Hutchinson probes.

    Biased by at most :func:`series_truncation_bound` in expectation.

    Arguments:
        vjp: see :func:`make_vjp`.
        x: the point (for shapes and dtype).
        event_dim: number of event dimensions.
        n_terms: terms of the series.
        n_probes: Hutchinson probes per sample.
        probe: ``"gaussian"`` or ``"rademacher"``.
        generator: a random generator for the probes.
        graph_vjp: a differentiable vjp (``create_graph=True``); when given, ``vjp`` should
            be graph-free and the gradient is the memory-flat Neumann estimate.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> vjp = make_vjp(x, 0.3 * torch.sin(x), create_graph=False)
        >>> logdet_series(vjp, x, n_terms=5).shape
        torch.Size([4])
    """
    if n_terms < 1 or n_probes < 1:
        raise ValueError(f"n_terms and n_probes must be >= 1, got {n_terms}, {n_probes}")
    v = sample_probes(x, n_probes, probe, generator)
    coefficients = [(-1) ** (k + 1) / k for k in range(1, n_terms + 1)]
    return _series(vjp, v, coefficients, event_dim, graph_vjp)


def roulette_tail_probability(m: int, distribution: str, param: float) -> float:
    """``P(N >= m)`` for the number ``N`` of extra roulette terms.

    ``geometric``: ``P(N = n) = p (1 - p)^n`` on ``n = 0, 1, ...``, so ``P(N >= m) = (1-p)^m``.
    ``poisson``: ``N ~ Poisson(lambda)``.

    .. math::

        P_\\text{geom}(N \\ge m) = (1 - p)^m, \\qquad
        P_\\text{Poisson}(N \\ge m) = 1 - \\sum_{n < m} e^{-\\lambda} \\frac{\\lambda^n}{n!}

    Example:
        >>> roulette_tail_probability(3, "geometric", 0.5)
        0.125
        >>> round(roulette_tail_probability(1, "poisson", 2.0), 6) == round(1 - math.exp(-2), 6)
        True
        >>> roulette_tail_probability(0, "poisson", 2.0)   # the terms always computed
        1.0
    """
    if m <= 0:
        return 1.0
    if distribution == "geometric":
        return (1.0 - param) ** m
    if distribution == "poisson":
        cdf = sum(math.exp(-param) * param**n / math.factorial(n) for n in range(m))
        return max(1.0 - cdf, 1e-300)
    raise ValueError(
        f"unknown roulette distribution {distribution!r}; expected one of {ROULETTE_DISTRIBUTIONS}"
    )


def _sample_extra_terms(distribution: str, param: float, generator: torch.Generator | None) -> int:
    if distribution == "geometric":
        if not 0.0 < param < 1.0:
            raise ValueError(f"geometric roulette needs 0 < p < 1, got {param}")
        device = generator.device if generator is not None else None
        u = float(torch.rand((), generator=generator, device=device))
        return int(math.floor(math.log1p(-u) / math.log1p(-param)))
    if distribution == "poisson":
        if not param > 0:
            raise ValueError(f"poisson roulette needs lambda > 0, got {param}")
        device = generator.device if generator is not None else None
        rate = torch.tensor(float(param), device=device)
        return int(torch.poisson(rate, generator=generator))
    raise ValueError(
        f"unknown roulette distribution {distribution!r}; expected one of {ROULETTE_DISTRIBUTIONS}"
    )


def logdet_roulette(
    vjp: Vjp,
    x: Tensor,
    event_dim: int = 1,
    *,
    n_exact_terms: int = 2,
    distribution: str = "geometric",
    param: float = 0.5,
    n_probes: int = 1,
    probe: str = "gaussian",
    generator: torch.Generator | None = None,
    max_terms: int = 200,
    graph_vjp: Vjp | None = None,
) -> Tensor:
    """Unbiased Russian-roulette estimate of ``log det(I + J)``.

    .. math::

        \\widehat{\\log\\det} = \\sum_{k=1}^{n + N} \\frac{(-1)^{k+1}}{k}
        \\frac{v^\\top J^k v}{P(N \\ge k - n)}, \\qquad N \\sim \\text{Geom}(p)
        \\text{ or Poisson}(\\lambda)

    with ``n = n_exact_terms`` terms always computed. One ``N`` is drawn per call (shared
    by the batch); the expectation over ``N`` and the probes is the exact log-det when the
    series converges (``Lip(g) < 1``). ``max_terms`` caps a pathological draw; its
    probability is below ``P(N >= max_terms - n)`` (about 1e-60 for the default).
    Pass ``graph_vjp`` (and a graph-free ``vjp``) for the memory-flat Neumann gradient of
    :func:`logdet_series`.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> vjp = make_vjp(x, 0.3 * torch.sin(x), create_graph=False)
        >>> logdet_roulette(vjp, x).shape
        torch.Size([4])
    """
    if n_exact_terms < 0 or n_probes < 1:
        raise ValueError(
            f"need n_exact_terms >= 0 and n_probes >= 1, got {n_exact_terms}, {n_probes}"
        )
    extra = _sample_extra_terms(distribution, param, generator)
    n_terms = min(n_exact_terms + extra, max_terms)
    if n_terms == 0:
        return x.new_zeros(x.shape[: x.dim() - event_dim])
    v = sample_probes(x, n_probes, probe, generator)
    coefficients = [
        (-1) ** (k + 1) / k / roulette_tail_probability(k - n_exact_terms, distribution, param)
        for k in range(1, n_terms + 1)
    ]
    return _series(vjp, v, coefficients, event_dim, graph_vjp)


def series_truncation_bound(dim: int, lipschitz: float, n_terms: int) -> float:
    """Bound on ``|log det(I + J) - series truncated at n_terms|`` when ``||J|| <= c``.

    .. math::

        \\Big|\\sum_{k > n} \\frac{(-1)^{k+1}}{k}\\mathrm{tr}(J^k)\\Big|
        \\le \\sum_{k > n} \\frac{D c^k}{k} \\le \\frac{D\\,c^{n+1}}{(n+1)(1-c)}

    Example:
        >>> round(series_truncation_bound(2, 0.5, 10), 6)
        0.000178
    """
    return dim * lipschitz ** (n_terms + 1) / ((n_terms + 1) * (1.0 - lipschitz))
