"""ReversibleStack and reversible_chain: exact gradients without stored activations.

Gradients are compared in float64 with plain autograd through the very same blocks; drift
is measured in float32; memory is counted deterministically with saved-tensor hooks.
"""

import pyro.distributions as dist
import pytest
import torch
from helpers import jacobian_logdet
from hypothesis import given
from hypothesis import strategies as st
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import nn

from pyro_invres.flows import irevnet
from pyro_invres.ops.reversible import (
    DEFAULT_CHECKPOINT_EVERY,
    ReversibleStep,
    SavedTensorMeter,
    reconstruction_errors,
    reversible_chain,
    segments,
)
from pyro_invres.transforms import (
    ActNorm,
    Inverse,
    additive_coupling,
    affine_coupling,
    channel_permutation,
    conditional_affine_coupling,
    invertible_conv1x1,
    revnet_block,
)
from pyro_invres.transforms.reversible import ReversibleStack, reversible_stack, reversible_step

D = 6


def perturb(module: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Move every parameter off its (often zero) initial value, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def make_blocks(kind: str, depth: int, dim: int = D, seed: int = 0) -> list[nn.Module]:
    """``depth`` blocks of one kind (couplings alternate with permutations), perturbed."""
    torch.manual_seed(seed)
    blocks: list[nn.Module] = []
    for i in range(depth):
        if kind == "additive":
            blocks += [additive_coupling(dim, [16]), channel_permutation(dim, seed=i)]
        elif kind == "affine":
            blocks += [affine_coupling(dim, [16]), channel_permutation(dim, seed=i)]
        elif kind == "revnet":
            blocks.append(revnet_block(dim, [16]))
        elif kind == "revnet_affine":
            blocks.append(revnet_block(dim, [16], affine=True))
        elif kind == "mixed":  # no fused path: ActNorm, 1x1 (LU) map, inverse of a coupling
            norm = ActNorm(dim)
            norm.initialized.fill_(True)
            conv = invertible_conv1x1(dim, seed=0)
            blocks += [norm, conv, Inverse(affine_coupling(dim, [16]))]
        else:
            raise ValueError(kind)
    for j, block in enumerate(blocks):
        perturb(block, seed=1000 * seed + j)
    return blocks


def plain_chain(blocks, x, inverse=False):
    """The same blocks through ordinary autograd: ``(output, summed log-det)``."""
    steps = [reversible_step(b, inverse=inverse) for b in blocks]
    total = 0
    for step in steps[::-1] if inverse else steps:
        x, logdet = step.forward(x)
        total = total + logdet
    return x, total


def loss_of(y, logdet, weight):
    return (y * weight).sum() + (logdet**2).sum() + logdet.sum()


def assert_close(actual, expected, tol=1e-10):
    for a, e in zip(actual, expected):
        assert a is not None and e is not None
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


KINDS = ["additive", "affine", "revnet", "revnet_affine", "mixed"]


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# -- gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("k", [1, 3, 100])
def test_gradients_match_plain_autograd(kind, inverse, k):
    blocks = make_blocks(kind, 4)
    stack = reversible_stack(blocks, checkpoint_every=k)
    params = list(stack.parameters())
    x = torch.randn(5, D, requires_grad=True)
    weight = torch.randn(5, D)

    y0, ld0 = plain_chain(blocks, x, inverse)
    grads0 = torch.autograd.grad(loss_of(y0, ld0, weight), [x, *params])

    if inverse:
        y1 = stack._inv_call(x)
        ld1 = -stack.log_abs_det_jacobian(y1, x)
    else:
        y1 = stack(x)
        ld1 = stack.log_abs_det_jacobian(x, y1)
    grads1 = torch.autograd.grad(loss_of(y1, ld1, weight), [x, *params])

    assert_close([y1, ld1], [y0, ld0])
    assert_close(grads1, grads0)
    assert all(g.abs().sum() > 0 for g in grads1)  # every parameter is reached


def test_backward_accumulates_into_leaves():
    blocks = make_blocks("revnet_affine", 3)
    stack = reversible_stack(blocks, checkpoint_every=2)
    x = torch.randn(4, D, requires_grad=True)
    y0, ld0 = plain_chain(blocks, x)
    loss_of(y0, ld0, 1.0).backward()
    expected = [x.grad.clone()] + [p.grad.clone() for p in stack.parameters()]
    x.grad = None
    stack.zero_grad()
    y1 = stack(x)
    loss_of(y1, stack.log_abs_det_jacobian(x, y1), 1.0).backward()
    assert_close([x.grad] + [p.grad for p in stack.parameters()], expected)


def test_backward_twice_with_retain_graph():
    blocks = make_blocks("revnet_affine", 3)
    stack = reversible_stack(blocks, checkpoint_every=2)
    x = torch.randn(4, D, requires_grad=True)
    y0, ld0 = plain_chain(blocks, x)
    (expected,) = torch.autograd.grad(loss_of(y0, ld0, 1.0), x)
    y1 = stack(x)
    loss = loss_of(y1, stack.log_abs_det_jacobian(x, y1), 1.0)
    loss.backward(retain_graph=True)  # uses the last step's graph from the forward pass
    loss.backward()  # recomputes it
    assert_close([x.grad], [2 * expected])


def test_input_without_requires_grad():
    blocks = make_blocks("affine", 3)
    stack = reversible_stack(blocks, checkpoint_every=2)
    params = list(stack.parameters())
    x = torch.randn(4, D)
    y0, ld0 = plain_chain(blocks, x)
    y1 = stack(x)
    assert y1.requires_grad
    grads0 = torch.autograd.grad(loss_of(y0, ld0, 1.0), params)
    grads1 = torch.autograd.grad(loss_of(y1, stack.log_abs_det_jacobian(x, y1), 1.0), params)
    assert_close(grads1, grads0)


def test_nothing_requires_grad_runs_plainly():
    stack = reversible_stack(make_blocks("revnet", 3)).requires_grad_(False)
    x = torch.randn(4, D)
    y = stack(x)
    assert not y.requires_grad
    with torch.no_grad():
        stack.requires_grad_(True)
        y2 = stack._call(x)
    assert not y2.requires_grad
    torch.testing.assert_close(y, y2)


def test_autograd_grad_with_inputs_and_shared_blocks():
    # a block used twice: its parameters get the sum of both uses' gradients
    block = perturb(revnet_block(D, [16], affine=True), seed=3)
    blocks = [block, perturb(channel_permutation(D, seed=1), 0), block]
    stack = reversible_stack(blocks, checkpoint_every=2)
    params = list(stack.parameters())
    x = torch.randn(4, D, requires_grad=True)
    y0, ld0 = plain_chain(blocks, x)
    grads0 = torch.autograd.grad(loss_of(y0, ld0, 1.0), [x, *params])
    y1 = stack(x)
    loss = loss_of(y1, stack.log_abs_det_jacobian(x, y1), 1.0)
    grads1 = torch.autograd.grad(loss, inputs=[x, *params])
    assert_close(grads1, grads0)


def test_context_requiring_grad_gets_its_gradient():
    cond = perturb(conditional_affine_coupling(D, context_dim=2, hidden_dims=[8]), seed=5)
    context = torch.randn(2, requires_grad=True)
    blocks = [cond.condition(context), channel_permutation(D, seed=0), cond.condition(context)]
    stack = reversible_stack(blocks, checkpoint_every=2)
    x = torch.randn(4, D)
    y0, ld0 = plain_chain(blocks, x)
    (g0,) = torch.autograd.grad(loss_of(y0, ld0, 1.0), [context])
    y1 = stack(x)
    (g1,) = torch.autograd.grad(loss_of(y1, stack.log_abs_det_jacobian(x, y1), 1.0), [context])
    assert_close([g1], [g0])


def test_gradcheck_chain_of_explicit_tensors():
    def step(w, b):
        # an affine coupling written out, so that gradcheck sees w and b as inputs
        def forward(x):
            x1, x2 = x[..., :2], x[..., 2:]
            s = torch.tanh(x1 @ w)
            y = torch.cat([x2 * s.exp() + x1 @ b, x1], -1)  # the swap mixes the halves
            return y, s.sum(-1)

        def inverse(y):
            y2, x1 = y[..., :2], y[..., 2:]
            return torch.cat([x1, (y2 - x1 @ b) * torch.exp(-torch.tanh(x1 @ w))], -1)

        return ReversibleStep(forward, inverse, params=(w, b))

    def fn(x, w1, b1, w2, b2):
        steps = [step(w1, b1), step(w2, b2), step(w1, b2)]
        return reversible_chain(x, steps, checkpoint_every=2)

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 4, generator=g)] + [
        0.5 * torch.randn(2, 2, generator=g) for _ in range(4)
    ]
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_stack():
    stack = reversible_stack(make_blocks("revnet_affine", 3), checkpoint_every=2)
    x = torch.randn(2, D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: stack._call(x), (x,))
    assert torch.autograd.gradcheck(lambda x: stack._inverse(x), (x,))


def test_double_backward_is_refused():
    stack = reversible_stack(make_blocks("revnet", 2))
    x = torch.randn(3, D, requires_grad=True)
    (g,) = torch.autograd.grad(stack(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@given(
    depth=st.integers(1, 6),
    k=st.integers(1, 7),
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_any_depth_segments_and_batch_shape(depth, k, batch, seed):
    torch.manual_seed(seed)
    blocks = make_blocks("revnet_affine", depth, seed=seed % 7)
    stack = reversible_stack(blocks, checkpoint_every=k)
    x = torch.randn(*batch, D, requires_grad=True)
    y0, ld0 = plain_chain(blocks, x)
    y1 = stack(x)
    ld1 = stack.log_abs_det_jacobian(x, y1)
    assert ld1.shape == torch.Size(batch)
    params = list(stack.parameters())
    grads0 = torch.autograd.grad(loss_of(y0, ld0, 1.0), [x, *params])
    grads1 = torch.autograd.grad(loss_of(y1, ld1, 1.0), [x, *params])
    assert_close(grads1, grads0)


# -- Pyro ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["affine", "revnet_affine", "mixed"])
def test_transformed_distribution_log_prob_and_backward(kind):
    blocks = make_blocks(kind, 3)
    base = dist.Normal(torch.zeros(D), 1.0).to_event(1)
    stack = reversible_stack(blocks, checkpoint_every=2)
    plain = ComposeTransformModule(blocks)
    data = torch.randn(7, D)

    lp0 = dist.TransformedDistribution(base, [plain]).log_prob(data)
    grads0 = torch.autograd.grad(lp0.mean(), list(plain.parameters()))
    lp1 = dist.TransformedDistribution(base, [stack]).log_prob(data)
    grads1 = torch.autograd.grad(lp1.mean(), list(stack.parameters()))
    assert_close([lp1], [lp0])
    assert_close(grads1, grads0)


def test_rsample_then_log_prob_uses_the_memo():
    stack = reversible_stack(make_blocks("revnet_affine", 3))
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(D), 1.0).to_event(1), [stack])
    z = flow.rsample((5,))
    lp = flow.log_prob(z)  # the cached pair: no inverse
    expected = flow.log_prob(z.detach().clone())  # runs the inverse
    torch.testing.assert_close(lp, expected)
    lp.sum().backward()
    assert all(p.grad is not None for p in stack.parameters())


def test_pyro_potential_grad():
    from pyro.ops.integrator import potential_grad

    blocks = make_blocks("revnet_affine", 3)
    stack, plain = reversible_stack(blocks), ComposeTransformModule(blocks)
    base = dist.Normal(torch.zeros(D), 1.0).to_event(1)
    z = {"z": torch.randn(D)}

    def potential(transform):
        return lambda p: -dist.TransformedDistribution(base, [transform]).log_prob(p["z"])

    grads1, value1 = potential_grad(potential(stack), z)
    grads0, value0 = potential_grad(potential(plain), z)
    assert_close([grads1["z"], value1], [grads0["z"], value0])


def test_irevnet_preset_as_one_stack():
    torch.manual_seed(0)
    flow = irevnet((1, 4, 4), num_scales=1, blocks_per_scale=2, hidden_channels=4).double()
    for i, part in enumerate(flow):
        perturb(part, seed=i, scale=0.1)
    data = torch.randn(6, 1, 4, 4)
    with torch.no_grad():
        flow.inv(data)  # the ActNorms initialise on data
    stack = reversible_stack(flow, checkpoint_every=2)
    assert len(stack) == len(flow) and stack.event_shape == (4, 2, 2)
    base = dist.Normal(torch.zeros(4, 2, 2), 1.0).to_event(3)
    lp0 = dist.TransformedDistribution(base, [flow]).log_prob(data)
    grads0 = torch.autograd.grad(lp0.sum(), list(flow.parameters()))
    lp1 = dist.TransformedDistribution(base, [stack]).log_prob(data)
    grads1 = torch.autograd.grad(lp1.sum(), list(stack.parameters()))
    assert_close([lp1], [lp0])
    assert_close(grads1, grads0)


def test_cache_is_not_stale_after_an_optimizer_step():
    stack = reversible_stack(make_blocks("affine", 2))
    x = torch.randn(4, D)
    y = stack(x)
    y.sum().backward()
    torch.optim.SGD(stack.parameters(), lr=0.1).step()
    y2 = stack(x)
    assert not torch.equal(y, y2)
    y2.sum().backward()  # a fresh graph, not the freed one


# -- maps and log-dets ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_logdet(kind):
    stack = reversible_stack(make_blocks(kind, 3), checkpoint_every=2)
    x = torch.randn(4, D)
    y = stack(x)
    torch.testing.assert_close(stack._inverse(y), x, rtol=1e-10, atol=1e-10)
    ld = stack.log_abs_det_jacobian(x, y)
    assert ld is stack.log_abs_det_jacobian(x, y)  # memoised
    torch.testing.assert_close(ld, jacobian_logdet(stack._call, x), rtol=1e-8, atol=1e-8)
    # a pair the stack did not just compute: recomputed, same value
    torch.testing.assert_close(stack.log_abs_det_jacobian(x.clone(), y.clone()), ld)
    x2 = stack._inv_call(y.clone())
    torch.testing.assert_close(stack.log_abs_det_jacobian(x2, y), ld)


def test_sign_shapes_and_repr():
    stack = reversible_stack(make_blocks("additive", 2), checkpoint_every=4)
    assert stack.sign == 1 or stack.sign == -1
    assert stack.forward_shape(torch.Size([3, D])) == torch.Size([3, D])
    assert "checkpoint_every=4" in repr(stack)
    assert isinstance(ReversibleStack(stack), ReversibleStack)  # nested stacks flatten


@pytest.mark.parametrize(
    "blocks, error",
    [
        ([], ValueError),
        ([nn.Linear(2, 2)], TypeError),
        ([additive_coupling(4), additive_coupling(6)], ValueError),
    ],
)
def test_bad_blocks_raise(blocks, error):
    with pytest.raises(error):
        reversible_stack(blocks)


@pytest.mark.parametrize("k", [0, -2, 1.5, True, "8"])
def test_bad_checkpoint_every_raises(k):
    with pytest.raises((ValueError, TypeError)):
        reversible_stack([additive_coupling(4)], checkpoint_every=k)


def test_validation_at_the_boundary():
    stack = reversible_stack([additive_coupling(4)])
    with pytest.raises(ValueError, match="event shape"):
        stack(torch.randn(3, 5))
    with pytest.raises(ValueError, match="dtype"):
        stack(torch.randn(3, 4, dtype=torch.float32))


def test_segments_cover_every_step_once():
    for depth in range(1, 20):
        for k in range(1, 22):
            covered = [j for seg in segments(depth, k) for j in seg]
            assert covered == list(range(depth))


# -- float32 drift ---------------------------------------------------------------------------------
def expanding_revnet(depth, dim=16, hidden=64, scale=0.3, seed=0, activation="relu"):
    """Random additive RevNet blocks whose stack expands activations ~400x over 256 blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(depth):
        block = revnet_block(dim, [hidden], activation=activation).float()
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    factor = 1.0 if m.out_features == hidden else scale
                    w = torch.randn(m.weight.shape, generator=g) / m.in_features**0.5
                    m.weight.copy_(factor * w)
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        blocks.append(block)
    return blocks


def test_float32_drift_is_bounded_by_anchors():
    stack = reversible_stack(expanding_revnet(256))
    x = torch.randn(32, 16, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    anchored = reconstruction_errors(x, stack.steps())  # default checkpoint_every
    from_top = reconstruction_errors(x, stack.steps(), checkpoint_every=256)
    assert anchored.max() < 1e-4
    assert from_top.max() > 1e-4 and from_top.max() > 100 * anchored.max()
    # the anchors are where the error resets to zero
    assert bool((anchored[::DEFAULT_CHECKPOINT_EVERY] == 0).all())


def test_float32_gradients_stay_close_to_plain_autograd():
    # smooth networks: with ReLU a pre-activation within rounding of zero flips a derivative
    # in one computation and not the other, and that single event dominates the comparison
    blocks = expanding_revnet(128, seed=2, activation="elu")
    x = torch.randn(32, 16, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    params = [p for b in blocks for p in b.parameters()]

    def relative_error(grads, reference):
        num = sum((g.double() - r).pow(2).sum() for g, r in zip(grads, reference))
        return float(num.sqrt() / sum(r.pow(2).sum() for r in reference).sqrt())

    y0, _ = plain_chain([b.double() for b in blocks], x.double())
    reference = torch.autograd.grad(y0.pow(2).mean(), params)
    for b in blocks:
        b.float()
    errors = {}
    for k in (None, 128):  # the default, and no anchor but the input
        y = reversible_stack(blocks, checkpoint_every=k)(x)
        errors[k] = relative_error(torch.autograd.grad(y.pow(2).mean(), params), reference)
    y = plain_chain(blocks, x)[0]
    plain_error = relative_error(torch.autograd.grad(y.pow(2).mean(), params), reference)
    assert errors[None] < 1e-5 and errors[None] < 3 * plain_error
    assert errors[128] > 10 * errors[None]


# -- memory --------------------------------------------------------------------------------------
def training_step_bytes(depth, reversible, k=None):
    """Peak saved-tensor bytes of one -log_prob step (forward and backward) of a stack."""
    torch.manual_seed(0)
    blocks = [perturb(revnet_block(8, [64]), seed=i) for i in range(depth)]
    flow = reversible_stack(blocks, checkpoint_every=k) if reversible else None
    transform = flow if reversible else ComposeTransformModule(blocks)
    base = dist.Normal(torch.zeros(8), 1.0).to_event(1)
    data = torch.randn(32, 8)
    params = [p for b in blocks for p in b.parameters()]
    with SavedTensorMeter(exclude=params) as meter:
        loss = -dist.TransformedDistribution(base, [transform]).log_prob(data).mean()
        loss.backward()
    assert meter.live_bytes == 0  # everything was freed
    return meter.peak_bytes


def test_memory_does_not_grow_with_depth():
    ours = {depth: training_step_bytes(depth, True) for depth in (4, 64)}
    plain = {depth: training_step_bytes(depth, False) for depth in (4, 64)}
    assert ours[64] <= 1.25 * ours[4]
    assert plain[64] >= 10 * plain[4]  # plain autograd grows linearly
    assert ours[64] < plain[64] / 10
    # k = 1 stores every block's input: linear again, but no block graph is kept
    assert training_step_bytes(64, True, k=1) > 2 * ours[64]


def test_meter_counts_storages_once():
    w = torch.randn(4, 4, requires_grad=True)
    with SavedTensorMeter(exclude=[w]) as meter:
        x = torch.randn(3, 4)
        y = (x @ w) * (x @ w)  # x saved twice, one storage
        assert meter.live_bytes == 3 * 12 * x.element_size()  # x, and the two products
        del y
    assert meter.live_bytes == 0 and meter.peak_bytes == 3 * 12 * x.element_size()


def test_replacing_a_network_or_parameter_rebuilds_the_steps():
    from pyro_invres.transforms import revnet_block
    from pyro_invres.transforms.reversible import reversible_stack

    torch.manual_seed(0)
    blocks = [revnet_block(4, [8]) for _ in range(3)]
    stack = reversible_stack(blocks)
    x = torch.randn(5, 4)

    def plain(x):
        for b in blocks:
            x = b._call(x)
        return x

    assert torch.allclose(stack._call(x), plain(x))
    blocks[1].f = torch.nn.Linear(2, 2)  # a whole network
    assert torch.allclose(stack._call(x), plain(x))
    layer = blocks[2].g.layers[0]
    layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))  # one parameter, deep
    assert torch.allclose(stack._call(x), plain(x))
    y = stack._call(x.requires_grad_())
    y.sum().backward()
    assert layer.weight.grad is not None
