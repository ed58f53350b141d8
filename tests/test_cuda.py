"""CUDA: every preset on the device, training, sampling, CPU/CUDA agreement, memory savers.

Every test here is marked ``cuda`` and skipped when ``torch.cuda.is_available()`` is
False (the skip is this module's own, no conftest needed). Run them on a machine with a
GPU with ``python -m pytest -m cuda``; the default run collects them and reports them
as skipped there too.

Agreement between devices is checked on copies of one flow (``copy.deepcopy`` then
``.to("cuda")``: the same weights, buffers and spectral-norm vectors), in float64, on the
deterministic paths: the exact log-det, explicit passes and the solvers of the iterative
side. The stochastic log-dets draw their probes from a generator on the input's device,
and CPU and CUDA generators give different streams from one seed, so those are checked
on CUDA against themselves (the memory-saving gradient modes against each other, and
their memory against plain back-propagation).
"""

import copy
import gc
import math

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.torch_transform import ComposeTransformModule

from pyro_invres import (
    glow,
    initialize_actnorm,
    iresnet,
    irevnet,
    residual_flow,
    reversible_stack,
    revnet_block,
)
from pyro_invres.datasets import sample_toy
from pyro_invres.evaluation import evaluate_nll, make_density
from pyro_invres.flows import FLOWS, PRESETS, base_shape, build_flow
from pyro_invres.ops import Roulette, Series
from pyro_invres.train import fit_density, load_flow

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())"
    ),
]

DEVICE = torch.device("cuda")
F64 = torch.float64
# float64 on both devices: the same sums in another order differ by ~1e-15 relative; the
# solvers stop at 1e-10 (default_tolerances(float64)), so iterative results agree to ~1e-9
TIGHT = {"atol": 1e-9, "rtol": 1e-9}
SOLVED = {"atol": 1e-7, "rtol": 1e-7}


# -- helpers --------------------------------------------------------------------------------------
def perturb(module, scale=0.05, seed=1):
    """Move every parameter off its initial value (couplings start at the identity, where
    a log-det of zero agrees with anything)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def inflate(module, factor=3.0):
    """Scale the spectrally normalised weights up so the normalisation is active."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "original" in name or name.endswith("weight"):
                p.mul_(factor)


def settle(flow, data):
    """ActNorm initialised from ``data``, weights moved off their start, eval mode, no
    warm start (a solve starting from the last solution would depend on history)."""
    initialize_actnorm(flow, data)
    perturb(flow)
    flow.eval()
    for module in flow.modules():
        if hasattr(module, "warm_start"):
            module.warm_start = False
    return flow


def on_cuda(flow):
    """A CUDA copy with the same weights, after checking nothing was left on the CPU."""
    moved = copy.deepcopy(flow).to(DEVICE)
    tensors = list(moved.parameters()) + list(moved.buffers())
    assert tensors and all(t.device.type == "cuda" for t in tensors)
    # a transform that is not an nn.Module (as Pyro's Permute, which the coupling presets
    # put between blocks before they took ChannelPermutation) keeps its tensors where they
    # were: .to() never reaches them, and a CUDA input then meets a CPU index
    parts = getattr(moved, "parts", [])
    stray = [
        f"{type(part).__name__}.{name}"
        for part in parts
        if not isinstance(part, torch.nn.Module)
        for name, value in vars(part).items()
        if isinstance(value, torch.Tensor) and value.device.type != "cuda"
    ]
    assert not stray, f"left on the CPU by .to('cuda'): {stray}"
    return moved


def peak_bytes(step):
    """Peak CUDA memory allocated by ``step()`` above what was allocated before it."""
    step()  # once unmeasured: cuBLAS workspaces and the allocator's first blocks
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def grads_of(loss, tensors):
    """Gradients of ``loss``, zeros for a tensor it does not use."""
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


def vector_data(n=64, dim=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 2.0, dim, dtype=F64)
    return 1.0 + scale * torch.randn(n, dim, generator=generator, dtype=F64)


# -- device moves of every preset -----------------------------------------------------------------
@pytest.mark.parametrize("name", [*FLOWS, *PRESETS])
def test_every_named_flow_moves_to_cuda_and_scores_as_on_cpu(name):
    torch.manual_seed(0)
    data = vector_data()
    flow = settle(build_flow(name, 2).double(), data)
    with torch.no_grad():  # Pyro's transforms cache their pair: graph-free, it deep-copies
        here = make_density(flow, 2, dtype=F64).log_prob(data)
        moved = on_cuda(flow)
        there = make_density(moved, 2, DEVICE, F64).log_prob(data.to(DEVICE))
    assert there.device.type == "cuda"
    assert torch.isfinite(here).all()
    assert torch.allclose(there.cpu(), here, **TIGHT)


IMAGE_SHAPE = (1, 8, 8)
IMAGE_PRESETS = {
    "glow": lambda: glow(IMAGE_SHAPE, num_scales=2, steps_per_scale=1, hidden_channels=8),
    "irevnet": lambda: irevnet(IMAGE_SHAPE, num_scales=1, blocks_per_scale=2, hidden_channels=8),
    # logdet="exact": above 16 dimensions the default is the (random) roulette estimate
    "residual_flow": lambda: residual_flow(
        IMAGE_SHAPE, num_blocks=1, hidden_dims=[8], num_scales=2, explicit="inverse", logdet="exact"
    ),
}


@pytest.mark.parametrize("name", list(IMAGE_PRESETS))
def test_image_presets_move_to_cuda_and_score_as_on_cpu(name):
    torch.manual_seed(0)
    images = torch.rand(16, *IMAGE_SHAPE, dtype=F64, generator=torch.Generator().manual_seed(2))
    flow = settle(IMAGE_PRESETS[name]().double(), images)
    shape = tuple(base_shape(flow, IMAGE_SHAPE))
    with torch.no_grad():
        here = make_density(flow, shape, dtype=F64).log_prob(images)
        moved = on_cuda(flow)
        there = make_density(moved, shape, DEVICE, F64).log_prob(images.to(DEVICE))
    assert there.device.type == "cuda"
    assert torch.isfinite(here).all()
    assert torch.allclose(there.cpu(), here, **TIGHT)


# -- training and sampling on the device ----------------------------------------------------------
@pytest.mark.parametrize("name", [*PRESETS, *FLOWS])
def test_fit_density_trains_on_cuda_and_its_checkpoint_loads_on_cpu(name, tmp_path):
    train = sample_toy("moons", 1024, seed=0)
    test = sample_toy("moons", 512, seed=1)
    flow = build_flow(name, 2, num_blocks=2)
    path = tmp_path / "fit.pt"
    result = fit_density(
        flow,
        train,
        steps=4,
        batch_size=256,
        lr=1e-2,
        test_data=test,
        device="cuda",
        checkpoint_path=path,
        progress=False,
    )
    assert all(p.device.type == "cuda" for p in flow.parameters())
    assert len(result.losses) == 4 and all(math.isfinite(v) for v in result.losses)
    assert math.isfinite(result.train_nll) and math.isfinite(result.test_nll)
    # the checkpoint holds CPU tensors: the flow trained on the GPU scores alike on the CPU
    loaded = load_flow(path)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    on_cpu = evaluate_nll(loaded, test)
    assert on_cpu == pytest.approx(evaluate_nll(flow, test.to(DEVICE)), abs=1e-4)
    assert on_cpu == pytest.approx(result.test_nll, abs=1e-4)


def test_sampling_on_cuda_gives_finite_samples_that_score():
    flow = build_flow("iresnet-2d", 2, num_blocks=2)
    fit_density(flow, sample_toy("moons", 1024, seed=0), steps=4, device="cuda", progress=False)
    flow.eval()
    density = make_density(flow, 2, DEVICE)
    with torch.no_grad():
        samples = density.sample((500,))
        scores = density.log_prob(samples.clone())  # a clone: scored by the explicit pass
    assert samples.device.type == "cuda" and samples.shape == (500, 2)
    assert torch.isfinite(samples).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("solver", ["newton", "anderson", "fixed_point"])
def test_sampling_inverts_alike_on_cpu_and_cuda(solver):
    # explicit="inverse": sampling runs the solver (the iterative side) in every block
    torch.manual_seed(0)
    data = vector_data()
    flow = build_flow("iresnet", 2, num_blocks=2, hidden_dims=[32], solver=solver).double()
    inflate(flow)
    flow = settle(flow, data)
    z = torch.randn(256, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        here = flow(z)
        moved = on_cuda(flow)
        there = moved(z.to(DEVICE))
        back = moved.inv(there.clone())  # the explicit way back, not the cache
    assert there.device.type == "cuda"
    assert torch.allclose(there.cpu(), here, **SOLVED)
    assert torch.allclose(back.cpu(), z, **SOLVED)


# -- log-det and inverse: the same on both devices ------------------------------------------------
BLOCKS = {
    "vector, explicit forward": lambda: iresnet(3, [16, 16], explicit="forward", logdet="exact"),
    "vector, explicit inverse": lambda: iresnet(3, [16, 16], explicit="inverse", logdet="exact"),
    "vector, sine, newton": lambda: iresnet(
        2, [16], activation="sine", solver="newton", logdet="exact"
    ),
    "image": lambda: iresnet((2, 4, 4), [8], explicit="forward", logdet="exact"),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_logdet_inverse_and_gradients_agree_between_cpu_and_cuda(name):
    torch.manual_seed(0)
    block = BLOCKS[name]().double()
    inflate(block)
    shape = tuple(block.event_shape)
    x = torch.randn(8, *shape, dtype=F64, generator=torch.Generator().manual_seed(4))

    def outputs(b, x):
        x = x.clone().requires_grad_(True)
        y, ladj = b.call_and_ladj(x, cached=False)
        back, back_ladj = b.inverse_and_ladj(y.detach(), cached=False)
        loss = y.square().sum() - ladj.sum()  # through the solver: implicit gradients
        grads = grads_of(loss, [x, *b.parameters()])
        return [t.detach().cpu() for t in (y, ladj, back, back_ladj, *grads)]

    block.eval()
    block.warm_start = False
    here = outputs(block, x)
    there = outputs(on_cuda(block), x.to(DEVICE))
    assert torch.allclose(here[2], x, **SOLVED)  # the inverse inverts
    assert torch.allclose(here[3], here[1], **SOLVED)  # the forward log-det, at x
    for a, b in zip(here, there):
        assert torch.allclose(b, a, **SOLVED)


def test_density_gradients_through_the_fixed_point_agree_between_cpu_and_cuda():
    # explicit="forward" scores fresh data by solving a fixed point in every block; the
    # gradient comes from implicit differentiation of that solve
    torch.manual_seed(0)
    data = vector_data(dim=3)
    flow = residual_flow(3, num_blocks=2, hidden_dims=[16], explicit="forward").double()
    inflate(flow)
    flow = settle(flow, data)

    def grads(f, x):
        loss = -make_density(f, 3, x.device, F64).log_prob(x).mean()
        return [g.cpu() for g in grads_of(loss, list(f.parameters()))]

    here = grads(flow, data)
    there = grads(on_cuda(flow), data.to(DEVICE))
    for a, b in zip(here, there):
        assert torch.allclose(b, a, **SOLVED)


# -- the memory-saving modes ----------------------------------------------------------------------
def weighted_logdet_grads(block, x, weights, seed):
    torch.manual_seed(seed)  # the probe seed is drawn from torch's global generator
    x = x.clone().requires_grad_(True)
    y = block(x)
    ladj = block.log_abs_det_jacobian(x, y)
    return ladj.detach(), grads_of((ladj * weights).sum(), [x, *block.parameters()])


@pytest.mark.parametrize("estimator", [Roulette, Series])
def test_forward_gradient_equals_neumann_on_cuda_under_per_sample_weights(estimator):
    x = torch.randn(12, 5, dtype=F64, device=DEVICE)
    weights = torch.rand(12, dtype=F64, device=DEVICE)
    results = {}
    for mode in ("neumann", "forward", "backprop"):
        torch.manual_seed(0)
        block = iresnet(5, [24], logdet=estimator(gradient=mode)).double().to(DEVICE)
        inflate(block)
        results[mode] = weighted_logdet_grads(block, x, weights, seed=7)
    (ld_n, g_n), (ld_f, g_f) = results["neumann"], results["forward"]
    ld_b = results["backprop"][0]
    assert ld_n.device.type == "cuda" and torch.isfinite(ld_n).all()
    # the value is the estimate itself in every mode (same seed, same probes)
    assert torch.allclose(ld_f, ld_n, atol=1e-12) and torch.allclose(ld_b, ld_n, atol=1e-12)
    for a, b in zip(g_n, g_f):
        assert torch.allclose(b, a, atol=1e-12, rtol=1e-10)


def test_neumann_and_forward_gradients_take_less_cuda_memory_than_backprop():
    # 16 series terms: back-propagation keeps a graph per term, the Neumann gradient one
    dim, batch = 32, 4096
    x = torch.randn(batch, dim, device=DEVICE)
    peaks = {}
    for mode in ("backprop", "neumann", "forward"):
        torch.manual_seed(0)
        block = iresnet(dim, [512, 512], logdet=Series(n_terms=16, gradient=mode)).to(DEVICE)

        def step(block=block):
            xr = x.clone().requires_grad_(True)
            ladj = block.log_abs_det_jacobian(xr, block(xr))
            ladj.sum().backward()
            block.zero_grad(set_to_none=True)

        peaks[mode] = peak_bytes(step)
    assert peaks["neumann"] < 0.5 * peaks["backprop"], peaks
    assert peaks["forward"] < 0.5 * peaks["backprop"], peaks


def revnet_blocks(depth, dim, hidden, dtype):
    torch.manual_seed(0)
    blocks = [revnet_block(dim, [hidden], affine=True) for _ in range(depth)]
    for block in blocks:
        perturb(block.to(dtype), scale=0.02)
    return blocks


def test_reversible_stack_on_cuda_gives_plain_autograd_gradients():
    blocks = revnet_blocks(8, 6, 32, F64)
    plain = ComposeTransformModule(copy.deepcopy(blocks)).to(DEVICE)
    stack = reversible_stack(blocks, checkpoint_every=4).to(DEVICE)
    data = torch.randn(64, 6, dtype=F64, device=DEVICE)
    base = dist.Normal(torch.zeros(6, dtype=F64, device=DEVICE), 1.0).to_event(1)
    results = []
    for flow in (plain, stack):
        loss = -dist.TransformedDistribution(base, [flow]).log_prob(data).mean()
        results.append([loss.detach(), *grads_of(loss, list(flow.parameters()))])
    for a, b in zip(*results):
        assert b.device.type == "cuda"
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)


def test_reversible_stack_takes_less_cuda_memory_than_plain_autograd():
    blocks = revnet_blocks(16, 16, 256, torch.float32)
    plain = ComposeTransformModule(copy.deepcopy(blocks)).to(DEVICE)
    stack = reversible_stack(blocks).to(DEVICE)
    data = torch.randn(8192, 16, device=DEVICE)
    base = dist.Normal(torch.zeros(16, device=DEVICE), 1.0).to_event(1)
    peaks = {}
    for name, flow in (("plain", plain), ("reversible", stack)):

        def step(flow=flow):
            loss = -dist.TransformedDistribution(base, [flow]).log_prob(data.clone()).mean()
            loss.backward()
            flow.zero_grad(set_to_none=True)

        peaks[name] = peak_bytes(step)
    assert peaks["reversible"] < 0.5 * peaks["plain"], peaks
