"""The posteriors of ``bench_posteriors.py``: recognised Pyro models and the data they condition on.

Every model is a plain Pyro model with no arguments (its data bound in), written so that it
runs under vectorised particles (``Trace_ELBO(vectorize_particles=True)``) and under
Pyro's ``vectorized_importance_weights`` with ``max_plate_nesting = 1``. Each
:class:`PosteriorModel` lists its latent sites in a fixed order with their supports, so a
draw from any guide, a NUTS chain or the reference maps to the same unconstrained vector
(:func:`unconstrained`): the space autoguides work in, and the one every metric uses.

==========================  ===================================================================
``eight_schools_centered``  ``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(5)``, ``theta_j ~ N(mu, tau)``,
                            ``y_j ~ N(theta_j, sigma_j)`` (Rubin 1981; the standard data)
``eight_schools_noncentered`` the same with ``eta_j ~ N(0, 1)``, ``theta_j = mu + tau eta_j``
``funnel``                  Neal's funnel in 10-D: ``v ~ N(0, 3)``, ``x_1..9 | v ~ N(0, e^{v/2})``
``logistic``                Bayesian logistic regression on scikit-learn's breast cancer data
                            (569 x 30 features, standardised): ``w_k ~ N(0, 1)``, intercept
                            ``b ~ N(0, 1)``, ``y_n ~ Bernoulli(logit = x_n . w + b)``
``horseshoe``               sparse linear regression on scikit-learn's diabetes data (442 x 10,
                            features and target standardised), non-centred horseshoe
                            (Carvalho et al. 2010): ``tau ~ HalfCauchy(1)``,
                            ``lambda_k ~ HalfCauchy(1)``, ``z_k ~ N(0, 1)``,
                            ``beta_k = tau lambda_k z_k``, ``alpha ~ N(0, 1)``,
                            ``sigma ~ HalfNormal(1)``, ``y_n ~ N(alpha + x_n . beta, sigma)``
==========================  ===================================================================

The funnel's joint density integrates to one, so ``log Z = 0``; the eight schools' evidence
is a one-dimensional integral over ``tau`` (``mu`` and ``theta`` are Gaussian and integrate
out in closed form), computed by :func:`eight_schools_log_z` with quadrature. The "neck"
of a posterior is the direction whose scale a funnel hides: ``v`` for the funnel,
``log tau`` for the eight schools (and, for reference, the horseshoe's global ``log tau``).

Example:
    >>> spec = MODELS["funnel"]()
    >>> spec.dim, spec.names[:2]
    (10, ['v', 'x[0]'])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch.distributions import biject_to

#: the standard eight schools data (Rubin 1981; Gelman et al., BDA3, section 5.5)
SCHOOLS_Y = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
SCHOOLS_SIGMA = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)
FUNNEL_DIM = 10
#: every model has at most one plate: the particle plate of vectorised ELBOs goes outside it
MAX_PLATE_NESTING = 1


@dataclass
class PosteriorModel:
    """A model, its latent sites in a fixed order, and what is known about its posterior.

    Attributes:
        name: the key in :data:`MODELS`.
        model: the Pyro model (no arguments; data bound in).
        latents: ``(site, size, support)`` in a fixed order: the layout of the unconstrained
            vector.
        neck: unconstrained coordinates whose posterior scale the report follows.
        log_z: the exact log evidence, where known.
        description: one line for the tables and the JSON.
    """

    name: str
    model: Callable[[], None]
    latents: list[tuple[str, int, constraints.Constraint]]
    neck: list[str] = field(default_factory=list)
    log_z: float | None = None
    description: str = ""

    @property
    def dim(self) -> int:
        """The number of unconstrained latent dimensions."""
        return sum(size for _, size, _ in self.latents)

    @property
    def names(self) -> list[str]:
        """One name per unconstrained coordinate (``log_`` marks a log-transformed site)."""
        out = []
        for site, size, support in self.latents:
            label = site if support is constraints.real else f"log_{site}"
            out += [label] if size == 1 else [f"{label}[{i}]" for i in range(size)]
        return out


def unconstrained(spec: PosteriorModel, samples: dict[str, torch.Tensor]) -> torch.Tensor:
    """Draws of the latent sites (constrained, leading draw dimension) as ``(n, D)`` vectors.

    Works for MCMC output (``(n, *shape)``) and for vectorised guide traces, whose values
    carry the plate's singleton dimension (``(n, 1, *shape)``).

    Raises:
        ValueError: when a site is missing or has the wrong number of elements per draw.
    """
    parts = []
    for site, size, support in spec.latents:
        if site not in samples:
            raise ValueError(
                f"{spec.name}: no draws of latent site {site!r}; got {sorted(samples)}"
            )
        value = samples[site]
        n = value.shape[0]
        if value.numel() != n * size:
            raise ValueError(
                f"{spec.name}: site {site!r} should hold {size} value(s) per draw, got shape "
                f"{tuple(value.shape)} for {n} draws"
            )
        parts.append(biject_to(support).inv(value.reshape(n, size)))
    return torch.cat(parts, dim=-1)


# -- eight schools ------------------------------------------------------------------------------
def _schools() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(SCHOOLS_Y), torch.tensor(SCHOOLS_SIGMA)


def eight_schools_centered() -> PosteriorModel:
    """Centred eight schools: the funnel between ``tau`` and ``theta`` that makes NUTS diverge."""
    y, sigma = _schools()

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", len(y), dim=-1):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    return PosteriorModel(
        "eight_schools_centered",
        model,
        [
            ("mu", 1, constraints.real),
            ("tau", 1, constraints.positive),
            ("theta", 8, constraints.real),
        ],
        neck=["log_tau"],
        log_z=eight_schools_log_z(),
        description="eight schools, centred (10-D)",
    )


def eight_schools_noncentered() -> PosteriorModel:
    """Non-centred eight schools: ``theta = mu + tau eta``; the same posterior of ``(mu, tau)``."""
    y, sigma = _schools()

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", len(y), dim=-1):
            eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)

    return PosteriorModel(
        "eight_schools_noncentered",
        model,
        [
            ("mu", 1, constraints.real),
            ("tau", 1, constraints.positive),
            ("eta", 8, constraints.real),
        ],
        neck=["log_tau"],
        log_z=eight_schools_log_z(),
        description="eight schools, non-centred (10-D)",
    )


def eight_schools_log_tau_density(
    grid_size: int = 20001, lo: float = -12.0, hi: float = 9.0
) -> tuple[np.ndarray, np.ndarray, float]:
    """The exact posterior density of ``log tau`` on a grid, and the log evidence.

    With ``tau`` fixed, ``y ~ N(0, diag(sigma^2 + tau^2) + 25 * 1 1^T)`` (``mu`` and ``theta``
    integrated out), so ``p(y) = int HalfCauchy(tau; 5) N(y; 0, S(tau)) dtau``: a 1-D integral,
    done here in ``u = log tau`` with the trapezoidal rule in float64.

    Returns:
        ``(u, density of u, log Z)``.
    """
    u = np.linspace(lo, hi, grid_size)
    tau = np.exp(u)
    y, s2 = np.array(SCHOOLS_Y), np.array(SCHOOLS_SIGMA) ** 2
    d = s2[None, :] + tau[:, None] ** 2  # diagonal part, per grid point
    # S = D + a 1 1^T: Sherman-Morrison for the quadratic form, the determinant lemma for log|S|
    a = 25.0
    dinv_y = y[None, :] / d
    one_dinv_one = (1.0 / d).sum(1)
    quad = (y[None, :] * dinv_y).sum(1) - a * dinv_y.sum(1) ** 2 / (1.0 + a * one_dinv_one)
    logdet = np.log(d).sum(1) + np.log1p(a * one_dinv_one)
    log_lik = -0.5 * (quad + logdet + len(y) * math.log(2 * math.pi))
    log_prior_tau = math.log(2 / (math.pi * 5.0)) - np.log1p((tau / 5.0) ** 2)
    log_joint_u = log_lik + log_prior_tau + u  # + u: the Jacobian of tau = e^u
    peak = log_joint_u.max()
    weights = np.exp(log_joint_u - peak)
    z = np.trapezoid(weights, u)
    return u, weights / z, float(peak + math.log(z))


def eight_schools_log_z() -> float:
    """The exact log evidence of the eight schools model (both parameterisations)."""
    return eight_schools_log_tau_density()[2]


# -- Neal's funnel ------------------------------------------------------------------------------
def funnel() -> PosteriorModel:
    """Neal's funnel in 10-D: ``v ~ N(0, 3)``, ``x_i | v ~ N(0, exp(v / 2))``, ``i = 1..9``."""
    k = FUNNEL_DIM - 1

    def model() -> None:
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        scale = torch.exp(v / 2).unsqueeze(-1)
        pyro.sample("x", dist.Normal(0.0, scale).expand(v.shape + (k,)).to_event(1))

    return PosteriorModel(
        "funnel",
        model,
        [("v", 1, constraints.real), ("x", k, constraints.real)],
        neck=["v"],
        log_z=0.0,
        description="Neal's funnel (10-D)",
    )


def funnel_exact_draws(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` exact draws of the funnel, ``(n, 10)`` with ``v`` first."""
    v = 3.0 * torch.randn(n, 1, generator=generator, dtype=torch.float64)
    x = torch.exp(v / 2) * torch.randn(n, FUNNEL_DIM - 1, generator=generator, dtype=torch.float64)
    return torch.cat([v, x], dim=-1)


def funnel_exact_moments() -> tuple[np.ndarray, np.ndarray]:
    """Means (all 0) and sds of the funnel: ``sd(v) = 3``, ``sd(x_i) = sqrt(E e^v) = e^{9/4}``."""
    sd = np.full(FUNNEL_DIM, math.exp(9.0 / 4.0))
    sd[0] = 3.0
    return np.zeros(FUNNEL_DIM), sd


# -- regressions on data scikit-learn ships -------------------------------------------------------
def _standardise(a: np.ndarray) -> torch.Tensor:
    return torch.tensor((a - a.mean(0)) / a.std(0), dtype=torch.get_default_dtype())


def logistic() -> PosteriorModel:
    """Logistic regression on the breast cancer data: 30 standardised features + intercept."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x, y = _standardise(data.data), torch.tensor(data.target, dtype=torch.get_default_dtype())
    p = x.shape[1]

    def model() -> None:
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([p]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        # (w * x).sum(-1) broadcasts a particle batch (P, 1, p) against (N, p) to (P, N)
        logits = (w * x).sum(-1) + b
        with pyro.plate("data", len(y), dim=-1):
            pyro.sample("obs", dist.Bernoulli(logits=logits), obs=y)

    return PosteriorModel(
        "logistic",
        model,
        [("w", p, constraints.real), ("b", 1, constraints.real)],
        description="logistic regression, breast cancer (31-D)",
    )


def horseshoe() -> PosteriorModel:
    """Non-centred horseshoe regression on the diabetes data (10 standardised features)."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x, y = _standardise(data.data), _standardise(data.target)
    p = x.shape[1]

    def model() -> None:
        alpha = pyro.sample("alpha", dist.Normal(0.0, 1.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        tau = pyro.sample("tau", dist.HalfCauchy(1.0))
        lam = pyro.sample("lambda", dist.HalfCauchy(torch.ones(p)).to_event(1))
        z = pyro.sample("z", dist.Normal(torch.zeros(p), 1.0).to_event(1))
        beta = tau.unsqueeze(-1) * lam * z
        mean = (beta * x).sum(-1) + alpha
        with pyro.plate("data", len(y), dim=-1):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)

    return PosteriorModel(
        "horseshoe",
        model,
        [
            ("alpha", 1, constraints.real),
            ("sigma", 1, constraints.positive),
            ("tau", 1, constraints.positive),
            ("lambda", p, constraints.positive),
            ("z", p, constraints.real),
        ],
        neck=["log_tau"],
        description="horseshoe regression, diabetes (23-D)",
    )


#: the models by name; each entry builds its :class:`PosteriorModel` (loading its data)
MODELS: dict[str, Callable[[], PosteriorModel]] = {
    "eight_schools_centered": eight_schools_centered,
    "eight_schools_noncentered": eight_schools_noncentered,
    "funnel": funnel,
    "logistic": logistic,
    "horseshoe": horseshoe,
}
