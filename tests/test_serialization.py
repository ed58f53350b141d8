"""Saving and restoring: state dicts, an AutoNormalizingFlow guide, TorchScript, torch.compile.

That every block and preset, trained a little, saved with ``torch.save`` and reloaded
with ``torch.load(weights_only=True)`` into a block built from another seed, agrees
*exactly* in forward, inverse and both log-dets is checked for all of them in
``tests/test_contract.py``. Here: the power-iteration vectors of the spectral norms (``u``,
``v``, ``fresh``) and ActNorm's ``initialized`` flag are buffers, so they travel with the
state; a warm start is history, not state; a guide; tracing and compiling.

What does not work is pinned here too, as tests of the documented behaviour (see
``docs/reliability.md``): tracing anything that calls ``torch.autograd.grad`` (the exact
i-ResNet log-det), Pyro's ``JitTrace_ELBO`` with ``AutoNormalizingFlow``, restoring a guide
from Pyro's param store alone, and the inductor backend on residual flows.
"""

from __future__ import annotations

import io
import warnings
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import seeded_outputs
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormalizingFlow
from pyro.optim import Adam

from pyro_invres import (
    ActNorm,
    ChannelPermutation,
    Inverse,
    InvertibleResidual,
    additive_coupling,
    affine_coupling,
    base_shape,
    glow,
    iresnet,
    residual_flow,
)
from pyro_invres.nn import LipschitzMLP

CONTEXT = 2
IMAGE = (1, 4, 4)


def build_inverse(seed: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """An i-ResNet whose Pyro forward is the iterative side, and its event shape."""
    torch.manual_seed(seed)
    return Inverse(iresnet(3, [8])), (3,)


def conditioned(module: torch.nn.Module) -> torch.nn.Module:
    """The block to run: conditional modules get a fixed context."""
    if hasattr(module, "condition"):
        return module.condition(torch.linspace(-1.0, 1.0, CONTEXT))
    return module


def outputs(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Forward, inverse and both log-dets, each on a fresh tensor, with a fixed seed."""
    return seeded_outputs(conditioned(module), x, y)


def train_a_little(module: torch.nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    """Data-initialise, then a few optimizer steps (the last one unseen by any forward)."""
    params = list(module.parameters())
    opt = torch.optim.Adam(params, lr=1e-2) if params else None
    for _ in range(steps):
        t = conditioned(module)
        y = t(x.clone())
        loss = y.square().mean() - t.log_abs_det_jacobian(x, y).mean()
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()


def save_and_load(module: torch.nn.Module, into: torch.nn.Module) -> None:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    result = into.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys


def residual_blocks(module: torch.nn.Module) -> list[InvertibleResidual]:
    return [m for m in module.modules() if isinstance(m, InvertibleResidual)]


def test_warm_start_is_history_not_state():
    """Documented: in training, after an optimizer step, the iterative side starts from the
    block's cached (stale) solution where that is closer; the cache is not saved, so a
    reloaded block cold-starts and agrees within the solver tolerance, not bit for bit.
    Evaluation mode never warm-starts (exact: ``tests/test_contract.py``), nor does
    ``warm_start=False``."""
    original, shape = build_inverse(seed=0)  # Pyro's forward is the iterative side
    torch.manual_seed(1)
    x = torch.randn(5, *shape)
    train_a_little(original, x)
    clone, _ = build_inverse(seed=99)
    save_and_load(original, clone)
    residual_blocks(original)[0].solve_stats.reset()
    a, b = original(x.clone()), clone(x.clone())
    assert residual_blocks(original)[0].solve_stats.warm_starts == 1
    assert residual_blocks(clone)[0].solve_stats.warm_starts == 0
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_power_iteration_and_actnorm_state_are_in_the_state_dict():
    flow = residual_flow(3, num_blocks=1, hidden_dims=[8])
    keys = set(flow.state_dict())
    for suffix in (".u", ".v", ".fresh", ".initialized"):
        assert any(k.endswith(suffix) for k in keys), suffix
    assert all(not k.endswith(".original") or "parametrizations" in k for k in keys)


# -- an AutoNormalizingFlow guide ----------------------------------------------------------------
def banana():
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("b", dist.Normal(a**2, 0.3))


GUIDE_FLOW = partial(residual_flow, num_blocks=2)


def trained_guide(steps: int = 3) -> AutoNormalizingFlow:
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    guide = AutoNormalizingFlow(banana, GUIDE_FLOW)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(banana, guide, Adam({"lr": 1e-2}), elbo)
    for _ in range(steps):
        svi.step()
    return guide


def guide_outputs(guide: AutoNormalizingFlow) -> list[torch.Tensor]:
    z = torch.linspace(-2.0, 2.0, 10).reshape(5, 2)
    out = outputs(guide.transform, z, z.flip(0))
    pyro.set_rng_seed(3)
    sample = guide()
    return out + [sample["a"].detach(), sample["b"].detach()]


def test_guide_state_dict_restores_the_guide_exactly():
    guide = trained_guide()
    buffer = io.BytesIO()
    torch.save(guide.state_dict(), buffer)
    buffer.seek(0)

    pyro.clear_param_store()
    torch.manual_seed(42)
    fresh = AutoNormalizingFlow(banana, GUIDE_FLOW)
    fresh()  # the guide builds its transform on first use; the state needs it
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for training in (True, False):
        guide.train(training)
        fresh.train(training)
        a, b = guide_outputs(guide), guide_outputs(fresh)
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    # the param store holds the restored module's own tensors: training goes on from here
    store = pyro.get_param_store()
    restored = dict(fresh.transform.named_parameters())
    for name, value in store.items():
        if "transform$$$" in name:
            assert value is restored[name.split("$$$")[1]]


def test_param_store_state_alone_does_not_restore_the_flow():
    """Documented: Pyro's param store holds no buffers and does not write into the flow.

    ``AutoNormalizingFlow`` registers its transform with ``pyro.module`` (without
    ``update_module_params``), so a fresh guide keeps its own freshly initialised (and
    data-initialised) parameters even after ``get_param_store().set_state(saved)``; the
    spectral-norm vectors and ActNorm's flag are buffers, not params, and are not saved.
    Save ``guide.state_dict()`` instead.
    """
    guide = trained_guide()
    saved = pyro.get_param_store().get_state()
    expected = guide_outputs(guide)

    pyro.clear_param_store()
    torch.manual_seed(42)
    fresh = AutoNormalizingFlow(banana, GUIDE_FLOW)
    pyro.get_param_store().set_state(saved)
    fresh()
    got = guide_outputs(fresh)
    assert not torch.equal(expected[0], got[0])
    store_value = pyro.get_param_store()["AutoNormalizingFlow.transform$$$1.log_scale"]
    assert store_value is not fresh.transform[1].log_scale


# -- TorchScript tracing -------------------------------------------------------------------------
class Sampler(torch.nn.Module):
    """Base noise -> (sample, log-det): what a traced guide computes."""

    def __init__(self, transform: torch.nn.Module, with_logdet: bool = True) -> None:
        super().__init__()
        self.transform = transform
        self.with_logdet = with_logdet

    def forward(self, z: torch.Tensor):
        y = self.transform(z)
        if not self.with_logdet:
            return y
        return y, self.transform.log_abs_det_jacobian(z, y)


def trace(module: torch.nn.Module, example: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings
        return torch.jit.trace(module, (example,), check_trace=False)


def coupling_guide_flow(dim: int) -> ComposeTransformModule:
    parts = [ActNorm(dim), affine_coupling(dim, [8]), ChannelPermutation(dim, event_dim=1)]
    return ComposeTransformModule(parts + [additive_coupling(dim, [8])])


@pytest.mark.parametrize("training", [True, False])
def test_traced_coupling_flow_reproduces_samples_and_logdets(training):
    torch.manual_seed(0)
    flow = coupling_guide_flow(4)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    flow(torch.randn(8, 4))  # data-initialise ActNorm before tracing (see the test below)
    flow.train(training)
    pyro.enable_validation(False)  # the finite check is a Python branch: keep it out
    traced = trace(Sampler(flow), torch.randn(5, 4))
    z = torch.randn(7, 4)
    for u, v in zip(traced(z), Sampler(flow)(z.clone())):
        assert torch.equal(u, v)


def test_traced_explicit_residual_direction_reproduces_samples():
    torch.manual_seed(0)
    flow = residual_flow(2, num_blocks=2, hidden_dims=[8], actnorm=False).eval()
    traced = trace(Sampler(flow, with_logdet=False), torch.randn(5, 2))
    z = torch.randn(7, 2)
    assert torch.equal(traced(z), flow(z.clone()))


def test_traced_exact_residual_logdet_matches_eager():
    """The network carries its Jacobian forward (no autograd.grad inside the map), so a
    trace records the exact log-det too."""
    torch.manual_seed(0)
    flow = residual_flow(2, num_blocks=2, hidden_dims=[8], actnorm=False).eval()
    traced = trace(Sampler(flow), torch.randn(5, 2))
    z = torch.randn(7, 2)
    for u, v in zip(traced(z), Sampler(flow)(z.clone())):
        assert torch.equal(u, v)


class OpaqueNet(torch.nn.Module):
    """A Lipschitz network that does not carry its Jacobian (any user's network)."""

    def __init__(self) -> None:
        super().__init__()
        self.g = LipschitzMLP(2, [8], lipschitz=0.9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(x)


def test_tracing_the_vjp_exact_logdet_fails():
    """Documented: without a carried Jacobian the exact log-det differentiates inside the
    map (torch.autograd.grad with batched vector-Jacobian products), which torch.jit.trace
    cannot record."""
    torch.manual_seed(0)
    block = InvertibleResidual(OpaqueNet(), 2, lipschitz=0.9).eval()
    assert not block._carries_jacobian()
    with pytest.raises(AssertionError, match="sym_eq"):
        trace(Sampler(block), torch.randn(5, 2))


def test_tracing_spectral_norm_in_training_mode_is_refused():
    """A trace would freeze the norm refresh: the bound would go stale as weights train."""
    block = iresnet(2, [8])
    with pytest.raises(RuntimeError, match="cannot be traced in training mode"):
        trace(Sampler(block, with_logdet=False), torch.randn(5, 2))


def test_tracing_an_iterative_direction_is_refused():
    """Documented: the solver evaluates the normalised weights once per solve inside
    ``torch.nn.utils.parametrize.cached()``, which refuses tracing with a clear error
    (a trace would also freeze the solver's data-dependent iteration count)."""
    torch.manual_seed(0)
    block = iresnet(2, [8], explicit="inverse")
    with pytest.raises(RuntimeError, match="Cannot trace a model while caching parametrizations"):
        trace(Sampler(block, with_logdet=False), torch.randn(5, 2))


def test_tracing_an_uninitialised_actnorm_fails_clearly():
    with pytest.raises((ValueError, RuntimeError)) as error:
        trace(Sampler(ActNorm(2), with_logdet=False), torch.randn(5, 2))
    assert "ActNorm" in str(error.value), str(error.value)[:200]


class NoAliasNormalizingFlow(AutoNormalizingFlow):
    """AutoNormalizingFlow without the parameter alias that breaks ``JitTrace_ELBO``.

    Pyro's ``get_posterior`` stores the first transform parameter again as
    ``_prototype_tensor``, registering one tensor under two param-store names; jit tracing
    then receives it twice and ``pyro.ops.jit`` fails its identity assertion.
    """

    def get_posterior(self, *args, **kwargs):
        if self.transform is None:
            self.transform = self._init_transform_fn(self.latent_dim)
            first = next(self.transform.parameters(), None)
            if first is not None:
                self._prototype_tensor = first.new_zeros(())  # a plain tensor, no alias
        return super(AutoNormalizingFlow, self).get_posterior(*args, **kwargs)


def jit_svi_losses(guide, steps: int = 2) -> list[float]:
    svi = SVI(banana, guide, Adam({"lr": 1e-2}), JitTrace_ELBO(max_plate_nesting=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [svi.step() for _ in range(steps)]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="upstream: pyro-ppl/pyro#3132 (JitTrace_ELBO fails with AutoNormalizingFlow: "
    "get_posterior aliases the first parameter as _prototype_tensor); Pyro's own "
    "AutoIAFNormal fails the same way. Workaround: NoAliasNormalizingFlow below",
)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: AutoNormalizingFlow(banana, coupling_guide_flow), id="couplings"),
        pytest.param(lambda: AutoIAFNormal(banana, hidden_dim=[8]), id="pyro-AutoIAFNormal"),
    ],
)
def test_jit_trace_elbo_runs_auto_normalizing_flow(make):
    """What a user should get (and gets with the alias removed, below)."""
    torch.manual_seed(0)
    losses = jit_svi_losses(make())
    assert all(torch.isfinite(torch.tensor(losses)))


def test_jit_trace_elbo_with_the_alias_removed():
    """With the alias removed, coupling flows run under JitTrace_ELBO; residual flows are
    refused with a clear error (a trace would freeze the spectral-norm refresh)."""
    torch.manual_seed(0)
    losses = jit_svi_losses(NoAliasNormalizingFlow(banana, coupling_guide_flow))
    assert all(torch.isfinite(torch.tensor(losses)))
    pyro.clear_param_store()
    with pytest.raises(RuntimeError, match="cannot be traced in training mode"):
        jit_svi_losses(NoAliasNormalizingFlow(banana, GUIDE_FLOW))


# -- torch.compile -------------------------------------------------------------------------------
def density(explicit: str):
    torch.manual_seed(0)
    flow = residual_flow(2, num_blocks=1, hidden_dims=[8], explicit=explicit, logdet="exact")
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), flow)
    x = torch.randn(16, 2)
    d.log_prob(x.clone())  # data-initialise ActNorm, refresh the spectral norms
    return d, x


def compiled_matches_eager(d, x, backend: str, exact: bool) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(d.log_prob, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = compiled(x.clone())
    expected = d.log_prob(x.clone())
    if exact:
        assert torch.equal(got, expected)
    else:
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_compiled_log_prob_matches_eager():
    d, x = density("inverse")
    compiled_matches_eager(d, x, "eager", exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("explicit", ["inverse", "forward"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_log_prob_matches_eager_backends(backend, explicit):
    d, x = density(explicit)
    # the explicit direction is bitwise; the iterative one agrees within its tolerance
    compiled_matches_eager(d, x, backend, exact=explicit == "inverse")


@pytest.mark.slow
def test_compiled_glow_log_prob_matches_eager():
    torch.manual_seed(0)
    flow = glow(IMAGE, num_scales=1, steps_per_scale=1, hidden_channels=4)
    base = dist.Normal(torch.zeros(base_shape(flow, IMAGE)), 1.0).to_event(3)
    d = dist.TransformedDistribution(base, flow)
    x = torch.rand(8, *IMAGE)
    d.log_prob(x.clone())
    compiled_matches_eager(d, x, "aot_eager", exact=True)


@pytest.mark.slow
def test_inductor_matches_eager_with_the_carried_jacobian():
    """The exact log-det from the Jacobian the network carries forward is plain tensor
    algebra, so inductor compiles it: values and parameter gradients match eager."""
    d, x = density("inverse")
    compiled_matches_eager(d, x, "inductor", exact=False)
    params = [p for p in d.transforms[0].parameters() if p.requires_grad]
    torch._dynamo.reset()
    compiled = torch.compile(d.log_prob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.autograd.grad(compiled(x.clone()).sum(), params, allow_unused=True)
    expected = torch.autograd.grad(d.log_prob(x.clone()).sum(), params, allow_unused=True)
    for a, b in zip(got, expected):
        if b is not None:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="upstream: pytorch/pytorch#138422 (vmap with torch.autograd.grad does not work "
    "on the output of an inductor-compiled function: a BatchedTensor has no storage)",
)
def test_inductor_matches_eager_on_the_vjp_logdet():
    """Where the exact log-det takes batched vector-Jacobian products (a network without
    ``forward_with_jacobian``, or one with a forward hook), inductor's compiled backward of
    the residual branch cannot run under them; what a user should get is eager's value."""
    d, x = density("inverse")
    for part in d.transforms[0].parts:
        if hasattr(part, "solve_stats"):
            part.nn.register_forward_hook(lambda module, args, out: None)
    expected = d.log_prob(x.clone())
    torch._dynamo.reset()
    compiled = torch.compile(d.log_prob)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = compiled(x.clone())
    finally:
        torch._dynamo.reset()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
