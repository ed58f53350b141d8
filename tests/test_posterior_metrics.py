"""The metrics of examples/benchmarks/bench_posteriors.py on inputs whose answers are known."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "benchmarks"))

import posterior_metrics as pm  # noqa: E402

BACKENDS = ["pyro"] + (["arviz"] if pm._arviz is not None else [])


def pareto_log_weights(k: float, n: int, seed: int) -> np.ndarray:
    """log of weights whose tail is a Pareto with shape k (tail index 1 / k)."""
    return np.log(np.random.default_rng(seed).pareto(1.0 / k, size=n) + 1.0)


def ar1_chains(phi: float, chains: int = 4, n: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((chains, n))
    x[:, 0] = rng.normal(size=chains) / math.sqrt(1 - phi**2)  # stationary start
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + rng.normal(size=chains)
    return x


def test_elbo_and_log_z_of_exact_weights():
    # q = p / Z exactly: every log weight equals log Z
    log_w = np.full(500, -3.2)
    assert pm.elbo(log_w) == (-3.2, 0.0)
    assert pm.iw_log_z(log_w) == pytest.approx((-3.2, 0.0))


def test_iw_log_z_gaussian_proposal_recovers_known_evidence():
    # p(z) = Z N(z; 0, 1.5^2), q = N(0, 1): log w = log Z + log N(z; 0, 1.5^2) - log N(z; 0, 1)
    rng = np.random.default_rng(3)
    z = rng.normal(size=40000)
    log_z_true, s = -2.0, 1.5
    log_w = log_z_true - math.log(s) - 0.5 * z**2 / s**2 + 0.5 * z**2
    log_z, se = pm.iw_log_z(log_w)
    elbo, _ = pm.elbo(log_w)
    # ELBO = log Z - KL(q || p) with KL(N(0,1) || N(0, s^2)) = log s + 1 / (2 s^2) - 1/2
    kl = math.log(s) + 1 / (2 * s**2) - 0.5
    assert elbo == pytest.approx(log_z_true - kl, abs=0.01)
    assert abs(log_z - log_z_true) < 4 * se and se < 0.01
    # the delta-method se matches the spread of the estimate over repetitions
    reps = [pm.iw_log_z(log_w[i::10])[0] for i in range(10)]
    assert np.std(reps, ddof=1) == pytest.approx(pm.iw_log_z(log_w[::10])[1], rel=0.6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0.2, 0.5, 0.9])
def test_psis_khat_recovers_a_known_pareto_tail(backend, k):
    estimates = [pm.psis_khat(pareto_log_weights(k, 10000, seed), backend) for seed in range(3)]
    assert np.mean(estimates) == pytest.approx(k, abs=0.12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_psis_khat_separates_light_and_heavy_tails(backend):
    light = pm.psis_khat(np.random.default_rng(0).normal(size=5000) * 0.3, backend)
    heavy = pm.psis_khat(pareto_log_weights(1.0, 5000, 0), backend)
    assert light < 0.5 < 0.7 < heavy


def test_psis_khat_backends_agree():
    if pm._arviz is None:
        pytest.skip("arviz-stats not installed")
    log_w = np.random.default_rng(5).normal(size=4000) * 1.2
    assert pm.psis_khat(log_w, "pyro") == pytest.approx(pm.psis_khat(log_w, "arviz"), abs=1e-8)


def test_psis_tail_length_follows_the_paper():
    assert pm.psis_tail_length(100) == 20  # n / 5 for small n
    assert pm.psis_tail_length(4000) == 189  # floor(3 sqrt(n))
    assert pm.psis_tail_length(10000) == 300  # 3 sqrt(n)


def test_bad_log_weights_are_refused():
    with pytest.raises(ValueError, match="not finite"):
        pm.iw_log_z(np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        pm.elbo(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="backend"):
        pm.psis_khat(np.zeros(10), backend="stan")


def test_moment_errors_in_reference_sds():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200000, 2)) * np.array([2.0, 0.5]) + np.array([1.0, -1.0])
    err = pm.moment_errors(x, ref_mean=np.array([0.0, -1.0]), ref_sd=np.array([1.0, 1.0]))
    np.testing.assert_allclose(err["mean_err"], [1.0, 0.0], atol=0.01)
    np.testing.assert_allclose(err["sd_err"], [1.0, -0.5], atol=0.01)
    summary = pm.summarise_errors(err)
    assert summary["mean_err_max"] == pytest.approx(1.0, abs=0.01)
    assert summary["sd_err_rms"] == pytest.approx(math.sqrt((1.0 + 0.25) / 2), abs=0.01)
    with pytest.raises(ValueError, match="reference"):
        pm.moment_errors(x, np.zeros(3), np.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("phi", [0.0, 0.8])
def test_bulk_ess_of_ar1_chains(backend, phi):
    # an AR(1) chain of n draws has ESS n (1 - phi) / (1 + phi)
    x = ar1_chains(phi)
    ess = float(pm.bulk_ess(x, backend)[0])
    assert ess == pytest.approx(x.size * (1 - phi) / (1 + phi), rel=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rhat_flags_a_chain_stuck_elsewhere(backend):
    mixed = ar1_chains(0.5)
    stuck = mixed.copy()
    stuck[0] += 2.0
    assert pm.rhat(mixed, backend)[0] < 1.01
    assert pm.rhat(stuck, backend)[0] > 1.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_rhat_folded_sees_a_chain_with_another_scale(backend):
    x = ar1_chains(0.0, n=1000)
    x[0] *= 4.0  # same centre, other spread: the bulk R-hat alone misses it
    assert pm.rhat(x, backend)[0] > 1.05


def test_ess_and_rhat_backends_agree():
    if pm._arviz is None:
        pytest.skip("arviz-stats not installed")
    x = np.stack([ar1_chains(0.6, seed=s) for s in range(3)], axis=-1)
    np.testing.assert_allclose(pm.bulk_ess(x, "pyro"), pm.bulk_ess(x, "arviz"), rtol=0.03)
    np.testing.assert_allclose(pm.rhat(x, "pyro"), pm.rhat(x, "arviz"), rtol=1e-6)


def test_chains_shape_is_checked():
    with pytest.raises(ValueError, match="chains"):
        pm.bulk_ess(np.zeros(10))
