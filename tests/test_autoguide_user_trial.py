"""A new user's trial of ``AutoResidualFlow``, checked against posteriors known exactly.

Every number is compared with a closed-form reference: a conjugate Gaussian model (posterior
mean, covariance and evidence), and Gamma-Normal, Beta-Binomial and Dirichlet-Multinomial
models for constrained sites. Tolerances are stated in units of the posterior's own sd and
justified where they are set: the Monte-Carlo error of the draws is small next to them, the
rest is the optimisation error of a short, seeded SVI run. The bad-input tests check that
each failure names what was expected and what came.
"""

from __future__ import annotations

import copy
import io
import math
import tempfile
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI, Importance, Predictive, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import init_to_value
from pyro.infer.importance import vectorized_importance_weights
from pyro.infer.reparam import NeuTraReparam
from pyro.ops.stats import effective_sample_size

from pyro_invres.autoguide import NEUTRA_OPTIONS, NEUTRA_TARGET_ACCEPT, AutoResidualFlow

# -- a conjugate Gaussian model: x ~ N(m0, S0) in 4-D, y ~ N(A x, s^2 I) in 6-D -------------
_GEN = torch.Generator().manual_seed(0)
_A = torch.randn(6, 4, generator=_GEN)
_Y = torch.randn(6, generator=_GEN)
_S = 0.7
_M0 = torch.tensor([0.5, -1.0, 0.0, 2.0])
_S0 = torch.diag(torch.tensor([1.0, 2.0, 0.5, 1.5]))


def _gauss_model(y: torch.Tensor | None = _Y) -> None:
    x = pyro.sample("x", dist.MultivariateNormal(_M0, _S0))
    pyro.sample("y", dist.Normal(x @ _A.T, _S).to_event(1), obs=y)


def _exact() -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior mean, covariance and log evidence of ``_gauss_model`` (float64)."""
    a, s0, m0, y = _A.double(), _S0.double(), _M0.double(), _Y.double()
    prec = torch.linalg.inv(s0) + a.T @ a / _S**2
    cov = torch.linalg.inv(prec)
    mean = cov @ (torch.linalg.solve(s0, m0) + a.T @ y / _S**2)
    marginal = dist.MultivariateNormal(a @ m0, a @ s0 @ a.T + _S**2 * torch.eye(6))
    return mean.float(), cov.float(), float(marginal.log_prob(y))


def _fit(model, guide, elbo, steps: int, lr: float, lr_final: float, *args) -> AutoResidualFlow:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": (lr_final / lr) ** (1 / steps)})
    svi = SVI(model, guide, optim, elbo)
    for _ in range(steps):
        svi.step(*args)
    return guide


def _particles() -> dict:
    return {"num_particles": 8, "vectorize_particles": True}


@pytest.fixture(scope="module")
def gauss_guide() -> AutoResidualFlow:
    pyro.clear_param_store()
    guide = AutoResidualFlow(_gauss_model)
    return _fit(_gauss_model, guide, Trace_ELBO(**_particles()), 500, 2e-2, 4e-4)


def _assert_matches_exact(z: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, tol: float):
    """Mean within ``tol`` posterior sds, sds within ``tol`` relative, correlations ``tol``."""
    sd = cov.diag().sqrt()
    assert ((z.mean(0) - mean).abs() / sd).max() < tol, (z.mean(0), mean)
    assert ((z.std(0) / sd - 1).abs()).max() < tol, (z.std(0), sd)
    corr = cov / sd[:, None] / sd[None, :]
    assert (torch.corrcoef(z.T) - corr).abs().max() < tol, (torch.corrcoef(z.T), corr)


def test_trace_elbo_recovers_the_exact_gaussian_posterior(gauss_guide):
    mean, cov, _ = _exact()
    pyro.set_rng_seed(1)
    with torch.no_grad():
        z = gauss_guide.get_posterior().sample((20_000,))
    # MC error of 20,000 draws: 0.007 sd in the mean, 0.5% in an sd, 0.007 in a
    # correlation; 0.08 leaves room for the optimisation error of 500 steps only
    _assert_matches_exact(z, mean, cov, tol=0.08)


def test_renyi_elbo_recovers_the_exact_gaussian_posterior():
    # alpha = 0.5: at alpha = 0 (the IWAE bound, a noisy guide gradient) no guide converges
    # in a short run here (1500 steps: sds off by up to 42% for this guide, 16% for
    # AutoMultivariateNormal, 23% for AutoIAFNormal; at 0.5 all three within 10%)
    mean, cov, _ = _exact()
    guide = AutoResidualFlow(_gauss_model)
    _fit(_gauss_model, guide, RenyiELBO(alpha=0.5, **_particles()), 500, 2e-2, 4e-4)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        z = guide.get_posterior().sample((20_000,))
    _assert_matches_exact(z, mean, cov, tol=0.12)


def test_importance_weights_give_the_exact_log_evidence(gauss_guide):
    _, _, log_z = _exact()
    pyro.set_rng_seed(2)
    n = 20_000
    with torch.no_grad():
        log_w = vectorized_importance_weights(
            _gauss_model, gauss_guide, num_samples=n, max_plate_nesting=1
        )[0].double()
    estimate = float(log_w.logsumexp(0) - math.log(n))
    w = (log_w - log_w.max()).exp()
    se = float(w.std() / w.mean()) / math.sqrt(n)  # delta method: sd of log mean(w)
    # a wrong log q (a log-det off by a constant) would shift the estimate by that constant
    assert abs(estimate - log_z) < 5 * se + 2e-3, (estimate, log_z, se)
    assert float(log_w.mean()) < log_z  # the ELBO is a lower bound
    # Pyro's sequential Importance on the same guide: its evidence and its weighted mean
    importance = Importance(_gauss_model, guide=gauss_guide, num_samples=300).run()
    assert abs(float(importance.get_log_normalizer()) - log_z) < 0.05
    mean, cov, _ = _exact()
    marginal = pyro.infer.EmpiricalMarginal(importance, "x")
    sd = cov.diag().sqrt()
    # 300 weighted draws with ESS near 300: 0.06 sd of MC error, 5 of them
    assert ((marginal.mean - mean).abs() / sd).max() < 0.3


def test_predictive_draws_latents_and_the_exact_posterior_predictive(gauss_guide):
    mean, cov, _ = _exact()
    pyro.set_rng_seed(3)
    # y=None: Pyro's Predictive returns an observed site's data, not new draws
    draws = Predictive(_gauss_model, guide=gauss_guide, num_samples=20_000, parallel=True)(None)
    assert draws["x"].shape == (20_000, 4) and draws["y"].shape == (20_000, 6)
    _assert_matches_exact(draws["x"], mean, cov, tol=0.08)
    # y* ~ N(A m, A C A^T + s^2 I): its sd is at least s = 0.7, MC error 0.007 of that
    pred_mean = _A @ mean
    pred_sd = (_A @ cov @ _A.T).diag().add(_S**2).sqrt()
    assert ((draws["y"].mean(0) - pred_mean).abs() / pred_sd).max() < 0.05
    assert ((draws["y"].std(0) / pred_sd - 1).abs()).max() < 0.05


def _neutra_draws(model, guide, seed: int, target_accept_prob: float = 0.8) -> torch.Tensor:
    """200 NUTS draws of ``x`` (after 100 warm-up steps) on the NeuTra warp by ``guide``."""
    guide.requires_grad_(False)
    try:
        neutra = NeuTraReparam(guide)
        warped = pyro.poutine.reparam(
            model, config=lambda msg: None if msg["is_observed"] else neutra
        )
        pyro.set_rng_seed(seed)
        kernel = NUTS(warped, target_accept_prob=target_accept_prob)
        mcmc = MCMC(kernel, num_samples=200, warmup_steps=100, disable_progbar=True)
        mcmc.run()
        (latent,) = mcmc.get_samples().values()
        with torch.no_grad():
            return neutra.transform_sample(latent)["x"]
    finally:
        guide.requires_grad_(True)


def test_neutra_nuts_samples_match_the_exact_posterior(gauss_guide):
    mean, cov, _ = _exact()
    x = _neutra_draws(_gauss_model, gauss_guide, seed=4)
    assert x.shape == (200, 4)
    ess = effective_sample_size(x.unsqueeze(0)).clamp(min=20)
    sd = cov.diag().sqrt()
    # 5 MC standard errors: sd / sqrt(ESS) for a mean, sd / sqrt(2 ESS) for an sd
    assert ((x.mean(0) - mean).abs() / sd * ess.sqrt()).max() < 5, (x.mean(0), mean, ess)
    assert ((x.std(0) / sd - 1).abs() * (2 * ess).sqrt()).max() < 5, (x.std(0), sd, ess)


def test_the_recommended_neutra_warp_samples_the_exact_posterior():
    # the docs' NeuTra recommendation: for_neutra's warp, NUTS at NEUTRA_TARGET_ACCEPT
    pyro.clear_param_store()
    guide = AutoResidualFlow.for_neutra(_gauss_model)
    guide = _fit(_gauss_model, guide, Trace_ELBO(**_particles()), 500, 2e-2, 4e-4)
    ar, block, affine = guide.get_transform().parts
    assert [type(p).__name__ for p in (ar, block, affine)] == [
        "AffineAutoregressive", "DenseResidual", "TriangularAffine"
    ]  # fmt: skip
    assert NEUTRA_TARGET_ACCEPT == 0.95
    mean, cov, _ = _exact()
    x = _neutra_draws(_gauss_model, guide, seed=4, target_accept_prob=NEUTRA_TARGET_ACCEPT)
    ess = effective_sample_size(x.unsqueeze(0)).clamp(min=20)
    sd = cov.diag().sqrt()
    assert ((x.mean(0) - mean).abs() / sd * ess.sqrt()).max() < 5, (x.mean(0), mean, ess)
    assert ((x.std(0) / sd - 1).abs() * (2 * ess).sqrt()).max() < 5, (x.std(0), sd, ess)


def test_for_neutra_is_the_constructor_with_the_warps_options_which_any_option_overrides():
    pyro.clear_param_store()
    guide = AutoResidualFlow.for_neutra(_gauss_model)
    assert guide._flow_options == {**guide._flow_options, **NEUTRA_OPTIONS}
    guide()
    assert len(guide.get_transform().parts) == 3  # one layer, one block, the affine map
    pyro.clear_param_store()
    linear = AutoResidualFlow.for_neutra(
        _gauss_model, autoregressive_hidden_dim=0, log_scale_bound=8.0, num_blocks=2
    )
    assert linear._flow_options["log_scale_bound"] == 8.0
    assert linear._flow_options["num_blocks"] == 2
    assert linear._flow_options["num_autoregressive"] == 1
    linear()
    ar = linear.get_transform().parts[0]
    assert ar.log_scale_bound == 8.0
    made = next(m for m in ar.modules() if type(m).__name__ == "MADE")
    assert made.width == 0 and made.hidden is None  # log-scales linear in earlier coordinates
    plain = guide.get_transform().parts[0]  # for_neutra's own conditioner: a MADE's 3D + 1
    assert next(m for m in plain.modules() if type(m).__name__ == "MADE").width == 3 * 4 + 1
    with pytest.raises(TypeError, match="bogus"):
        AutoResidualFlow.for_neutra(_gauss_model, bogus=1)
    with pytest.raises(TypeError):  # the options are read-only
        NEUTRA_OPTIONS["num_blocks"] = 3  # type: ignore[index]


def test_train_and_eval_mode_give_the_same_draws_and_densities(gauss_guide):
    posterior = gauss_guide.get_posterior()
    pyro.set_rng_seed(5)
    with torch.no_grad():
        a = posterior.sample((50,))
        lp_a = posterior.log_prob(a.clone())  # a new tensor: scored by the inverse
    gauss_guide.eval()
    try:
        pyro.set_rng_seed(5)
        with torch.no_grad():
            b = gauss_guide.get_posterior().sample((50,))
            lp_b = gauss_guide.get_posterior().log_prob(b.clone())
    finally:
        gauss_guide.train()
    assert torch.equal(a, b)
    torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=1e-5)


def test_state_dict_and_pickle_round_trips_give_identical_densities(gauss_guide):
    z = torch.randn(20, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = gauss_guide.get_posterior().log_prob(z)
    state = gauss_guide.state_dict()
    # a fresh guide has no flow until its first call (Pyro's autoguides build lazily)
    pyro.clear_param_store()
    fresh = AutoResidualFlow(_gauss_model)
    fresh()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.get_posterior().log_prob(z.clone()), expected)
    buffer = io.BytesIO()
    torch.save(gauss_guide, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded.get_posterior().log_prob(z.clone()), expected)
    pyro.set_rng_seed(7)
    a = Predictive(_gauss_model, guide=gauss_guide, num_samples=5)()["x"]
    pyro.set_rng_seed(7)
    b = Predictive(_gauss_model, guide=fresh, num_samples=5)()["x"]
    assert torch.equal(a, b)
    pyro.clear_param_store()


def test_to_float64_after_training_keeps_the_densities(gauss_guide):
    z = torch.randn(20, 4, generator=torch.Generator().manual_seed(8))
    buffer = io.BytesIO()
    torch.save(gauss_guide, buffer)
    buffer.seek(0)
    guide = torch.load(buffer, weights_only=False)  # a copy: the fixture stays float32
    with torch.no_grad():
        expected = guide.get_posterior().log_prob(z)
        guide.to(torch.float64)
        posterior = guide.get_posterior()
        assert posterior.sample((3,)).dtype == torch.float64
        got = posterior.log_prob(z.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-4)


def test_float64_log_density_of_own_draws_is_exact_against_autograd(float64_default):
    # under the default dtype float64 the guide is float64; its log q of its own draws
    # must be log N(u; 0, I) - log|det J_f(u)| with J from autograd, to rounding

    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("s", dist.LogNormal(0.0, 1.0))

    pyro.clear_param_store()
    guide = AutoResidualFlow(model)
    assert guide()["x"].dtype == torch.float64
    with torch.no_grad():  # move away from the identity-like start
        gen = torch.Generator().manual_seed(9)
        for p in guide.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    posterior = guide.get_posterior()
    u = torch.randn(5, 4, generator=gen)
    flow = guide.get_transform()
    z = flow(u)
    log_q = posterior.log_prob(z)  # the cached pair: no inverse solved
    for k in range(5):
        jac = torch.autograd.functional.jacobian(lambda v: flow.call(v, cached=False), u[k])
        ref = dist.Normal(0.0, 1.0).log_prob(u[k]).sum() - torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(log_q[k], ref, rtol=0, atol=1e-10)


# -- constrained sites with conjugate posteriors, and a subsampled data plate ---------------
_GAMMA_A, _GAMMA_B = 2.0, 1.0
_NORMAL_DATA = torch.randn(40, generator=_GEN) * 0.8
_BETA_A, _BETA_B, _TRIALS, _SUCCESSES = 2.0, 3.0, 20, 13.0
_DIRICHLET = torch.tensor([1.0, 2.0, 1.5])
_COUNTS = torch.tensor([5.0, 12.0, 3.0])


def _constrained_model(data: torch.Tensor) -> None:
    tau = pyro.sample("tau", dist.Gamma(_GAMMA_A, _GAMMA_B))  # positive
    p = pyro.sample("p", dist.Beta(_BETA_A, _BETA_B))  # bounded
    probs = pyro.sample("probs", dist.Dirichlet(_DIRICHLET))  # simplex
    pyro.sample("k", dist.Binomial(_TRIALS, p), obs=torch.tensor(_SUCCESSES))
    pyro.sample("counts", dist.Multinomial(int(_COUNTS.sum()), probs), obs=_COUNTS)
    with pyro.plate("data", len(data), subsample_size=20) as idx:  # scaled by 40 / 20
        pyro.sample("obs", dist.Normal(0.0, tau.rsqrt()), obs=data[idx])


def _constrained_exact() -> dict[str, dist.Distribution]:
    n, sq = len(_NORMAL_DATA), float((_NORMAL_DATA**2).sum())
    return {
        "tau": dist.Gamma(_GAMMA_A + n / 2, _GAMMA_B + sq / 2),
        "p": dist.Beta(_BETA_A + _SUCCESSES, _BETA_B + _TRIALS - _SUCCESSES),
        "probs": dist.Dirichlet(_DIRICHLET + _COUNTS),
    }


def test_constrained_sites_and_subsampling_match_conjugate_posteriors():
    guide = AutoResidualFlow(_constrained_model)
    elbo = Trace_ELBO(**_particles())
    _fit(_constrained_model, guide, elbo, 500, 2e-2, 4e-4, _NORMAL_DATA)
    assert guide.latent_dim == 4  # 1 + 1 + (3 - 1): the simplex loses one dimension
    pyro.set_rng_seed(10)
    draws = Predictive(
        _constrained_model,
        guide=guide,
        num_samples=20_000,
        parallel=True,
        return_sites=["tau", "p", "probs"],
    )(_NORMAL_DATA)
    assert (draws["tau"] > 0).all() and ((draws["p"] > 0) & (draws["p"] < 1)).all()
    torch.testing.assert_close(
        draws["probs"].reshape(-1, 3).sum(-1), torch.ones(20_000), atol=1e-5, rtol=0
    )
    for name, exact in _constrained_exact().items():
        value = draws[name].reshape(20_000, -1)
        mean, sd = exact.mean.reshape(-1), exact.variance.sqrt().reshape(-1)
        # MC error 0.007 sd; the rest is the fit of 500 steps with subsampled data
        assert ((value.mean(0) - mean).abs() / sd).max() < 0.12, (name, value.mean(0), mean)
        assert ((value.std(0) / sd - 1).abs()).max() < 0.12, (name, value.std(0), sd)


# -- failures that must be loud, and name what was expected and what came ------------------
def _tiny_model() -> None:
    pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("s", dist.HalfNormal(1.0))


def test_local_latents_in_a_subsampled_plate_are_refused():
    # before: one latent vector of the subsample's size silently stood for different data
    # points at every step
    def model(data):
        with pyro.plate("points", len(data), subsample_size=3) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data[idx])

    guide = AutoResidualFlow(model)
    with pytest.raises(NotImplementedError, match=r"'z'.*'points' \(size 3 of 10\)"):
        guide(torch.zeros(10))


def test_a_second_guide_without_clearing_the_param_store_is_refused():
    # before: the second guide's pyro.module handed the optimizer the first guide's stored
    # tensors, so SVI steps left the second guide untouched, silently
    first = AutoResidualFlow(_tiny_model)
    SVI(_tiny_model, first, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step()
    second = AutoResidualFlow(_tiny_model)
    with pytest.raises(RuntimeError, match="clear_param_store"):
        SVI(_tiny_model, second, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step()
    pyro.clear_param_store()
    third = AutoResidualFlow(_tiny_model)
    svi = SVI(_tiny_model, third, pyro.optim.Adam({"lr": 1e-1}), Trace_ELBO())
    svi.step()
    before = [p.detach().clone() for p in third.parameters()]
    svi.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, third.parameters()))


def test_restoring_through_the_param_store_is_refused_with_the_way_that_works():
    # pyro.get_param_store().load() cannot restore the flow (pyro.module does not copy
    # stored values into a plain nn.Module): the guide says so and names state_dict
    guide = AutoResidualFlow(_tiny_model)
    SVI(_tiny_model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.pt"
        pyro.get_param_store().save(path)
        pyro.clear_param_store()
        pyro.get_param_store().load(path)
    with pytest.raises(RuntimeError, match="load_state_dict"):
        AutoResidualFlow(_tiny_model)()


@pytest.mark.parametrize("value", [torch.tensor(0.0), torch.tensor(math.inf)])
def test_a_non_finite_initial_point_is_refused_naming_the_site(value):
    # before: s = 0 maps to log 0 = -inf, the guide drew s = 0 and every loss was inf
    init = init_to_value(values={"s": value})
    with pytest.raises(ValueError, match=r"not finite .* sites \['s'\]"):
        AutoResidualFlow(_tiny_model, init_loc_fn=init)()


def test_median_and_quantiles_say_why_they_are_missing():
    guide = AutoResidualFlow(_tiny_model)
    guide()
    with pytest.raises(NotImplementedError, match="no closed-form median"):
        guide.median()
    with pytest.raises(NotImplementedError, match="Predictive"):
        guide.quantiles([0.5])


def test_models_it_cannot_fit_are_refused_by_name():
    def no_latent():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    def discrete():
        k = pyro.sample("k", dist.Bernoulli(0.3))
        pyro.sample("y", dist.Normal(k, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(RuntimeError, match="no latent variables"):
        AutoResidualFlow(no_latent)()
    with pytest.raises(ValueError, match="discrete sample site 'k'"):
        AutoResidualFlow(discrete)()


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"lipschitz": 1.0}, ValueError, r"lipschitz must be in \(0, 1\), got 1.0"),
        ({"lipschitz": 1.5}, ValueError, "lipschitz must be in .* got 1.5"),
        ({"lipschitz": math.nan}, ValueError, "lipschitz must be in .* got nan"),
        ({"lipschitz": None}, TypeError, "lipschitz must be a real number, got None"),
        ({"lipschitz": "0.5"}, TypeError, "lipschitz must be a real number, got '0.5'"),
        ({"init_scale": True}, TypeError, "init_scale must be a real number, got True"),
        ({"log_scale_bound": math.inf}, ValueError, "log_scale_bound must be positive"),
        ({"hidden_dim": 2.7}, TypeError, "hidden_dim must be an integer or None, got 2.7"),
        ({"hidden_dim": 0}, ValueError, "hidden_dim must be >= 1"),
        ({"autoregressive_hidden_dim": "8"}, TypeError, "autoregressive_hidden_dim must be"),
        ({"num_blocks": True}, ValueError, "num_blocks must be an integer >= 0, got True"),
        ({"init_loc_fn": None}, TypeError, "init_loc_fn must be a Pyro init strategy, got None"),
    ],
)
def test_bad_options_fail_at_construction_naming_option_and_value(options, error, message):
    with pytest.raises(error, match=message):
        AutoResidualFlow(_tiny_model, **options)


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_density_at_points_it_did_not_draw_integrates_to_one(float64_default):
    # scoring a point the guide did not draw solves each block's inverse (Newton): a wrong
    # inverse or log-det would show as mass away from 1 on a grid covering the guide
    # (float64: a float32 perturbed guide can be heavy-tailed past what a grid resolves)
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = AutoResidualFlow(model, init_scale=1.0)
    guide()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(11)
        for p in guide.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        posterior = guide.get_posterior()
        z = posterior.sample((20_000,))
        lo, hi = z.min(0).values - 3, z.max(0).values + 3
        n = 241
        axes = [torch.linspace(float(lo[i]), float(hi[i]), n) for i in range(2)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
        cell = float((hi - lo).prod()) / (n - 1) ** 2
        mass = float(posterior.log_prob(grid).double().exp().sum()) * cell
    # the Riemann sum of a smooth density on a 241^2 grid: 1 - 4e-6 here
    assert abs(mass - 1) < 1e-4, mass


def test_enumerated_discrete_sites_compose_with_the_guide_exactly():
    # the guide over the continuous sites, a discrete site enumerated by TraceEnum_ELBO:
    # its loss must equal Trace_ELBO's on the model with that site summed out by hand
    data = torch.tensor([-2.1, -1.9, 2.2, 1.8, 2.0])
    weights = torch.tensor([0.4, 0.6])

    @pyro.infer.config_enumerate
    def mixture(data):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 3.0).to_event(1))
        with pyro.plate("data", len(data)):
            k = pyro.sample("k", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(loc[..., k], 1.0), obs=data)

    def summed(data):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 3.0).to_event(1))
        with pyro.plate("data", len(data)):
            mix = dist.MixtureSameFamily(dist.Categorical(weights), dist.Normal(loc, 1.0))
            pyro.sample("obs", mix, obs=data)

    guide = AutoResidualFlow(pyro.poutine.block(mixture, hide=["k"]))
    guide(data)
    for seed in (1, 2):
        pyro.set_rng_seed(seed)
        enumerated = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(mixture, guide, data)
        pyro.set_rng_seed(seed)
        by_hand = Trace_ELBO().loss(summed, guide, data)
        assert abs(enumerated - by_hand) < 1e-4 * abs(by_hand), (enumerated, by_hand)


# -- the Student t base (base="student_t"): heavy-tailed posteriors known exactly ----------
# t_3 quantiles at 0.05, 0.25, 0.5, 0.75, 0.95 (tables), and P(|x| < 1) = 2 F(1) - 1
_T3_PROBS = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
_T3_QUANTILES = torch.tensor([-2.3534, -0.7649, 0.0, 0.7649, 2.3534])
_T3_INSIDE_ONE = 0.6090


def _t_model() -> None:
    # no data: the posterior is the prior t_3, and the evidence is exactly 1
    pyro.sample("x", dist.StudentT(3.0, 0.0, 1.0))


@pytest.fixture(scope="module")
def t_guides() -> dict[str, AutoResidualFlow]:
    guides = {}
    # the normal base only serves the k-hat comparison: 500 steps are enough for it
    for base, steps in (("student_t", 1000), ("normal", 500)):
        pyro.clear_param_store()
        guide = AutoResidualFlow(_t_model, base=base)
        guides[base] = _fit(_t_model, guide, Trace_ELBO(**_particles()), steps, 2e-2, 4e-4)
    pyro.clear_param_store()
    return guides


def test_student_t_base_recovers_a_t3_posterior_and_learns_heavy_tails(t_guides):
    guide = t_guides["student_t"]
    # the degrees of freedom start at 10 and must head for the posterior's 3 (2.2-3.4
    # over seeds and run lengths: the flow shares the tail's shape with the base)
    df = float(1 + guide.base_log_df.detach().exp())
    assert df < 6, df
    pyro.set_rng_seed(20)
    with torch.no_grad():
        x = guide.get_posterior().sample((40_000,)).squeeze(-1)
    # t_3 has sd sqrt(3): MC error of the mean 0.009; of a central quantile about 0.01
    assert abs(float(x.mean())) < 0.06, float(x.mean())
    q = torch.quantile(x, _T3_PROBS)
    assert (q[1:4] - _T3_QUANTILES[1:4]).abs().max() < 0.08, q
    # the 5% tails: MC error 0.03; the rest is the optimisation of 1000 steps
    assert (q - _T3_QUANTILES).abs().max() < 0.2, q


def test_student_t_base_scores_exactly_evidence_one_and_unit_mass(t_guides):
    guide = t_guides["student_t"]
    pyro.set_rng_seed(21)
    n = 20_000
    with torch.no_grad():
        log_w = vectorized_importance_weights(_t_model, guide, num_samples=n, max_plate_nesting=0)[
            0
        ].double()
    estimate = float(log_w.logsumexp(0) - math.log(n))
    w = (log_w - log_w.max()).exp()
    se = float(w.std() / w.mean()) / math.sqrt(n)
    # log Z = 0: a wrong base log-density (a df off, a missing normaliser) shifts this
    assert abs(estimate) < 5 * se + 2e-3, (estimate, se)
    importance = Importance(_t_model, guide=guide, num_samples=300).run()
    assert abs(float(importance.get_log_normalizer())) < 0.05
    # points it did not draw (the inverse through the blocks) on a grid out to +-200,
    # past which t_3-like tails hold ~1e-6 of the mass
    grid = torch.linspace(-200.0, 200.0, 80_001).unsqueeze(-1)
    with torch.no_grad():
        mass = float(guide.get_posterior().log_prob(grid).double().exp().sum()) * 400 / 80_000
    assert abs(mass - 1) < 1e-3, mass


def test_student_t_base_bounds_the_importance_weights_of_a_t3_posterior(t_guides):
    from pyro.infer.importance import psis_diagnostic

    # log Z = 0, so a log weight is log p - log q itself. Gaussian tails under a t_3 give
    # unbounded weights; the t base (df near 2-3) keeps them below ~e^0.3 (measured)
    pyro.set_rng_seed(22)
    with torch.no_grad():
        log_w = {
            base: vectorized_importance_weights(
                _t_model, guide, num_samples=20_000, max_plate_nesting=0
            )[0]
            for base, guide in t_guides.items()
        }
        k_normal = psis_diagnostic(_t_model, t_guides["normal"], num_particles=5000)
    assert float(log_w["student_t"].max()) < 1.0, float(log_w["student_t"].max())
    assert float(log_w["normal"].max()) > 2.0, float(log_w["normal"].max())
    assert k_normal > 0.7, k_normal
    # not asserted: Pyro's psis_diagnostic gives this t-base guide k-hat 4.7-5.1 (seeds
    # 0-2, 1000 steps; 0.37-0.58 after 500), although its weights are bounded: the
    # generalised Pareto fit of a tail piled against its upper bound is not meaningful


def test_student_t_base_neutra_nuts_samples_a_t3(t_guides):
    x = _neutra_draws(_t_model, t_guides["student_t"], seed=23)
    inside = (x.abs() < 1).double()
    ess = float(effective_sample_size(inside.reshape(1, -1, 1)).clamp(min=20))
    # 5 MC standard errors of a probability near 0.6 from ess draws
    assert abs(float(inside.mean()) - _T3_INSIDE_ONE) < 5 * math.sqrt(0.24 / ess), (
        float(inside.mean()),
        ess,
    )


# normal-gamma: tau ~ Gamma(a, b), mu | tau ~ N(m, 1 / (k tau)), one y ~ N(mu, 1 / tau);
# mu's marginal posterior is a t with 2 a' = 3 degrees of freedom, tau's a Gamma
_NG_A, _NG_B, _NG_K, _NG_M, _NG_Y = 1.0, 1.0, 1.0, 0.0, 2.0
_NG_K1, _NG_A1 = _NG_K + 1, _NG_A + 0.5
_NG_M1 = (_NG_K * _NG_M + _NG_Y) / _NG_K1
_NG_B1 = _NG_B + _NG_K * (_NG_Y - _NG_M) ** 2 / (2 * _NG_K1)
_NG_MU_SCALE = math.sqrt(_NG_B1 / (_NG_A1 * _NG_K1))
_NG_LOG_Z = (
    math.lgamma(_NG_A1)
    - math.lgamma(_NG_A)
    + _NG_A * math.log(_NG_B)
    - _NG_A1 * math.log(_NG_B1)
    + 0.5 * math.log(_NG_K / _NG_K1)
    - 0.5 * math.log(2 * math.pi)
)


def _normal_gamma_model() -> None:
    tau = pyro.sample("tau", dist.Gamma(_NG_A, _NG_B))  # positive: a log transform
    mu = pyro.sample("mu", dist.Normal(_NG_M, (_NG_K * tau).rsqrt()))
    pyro.sample("y", dist.Normal(mu, tau.rsqrt()), obs=torch.tensor(_NG_Y))


def test_student_t_base_on_a_constrained_site_matches_the_normal_gamma_posterior():
    guide = AutoResidualFlow(_normal_gamma_model, base="student_t")
    _fit(_normal_gamma_model, guide, Trace_ELBO(**_particles()), 500, 2e-2, 4e-4)
    pyro.set_rng_seed(24)
    draws = Predictive(_normal_gamma_model, guide=guide, num_samples=20_000, parallel=True)()
    assert (draws["tau"] > 0).all()
    tau = dist.Gamma(_NG_A1, _NG_B1)
    # tau: mean 0.75, sd 0.61; MC error 0.007 sd, the rest the fit of 500 steps
    assert abs(float(draws["tau"].mean()) - float(tau.mean)) < 0.1 * float(tau.stddev)
    assert abs(float(draws["tau"].std()) / float(tau.stddev) - 1) < 0.1
    # mu's central quantiles in units of its t scale (0.82); its 5% tails come out about
    # 0.2 scale short after 500 steps, with either base (not asserted)
    q = torch.quantile(draws["mu"], _T3_PROBS[1:4])
    exact = _NG_M1 + _NG_MU_SCALE * _T3_QUANTILES[1:4]
    assert ((q - exact).abs() / _NG_MU_SCALE).max() < 0.1, (q, exact)
    # the evidence from 20,000 weights: this guide's k-hat is near 0.9 (heavy weights, a
    # low-biased estimate), so 300 sequential draws missed by 0.05; measured 0.004 here
    with torch.no_grad():
        log_w = vectorized_importance_weights(
            _normal_gamma_model, guide, num_samples=20_000, max_plate_nesting=0
        )[0].double()
    assert abs(float(log_w.logsumexp(0) - math.log(20_000)) - _NG_LOG_Z) < 0.03


def test_student_t_base_round_trips_keep_its_degrees_of_freedom(t_guides):
    guide = t_guides["student_t"]
    z = torch.linspace(-30.0, 30.0, 13).unsqueeze(-1)
    with torch.no_grad():
        expected = guide.get_posterior().log_prob(z)
    # state dict into a fresh guide started elsewhere (base_df=4): base_log_df comes too
    pyro.clear_param_store()
    fresh = AutoResidualFlow(_t_model, base="student_t", base_df=4.0)
    fresh()
    fresh.load_state_dict(guide.state_dict())
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    copies = [fresh, torch.load(buffer, weights_only=False), copy.deepcopy(guide)]
    for other in copies:
        with torch.no_grad():
            assert torch.equal(other.get_posterior().log_prob(z.clone()), expected)
    # the two bases' state dicts do not mix, and PyTorch's refusal names the parameter
    pyro.clear_param_store()
    normal = AutoResidualFlow(_t_model)
    normal()
    with pytest.raises(RuntimeError, match="Unexpected key.*base_log_df"):
        normal.load_state_dict(guide.state_dict())
    with pytest.raises(RuntimeError, match="Missing key.*base_log_df"):
        fresh.load_state_dict(normal.state_dict())
    # eval() draws as train() does
    pyro.set_rng_seed(25)
    a = guide.get_posterior().sample((20,))
    guide.eval()
    try:
        pyro.set_rng_seed(25)
        b = guide.get_posterior().sample((20,))
    finally:
        guide.train()
    assert torch.equal(a, b)
    # to(float64) after training: the df parameter follows, the density is kept
    wide = copies[1].to(torch.float64)
    assert wide.base_log_df.dtype == torch.float64
    with torch.no_grad():
        got = wide.get_posterior().log_prob(z.double())
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-4)
    # a loaded guide resumes training, its df included, once the store is cleared (the
    # store would otherwise hand SVI the original's tensors)
    pyro.clear_param_store()
    before = copies[2].base_log_df.detach().clone()
    svi = SVI(_t_model, copies[2], pyro.optim.Adam({"lr": 1e-1}), Trace_ELBO())
    for _ in range(3):
        svi.step()
    assert not torch.equal(copies[2].base_log_df, before)
    pyro.clear_param_store()


def test_student_t_base_in_float64_scores_its_draws_exactly(float64_default):
    # log q of its own draws must be the t base's log density minus log|det J|, to rounding
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("s", dist.HalfCauchy(1.0))

    pyro.clear_param_store()
    guide = AutoResidualFlow(model, base="student_t", base_df=3.0)
    assert guide()["s"].dtype == torch.float64
    assert guide.base_log_df.dtype == torch.float64
    with torch.no_grad():
        gen = torch.Generator().manual_seed(26)
        for p in guide.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    df = 1 + guide.base_log_df.detach().exp()
    posterior = guide.get_posterior()
    u = dist.StudentT(df).sample((4,))
    flow = guide.get_transform()
    log_q = posterior.log_prob(flow(u))
    for k in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: flow.call(v, cached=False), u[k])
        ref = dist.StudentT(df).log_prob(u[k]).sum() - torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(log_q[k], ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "options, error, message",
    [
        (
            {"base": "Student_t"},
            ValueError,
            "base must be 'normal' or 'student_t', got 'Student_t'",
        ),
        ({"base": None}, ValueError, "base must be 'normal' or 'student_t', got None"),
        ({"base_df": 0}, ValueError, "base_df must be a finite number > 1, got 0"),
        ({"base_df": 1}, ValueError, "base_df must be a finite number > 1, got 1"),
        ({"base_df": math.nan}, ValueError, "base_df must be a finite number > 1, got nan"),
        ({"base_df": math.inf}, ValueError, "base_df must be a finite number > 1, got inf"),
        ({"base_df": "10"}, TypeError, "base_df must be a real number, got '10'"),
        ({"base_df": True}, TypeError, "base_df must be a real number, got True"),
        ({"base_df": torch.tensor(5.0)}, TypeError, r"base_df must be a real number, got tensor"),
        # before: accepted, and float32 StudentT.log_prob lost its normaliser (0.92 nats
        # per coordinate at 1e7), so evidence and importance weights came out wrong
        ({"base_df": 1e7}, ValueError, r"base_df must be <= 1000 .* got 10000000.0"),
    ],
)
def test_bad_base_options_fail_naming_option_and_value(options, error, message):
    with pytest.raises(error, match=message):
        AutoResidualFlow(_tiny_model, **{"base": "student_t", **options})


@pytest.mark.parametrize("base", ["normal", "student_t"])
@pytest.mark.parametrize("how", ["deepcopy", "torch.load"])
def test_a_copy_trained_in_the_same_process_trains_and_the_original_still_does(base, how):
    # found by the user trial: the copy has the original's parameter names, so pyro.param
    # handed SVI the original's stored tensors and the copy silently never trained
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    original = AutoResidualFlow(_gauss_model, base=base)
    svi = SVI(_gauss_model, original, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(5):
        svi.step()
    if how == "deepcopy":
        twin = copy.deepcopy(original)
    else:
        buffer = io.BytesIO()
        torch.save(original, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)

    def snapshot(guide):
        return [p.detach().clone() for p in guide.parameters()]

    def moved(before, guide):
        return any(not torch.equal(b, p) for b, p in zip(before, guide.parameters()))

    twin_before, original_before = snapshot(twin), snapshot(original)
    twin_svi = SVI(_gauss_model, twin, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(5):
        twin_svi.step()
    assert moved(twin_before, twin) and not moved(original_before, original)
    if base == "student_t":
        # the learned tails are claimed too, not only the flow's layers
        df_index = [name for name, _ in twin.named_parameters()].index("base_log_df")
        assert not torch.equal(twin_before[df_index], twin.base_log_df)
    original_before = snapshot(original)
    for _ in range(5):
        svi.step()
    assert moved(original_before, original)
    pyro.clear_param_store()


def test_base_df_with_a_normal_base_is_refused_and_learned_df_is_held_at_its_bound():
    with pytest.raises(ValueError, match="base_df applies to base='student_t' only, got base_df=5"):
        AutoResidualFlow(_tiny_model, base_df=5)
    pyro.clear_param_store()
    guide = AutoResidualFlow(_tiny_model, base="student_t")
    guide()
    with torch.no_grad():
        guide.base_log_df.fill_(30.0)  # df = 1 + e^30, as a long run could drift to
    df = guide.get_base_dist().base_dist.df
    assert float(df.max()) == 1000.0
    pyro.clear_param_store()
