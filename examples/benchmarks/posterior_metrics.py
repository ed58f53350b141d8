"""Metrics of ``bench_posteriors.py``: small pure functions of log weights, draws and chains.

Variational fit, from ``K`` draws ``z_k ~ q`` and their log weights
``log w_k = log p(x, z_k) - log q(z_k)``:

* :func:`elbo`: ``mean(log w)`` and its Monte-Carlo standard error;
* :func:`iw_log_z`: ``log Z ~ log mean(w)`` and its standard error by the delta method,
  ``se = sd(w) / (sqrt(K) mean(w))`` (meaningless once the weights' variance is infinite,
  which :func:`psis_khat` tells: ``k > 0.5`` infinite variance, ``k > 0.7`` unusable);
* :func:`psis_khat`: the Pareto shape ``k`` fitted to the largest weights, as in PSIS
  (Vehtari et al. 2024, "Pareto smoothed importance sampling", JMLR 25(72)); from
  ``arviz-stats`` where it is installed (``pip install arviz-stats``, the ``bench`` extra),
  else from the same recipe on Pyro's ``fit_generalized_pareto`` (:func:`psis_khat_pyro`);
* :func:`moment_errors`: errors of the posterior means in reference standard deviations and
  relative errors of the standard deviations.

MCMC, from chains shaped ``(chains, draws)`` or ``(chains, draws, params)``:

* :func:`bulk_ess`: the rank-normalised split bulk effective sample size (Vehtari et al.
  2021, "Rank-normalization, folding, and localization", Bayesian Analysis 16(2));
* :func:`rhat`: the rank-normalised split R-hat of the same paper (the larger of bulk and
  folded);

both from ``arviz-stats`` where installed, else rank-normalised here and passed to Pyro's
``effective_sample_size`` / ``split_gelman_rubin``.

Example:
    >>> import numpy as np
    >>> log_w = np.zeros(1000)            # q equal to the posterior and Z = 1
    >>> iw_log_z(log_w)
    (0.0, 0.0)
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pyro.ops.stats import effective_sample_size, fit_generalized_pareto, split_gelman_rubin
from scipy.special import logsumexp
from scipy.stats import norm

try:  # the maintained implementation, where installed (bench extra)
    from arviz_stats.base import array_stats as _arviz
except ImportError:  # pragma: no cover - depends on the environment
    _arviz = None
if _arviz is not None and not all(hasattr(_arviz, f) for f in ("psislw", "ess", "rhat")):
    _arviz = None  # pragma: no cover - an arviz-stats whose array API moved: use the fallback

Backend = Literal["auto", "arviz", "pyro"]


def backend_name(backend: Backend = "auto") -> str:
    """The implementation :func:`psis_khat`, :func:`bulk_ess` and :func:`rhat` use."""
    if backend == "auto":
        return "arviz" if _arviz is not None else "pyro"
    if backend == "arviz" and _arviz is None:
        raise ValueError("backend='arviz' needs arviz-stats: pip install arviz-stats")
    if backend not in ("arviz", "pyro"):
        raise ValueError(f"backend must be 'auto', 'arviz' or 'pyro', got {backend!r}")
    return backend


def _log_weights(log_w: np.ndarray | torch.Tensor) -> np.ndarray:
    a = np.asarray(log_w.detach().cpu() if isinstance(log_w, torch.Tensor) else log_w, float)
    if a.ndim != 1 or a.size < 2:
        raise ValueError(f"log weights must be a 1-D array of at least 2, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"{bad} of {a.size} log weights are not finite (nan or inf)")
    return a


# -- variational fit ---------------------------------------------------------------------------
def elbo(log_w: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """``(mean(log w), its standard error)``: the evidence lower bound from ``K`` draws of q.

    Example:
        >>> elbo(np.array([-1.0, -3.0]))
        (-2.0, 1.0)
    """
    a = _log_weights(log_w)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size))


def iw_log_z(log_w: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """``(log mean(w), its delta-method standard error)``: the importance-weighted log evidence.

    .. math::

        \\widehat{\\log Z} = \\operatorname{logsumexp}_k \\log w_k - \\log K, \\qquad
        \\mathrm{se} = \\frac{\\mathrm{sd}(w)}{\\sqrt{K}\\, \\overline{w}}

    Example:
        >>> lz, se = iw_log_z(np.log([1.0, 3.0]))
        >>> round(lz, 6) == round(math.log(2.0), 6), round(se, 6)
        (True, 0.707107)
    """
    a = _log_weights(log_w)
    log_z = float(logsumexp(a) - math.log(a.size))
    w = np.exp(a - a.max())  # scale-free: se is a ratio
    return log_z, float(w.std(ddof=1) / (math.sqrt(a.size) * w.mean()))


def psis_tail_length(n: int) -> int:
    """How many of ``n`` weights PSIS fits the Pareto tail to: ``3 sqrt(n)``, or ``n / 5`` for
    ``n <= 225`` (rounded down, as arviz does; the paper rounds ``min(0.2 n, 3 sqrt(n))`` up)."""
    return int(math.floor(3.0 * math.sqrt(n) if n > 225 else n / 5))


def psis_khat_pyro(log_w: np.ndarray | torch.Tensor) -> float:
    """The PSIS Pareto ``k`` with Pyro's generalized Pareto fit (Zhang & Stephens, PSIS prior).

    The largest ``M = psis_tail_length(K)`` weights, less the ``(M+1)``-th largest, are
    fitted; constant weights have no tail and give ``-inf``.
    """
    a = np.sort(_log_weights(log_w))
    m = psis_tail_length(a.size)
    threshold = a[-m - 1]
    exceed = np.exp(a[-m:] - a[-1]) - math.exp(threshold - a[-1])  # scaled by the max weight
    if np.all(exceed <= 0):
        return float("-inf")
    k, _ = fit_generalized_pareto(torch.as_tensor(exceed, dtype=torch.float64))
    return float(k)


def psis_khat(log_w: np.ndarray | torch.Tensor, backend: Backend = "auto") -> float:
    """The Pareto ``k`` of the importance weights: below 0.7 the estimates are usable.

    Arguments:
        log_w: ``log p(x, z_k) - log q(z_k)`` for ``K`` draws of ``q``.
        backend: ``"arviz"`` (``arviz_stats`` PSIS), ``"pyro"`` (:func:`psis_khat_pyro`) or
            ``"auto"`` (arviz where installed).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> w = rng.pareto(1 / 0.5, size=20000) + 1.0   # a Pareto tail with k = 0.5
        >>> 0.4 < psis_khat(np.log(w)) < 0.6
        True
    """
    a = _log_weights(log_w)
    if backend_name(backend) == "pyro":
        return psis_khat_pyro(a)
    if np.ptp(a) == 0:
        return float("-inf")
    # arviz's psislw smooths leave-one-out ratios, whose log weights are -log_lik
    _, khat = _arviz.psislw(-a)
    return float(khat)


def moment_errors(
    draws: np.ndarray | torch.Tensor, ref_mean: np.ndarray, ref_sd: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-parameter errors: means in reference sds, sds relative to the reference sds.

    Returns:
        ``{"mean_err": (m - m_ref) / sd_ref, "sd_err": sd / sd_ref - 1, "mean", "sd"}``.

    Example:
        >>> x = np.array([[0.0, 1.0], [2.0, 3.0]])
        >>> moment_errors(x, np.zeros(2), np.ones(2))["mean_err"]
        array([1., 2.])
    """
    x = np.asarray(draws.detach().cpu() if isinstance(draws, torch.Tensor) else draws, float)
    ref_mean, ref_sd = np.asarray(ref_mean, float), np.asarray(ref_sd, float)
    if x.ndim != 2 or x.shape[1] != ref_mean.size or ref_sd.shape != ref_mean.shape:
        raise ValueError(
            f"draws must be (n, D) with D = {ref_mean.size} (the reference's), "
            f"got {x.shape} and a reference sd of shape {ref_sd.shape}"
        )
    mean, sd = x.mean(0), x.std(0, ddof=1)
    return {
        "mean": mean,
        "sd": sd,
        "mean_err": (mean - ref_mean) / ref_sd,
        "sd_err": sd / ref_sd - 1.0,
    }


def summarise_errors(errors: dict[str, np.ndarray]) -> dict[str, float]:
    """The largest absolute and the root-mean-square error over parameters, of means and sds."""
    out = {}
    for key in ("mean_err", "sd_err"):
        e = errors[key]
        out[f"{key}_max"] = float(np.abs(e).max())
        out[f"{key}_rms"] = float(np.sqrt((e**2).mean()))
    return out


# -- MCMC diagnostics --------------------------------------------------------------------------
def _chains(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(chains, draws, params)`` from ``(chains, draws)`` or ``(chains, draws, params)``."""
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, float)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[1] < 4:
        raise ValueError(f"chains must be (chains, draws[, params]) with draws >= 4, got {a.shape}")
    return a


def rank_normalise(x: np.ndarray) -> np.ndarray:
    """Normal scores of the pooled ranks (Blom's offset), over the first two axes.

    ``z = Phi^{-1}((r - 3/8) / (S + 1/4))`` with ``r`` the rank among all ``S`` draws of
    all chains, as in Vehtari et al. (2021); ties share their average rank.
    """
    c, n = x.shape[:2]
    flat = x.reshape(c * n, -1)
    from scipy.stats import rankdata

    ranks = rankdata(flat, axis=0)
    return norm.ppf((ranks - 0.375) / (c * n + 0.25)).reshape(x.shape)


def _split(x: np.ndarray) -> np.ndarray:
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)


def bulk_ess(chains: np.ndarray | torch.Tensor, backend: Backend = "auto") -> np.ndarray:
    """Rank-normalised split bulk ESS, one per parameter.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ess = bulk_ess(rng.normal(size=(4, 500)))
        >>> bool(1500 < ess[0] < 2500)
        True
    """
    a = _chains(chains)
    if backend_name(backend) == "arviz":
        return np.array([_arviz.ess(a[..., j], method="bulk") for j in range(a.shape[2])])
    z = torch.as_tensor(rank_normalise(_split(a)))
    return effective_sample_size(z, chain_dim=0, sample_dim=1).numpy().astype(float)


def rhat(chains: np.ndarray | torch.Tensor, backend: Backend = "auto") -> np.ndarray:
    """Rank-normalised split R-hat, one per parameter (the larger of bulk and folded)."""
    a = _chains(chains)
    if backend_name(backend) == "arviz":
        return np.array([_arviz.rhat(a[..., j], method="rank") for j in range(a.shape[2])])
    folded = np.abs(a - np.median(a, axis=(0, 1), keepdims=True))
    out = []
    for b in (a, folded):
        z = torch.as_tensor(rank_normalise(b))
        out.append(split_gelman_rubin(z, chain_dim=0, sample_dim=1).numpy())
    return np.maximum(*out).astype(float)
