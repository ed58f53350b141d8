"""Neural posterior estimation pieces: support map, z-scoring, embedding, fitting helper."""

import copy
import math
import pickle

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_invres import conditional_affine_coupling
from pyro_invres.checkpoint import CheckpointError, load_checkpoint
from pyro_invres.flows import conditional_residual_flow
from pyro_invres.npe import ConditionalFlow, fit_conditional, support_transform
from pyro_invres.npe.fit import _split

LO = torch.tensor([-1.0, 0.0])
HI = torch.tensor([1.0, 3.0])


def _perturb(module: torch.nn.Module, seed: int = 0, size: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(size * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _box_flow(dtype: torch.dtype = torch.float64, support: bool = True) -> ConditionalFlow:
    torch.manual_seed(0)
    # i-ResNet blocks only: perturbed couplings make the density too peaked for the
    # 400 x 400 grid of the mass test (the preset's own density: test_conditional_affine)
    transform = conditional_residual_flow(
        2, 3, num_blocks=2, hidden_dims=[16], couplings=False, context_affine=False
    )
    box = dist.Uniform(LO.to(dtype), HI.to(dtype)).to_event(1).support if support else None
    flow = ConditionalFlow(transform, 2, 3, support=box).to(dtype)
    _perturb(flow)
    return flow.eval()


# -- the support map ------------------------------------------------------------------------------
def test_every_sample_lies_in_the_support_even_far_out() -> None:
    flow = _box_flow(torch.float32)
    with torch.no_grad():
        flow.parameter_norm.scale.fill_(40.0)  # pushes most draws far past the bounds
    x = torch.randn(3, 3)
    theta = flow.condition(x).sample((4000,))
    support = dist.Uniform(LO, HI).to_event(1).support
    assert bool(support.check(theta).all())
    # a draw that rounded onto a bound is scored from the cached unconstrained point
    assert bool(torch.isfinite(flow.condition(x).log_prob(theta)).all())


def test_log_prob_integrates_to_one_over_the_box() -> None:
    flow = _box_flow()
    n = 400
    g0 = LO[0] + (HI[0] - LO[0]) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    g1 = LO[1] + (HI[1] - LO[1]) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    grid = torch.stack(torch.meshgrid(g0, g1, indexing="ij"), -1).reshape(-1, 2)
    cell = float((HI - LO).prod()) / n**2
    x = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    with torch.no_grad():
        mass = float(flow.condition(x).log_prob(grid).exp().sum()) * cell
    assert abs(mass - 1.0) < 2e-3


def test_log_prob_is_the_change_of_variables_by_hand() -> None:
    bounded = _box_flow()
    free = ConditionalFlow(bounded.transform, 2, 3).double().eval()  # same flow, no support
    # the same parameters on purpose, scored without the support map: leave out the digest
    # of the support they were trained on, which would (rightly) refuse the load
    free.load_state_dict({k: v for k, v in bounded.state_dict().items() if k != "support_digest"})
    theta = LO + (HI - LO) * torch.rand(50, 2, dtype=torch.float64)
    x = torch.randn(50, 3, dtype=torch.float64)
    p = (theta - LO) / (HI - LO)
    u = torch.log(p) - torch.log1p(-p)
    dtheta_du = (HI - LO) * torch.sigmoid(u) * torch.sigmoid(-u)
    expected = free.condition(x).log_prob(u) - dtheta_du.log().sum(-1)
    got = bounded.condition(x).log_prob(theta)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


def test_support_transform_refuses_what_it_cannot_map() -> None:
    with pytest.raises(ValueError, match="torch constraint"):
        support_transform("interval", 2)
    with pytest.raises(ValueError, match="event_dim 2"):
        support_transform(constraints.positive_definite, 2)
    with pytest.raises(ValueError, match="does not fit parameters of dimension 2"):
        support_transform(dist.Uniform(torch.zeros(3), torch.ones(3)).to_event(1).support, 2)
    assert support_transform(constraints.real_vector, 2) is None
    assert support_transform(constraints.positive, 2)(torch.zeros(2)).tolist() == [1.0, 1.0]


# -- z-scoring ------------------------------------------------------------------------------------
def test_z_scoring_enters_the_density_with_its_log_det() -> None:
    flow = _box_flow(support=False)
    plain = copy.deepcopy(flow)
    theta = 5.0 + 3.0 * torch.randn(200, 2, dtype=torch.float64)
    obs = 100.0 + 20.0 * torch.randn(200, 3, dtype=torch.float64)
    flow.standardize(theta, obs)
    mu, sigma = flow.parameter_norm.loc, flow.parameter_norm.scale
    m, s = flow.context_norm.loc, flow.context_norm.scale
    expected = plain.condition((obs - m) / s).log_prob((theta - mu) / sigma) - sigma.log().sum()
    torch.testing.assert_close(flow.condition(obs).log_prob(theta), expected)
    torch.testing.assert_close(mu, theta.mean(0))
    torch.testing.assert_close(s, obs.std(0, correction=0))


def test_standardization_is_kept_in_the_state_dict() -> None:
    flow = _box_flow()
    theta = LO + (HI - LO) * torch.rand(300, 2, dtype=torch.float64)
    obs = 7.0 * torch.randn(300, 3, dtype=torch.float64)
    flow.standardize(theta, obs)
    state = flow.state_dict()
    for key in (
        "parameter_norm.loc",
        "parameter_norm.scale",
        "context_norm.loc",
        "context_norm.fitted",
    ):
        assert key in state
    fresh = _box_flow()
    x = torch.randn(4, 3, dtype=torch.float64)
    before = fresh.condition(x).log_prob(theta[:4])
    fresh.load_state_dict(state)
    torch.testing.assert_close(
        fresh.condition(x).log_prob(theta[:4]), flow.condition(x).log_prob(theta[:4])
    )
    assert not torch.allclose(before, fresh.condition(x).log_prob(theta[:4]))
    assert bool(fresh.context_norm.fitted)


def test_parameters_are_standardised_on_the_unconstrained_side() -> None:
    flow = _box_flow()
    theta = LO + (HI - LO) * torch.rand(1000, 2, dtype=torch.float64)
    flow.standardize(theta)
    p = (theta - LO) / (HI - LO)
    torch.testing.assert_close(flow.parameter_norm.loc, (p.log() - (-p).log1p()).mean(0))
    assert not bool(flow.context_norm.fitted)


def test_standardize_leaves_no_cached_pair_behind() -> None:
    # standardize maps theta without a graph; a later log_prob of that very tensor must
    # still be differentiable in it (an identity-keyed cache would hand back the old pair)
    flow = _box_flow()
    theta = (LO + (HI - LO) * torch.rand(20, 2, dtype=torch.float64)).requires_grad_()
    x = torch.randn(20, 3, dtype=torch.float64)
    flow.standardize(theta)
    fresh = copy.deepcopy(flow)
    (grad,) = torch.autograd.grad(flow.condition(x).log_prob(theta).sum(), theta)
    other = theta.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(fresh.condition(x).log_prob(other).sum(), other)
    torch.testing.assert_close(grad, expected)


def test_a_flow_with_a_support_pickles_and_deep_copies() -> None:
    flow = _box_flow()
    x = torch.randn(5, 3, dtype=torch.float64)
    theta = flow.condition(x).sample()
    for other in (copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))):
        torch.testing.assert_close(
            other.condition(x).log_prob(theta), flow.condition(x).log_prob(theta)
        )


# -- the embedding network --------------------------------------------------------------------
def _embedded_flow() -> ConditionalFlow:
    torch.manual_seed(1)
    embedding = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ELU(), torch.nn.Linear(8, 3))
    transform = [conditional_affine_coupling(2, 3, [16]), *conditional_residual_flow(2, 3, 1, [16])]
    return ConditionalFlow(transform, 2, 6, embedding=embedding)


def test_the_embedding_shapes_the_context_and_gets_gradients() -> None:
    flow = _embedded_flow()
    _perturb(flow.transform)
    x = torch.randn(4, 6)
    theta = flow.condition(x).sample((3,))
    assert theta.shape == (3, 4, 2)
    flow.condition(x).log_prob(theta).sum().backward()
    assert all(
        p.grad is not None and bool(p.grad.abs().sum() > 0) for p in flow.embedding.parameters()
    )
    with pytest.raises(ValueError, match=r"observations of shape \(\.\.\., 6\)"):
        flow.condition(torch.randn(4, 3))
    flow.embedding = torch.nn.Flatten(0)  # drops the batch: refused, naming the shapes
    with pytest.raises(ValueError, match=r"the embedding must map observations \(4, 6\)"):
        flow.condition(torch.randn(4, 6))


# -- the fitting helper -------------------------------------------------------------------------
def _pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta = 2 * torch.rand(n, 2, generator=g) - 1
    return theta, theta + 0.1 * torch.randn(n, 2, generator=g)


def _small_flow(embedding: torch.nn.Module | None = None, context_dim: int = 2) -> ConditionalFlow:
    torch.manual_seed(0)
    box = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1).support
    transform = conditional_residual_flow(2, 2, num_blocks=2, hidden_dims=[32], activation="elu")
    return ConditionalFlow(transform, 2, context_dim, embedding=embedding, support=box)


def test_fit_learns_a_posterior_and_ends_on_its_best_epoch() -> None:
    theta, x = _pairs(600)
    flow = _small_flow()
    result = fit_conditional(flow, theta, x, lr=2e-2, batch_size=100, max_epochs=8, progress=False)
    assert result.n_train == 540 and result.n_validation == 60 and result.epochs == 8
    assert result.validation_losses[-1] < result.validation_losses[0] - 0.2
    assert result.best_validation_loss == min(result.validation_losses)
    # the flow holds the best epoch's parameters: its validation loss is the best one
    _, val = _split(600, 0.1, 0)
    with torch.no_grad():
        loss = -float(flow.condition(x[val]).log_prob(theta[val]).mean())
    assert math.isclose(loss, result.best_validation_loss, rel_tol=1e-5, abs_tol=1e-6)
    draws = flow.condition(torch.tensor([0.3, -0.4])).sample((2000,))
    assert torch.allclose(draws.mean(0), torch.tensor([0.3, -0.4]), atol=0.15)
    assert bool((draws.std(0) < 0.4).all())  # the prior's is 0.58
    assert bool(flow.parameter_norm.fitted) and bool(flow.context_norm.fitted)


def test_early_stopping_waits_stop_after_epochs() -> None:
    theta, x = _pairs(60)  # tiny: the validation loss soon stops improving
    flow = _small_flow()
    result = fit_conditional(
        flow, theta, x, lr=3e-2, batch_size=10, stop_after_epochs=3, max_epochs=300, progress=False
    )
    assert result.stopped_early
    assert result.epochs == result.best_epoch + 3
    assert all(
        v >= result.best_validation_loss for v in result.validation_losses[result.best_epoch :]
    )


def test_the_embedding_trains_with_the_flow() -> None:
    theta, x = _pairs(400)
    embedding = torch.nn.Linear(2, 2)
    before = embedding.weight.detach().clone()
    flow = _small_flow(embedding)
    fit_conditional(flow, theta, x, lr=1e-2, batch_size=100, max_epochs=2, progress=False)
    assert not torch.equal(before, embedding.weight.detach())


def test_resume_continues_exactly(tmp_path) -> None:
    theta, x = _pairs(300)
    whole = _small_flow()
    ref = fit_conditional(whole, theta, x, lr=1e-2, batch_size=50, max_epochs=6, progress=False)
    path = tmp_path / "npe.pt"
    part = _small_flow()
    fit_conditional(
        part, theta, x, lr=1e-2, batch_size=50, max_epochs=3, checkpoint_path=path, progress=False
    )
    assert load_checkpoint(path)["step"] == 3
    resumed = _small_flow()
    out = fit_conditional(
        resumed,
        theta,
        x,
        lr=1e-2,
        batch_size=50,
        max_epochs=6,
        checkpoint_path=path,
        resume=True,
        progress=False,
    )
    assert out.train_losses == ref.train_losses and out.validation_losses == ref.validation_losses
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="other data"):
        fit_conditional(
            _small_flow(),
            theta,
            x + 0.01,
            max_epochs=6,
            checkpoint_path=path,
            resume=True,
            progress=False,
        )


def test_fit_refuses_data_that_do_not_fit() -> None:
    theta, x = _pairs(100)
    flow = _small_flow()
    with pytest.raises(ValueError, match="outside the flow's support"):
        fit_conditional(flow, theta * 2, x, progress=False)
    with pytest.raises(ValueError, match=r"x must be a tensor \(N, 2\)"):
        fit_conditional(flow, theta, x[:, :1], progress=False)
    with pytest.raises(ValueError, match="pair up"):
        fit_conditional(flow, theta, x[:50], progress=False)
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="x has 1 row"):
        fit_conditional(flow, theta, bad, progress=False)
    with pytest.raises(ValueError, match="leave 0 for validation"):
        fit_conditional(flow, theta[:5], x[:5], progress=False)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_path"):
        fit_conditional(flow, theta, x, resume=True, progress=False)


def test_pyro_conditional_flows_train_with_the_same_helper() -> None:
    from pyro.distributions.transforms import conditional_spline

    theta, x = _pairs(200)
    box = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1).support
    flow = ConditionalFlow(conditional_spline(2, 2, [16]), 2, 2, support=box)
    result = fit_conditional(flow, theta, x, max_epochs=2, progress=False)
    assert result.epochs == 2 and flow.condition(x[:3]).sample((4,)).shape == (4, 3, 2)


def test_progress_bar_runs() -> None:
    theta, x = _pairs(100)
    result = fit_conditional(_small_flow(), theta, x, max_epochs=1, progress=True)
    assert result.epochs == 1


# -- found trying the NPE tutorial as a new user ---------------------------------------------------
def test_the_posterior_has_the_priors_support_and_no_mass_outside() -> None:
    flow = _small_flow()
    q = flow.condition(torch.zeros(2))
    assert q.support.check(torch.tensor([0.5, -0.5])) and not q.support.check(
        torch.tensor([1.5, 0.0])
    )
    outside = torch.tensor([[1.5, 0.0], [0.5, 0.0]])
    with pytest.raises(ValueError, match="support"):
        q.log_prob(outside)  # Pyro's validation, on by default
    q = flow.condition(torch.zeros(2))
    q._validate_args = False
    lp = q.log_prob(outside)
    assert lp[0] == -math.inf and torch.isfinite(lp[1])
    assert torch.allclose(lp[1], flow.condition(torch.zeros(2)).log_prob(outside[1]))


def test_values_broadcast_against_a_batch_of_observations() -> None:
    flow = _small_flow()
    q = flow.condition(torch.randn(4, 2))
    one = torch.tensor([0.2, -0.3])
    lp = q.log_prob(one)
    assert lp.shape == (4,)
    assert torch.allclose(lp, q.log_prob(one.expand(4, 2)))
    assert q.log_prob(one.expand(5, 1, 2)).shape == (5, 4)


def test_a_state_dict_refuses_a_flow_on_another_support() -> None:
    flow = _small_flow()
    unbounded = ConditionalFlow(
        conditional_residual_flow(2, 2, num_blocks=1, hidden_dims=[8]), 2, 2
    )
    with pytest.raises(RuntimeError, match="support"):
        unbounded.load_state_dict(flow.state_dict())
    legacy = flow.state_dict()
    legacy.pop("support_digest")  # saved before the support was recorded: still loads
    assert not _small_flow().load_state_dict(legacy).missing_keys


def test_parameters_on_the_supports_boundary_are_refused() -> None:
    theta, x = _pairs(100)
    theta[7, 1] = -1.0  # a Uniform(-1, 1) draw of exactly the lower bound
    with pytest.raises(ValueError, match=r"1 of 100 parameter rows lie on the boundary.*row 7"):
        fit_conditional(_small_flow(), theta, x, progress=False)


def test_an_existing_checkpoint_is_never_silently_replaced(tmp_path) -> None:
    theta, x = _pairs(200)
    path = tmp_path / "npe.pt"
    fit_conditional(_small_flow(), theta, x, max_epochs=2, checkpoint_path=path, progress=False)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="resume=True.*overwrite=True"):
        fit_conditional(_small_flow(), theta, x, max_epochs=1, checkpoint_path=path, progress=False)
    assert path.read_bytes() == before
    fit_conditional(
        _small_flow(), theta, x, max_epochs=1, checkpoint_path=path, overwrite=True, progress=False
    )
    assert load_checkpoint(path)["step"] == 1


def test_resume_applies_a_new_learning_rate(tmp_path) -> None:
    theta, x = _pairs(200)
    path = tmp_path / "npe.pt"
    fit_conditional(_small_flow(), theta, x, max_epochs=2, checkpoint_path=path, progress=False)
    fit_conditional(
        _small_flow(),
        theta,
        x,
        lr=1e-2,
        max_epochs=3,
        checkpoint_path=path,
        resume=True,
        progress=False,
    )
    groups = load_checkpoint(path)["optim_state"]["groups"]
    assert groups and all(g["lr"] == 1e-2 for g in groups)
