"""Coupling and RevNet blocks (and their conditional twins): what is specific to them.

Log-det vs the Jacobian, shapes, gradients, dtype moves and state dicts of every block
are checked in ``tests/test_contract.py``; here round trips over split points, the
identity at initialisation, conditioning, bounds and argument checks.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.distributions.conditional import ConditionalTransformModule

from pyro_invres.nn.conditioners import ContextBound, default_hidden_dims, make_conditioner
from pyro_invres.transforms.coupling import (
    AdditiveCoupling,
    BoundedAffineCoupling,
    ConditionalAdditiveCoupling,
    ConditionalBoundedAffineCoupling,
    additive_coupling,
    affine_coupling,
    bounded_log_scale,
    conditional_additive_coupling,
    conditional_affine_coupling,
)
from pyro_invres.transforms.revnet import (
    ConditionalRevNetBlock,
    RevNetBlock,
    conditional_revnet_block,
    revnet_block,
)

F64 = torch.float64
CONTEXT_DIM = 3
HIDDEN = [6, 5]
KINDS = {
    "additive": (additive_coupling, conditional_additive_coupling, {}),
    "affine": (affine_coupling, conditional_affine_coupling, {}),
    "revnet": (revnet_block, conditional_revnet_block, {}),
    "revnet_affine": (revnet_block, conditional_revnet_block, {"affine": True}),
}
SHAPES = [(4,), (5,), (2, 4, 4), (4, 2, 2)]
CASES = [
    pytest.param(kind, cond, shape, id=f"{kind}-{'cond' if cond else 'plain'}-{shape}")
    for kind in KINDS
    for cond in (False, True)
    for shape in SHAPES
]
# the machine running the suite is small: few, derandomised examples per case
FEW = settings(max_examples=10, deadline=None, derandomize=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add overhead (10x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(kind, conditional, shape, *, seed=0, perturb=0.3, dtype=F64, **kwargs):
    """A block (or conditional twin) with its parameters moved away from the zero init."""
    torch.manual_seed(seed)
    make, make_cond, options = KINDS[kind]
    options = {**options, **kwargs}
    if conditional:
        module = make_cond(shape, CONTEXT_DIM, HIDDEN, **options)
    else:
        module = make(shape, HIDDEN, **options)
    module = module.to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(perturb * torch.randn_like(p))
    return module


def context(batch=(), dtype=F64, seed=123):
    return torch.randn(
        *batch, CONTEXT_DIM, dtype=dtype, generator=torch.Generator().manual_seed(seed)
    )


def bind(module, batch=(), dtype=F64):
    """The unconditional block under test: a conditional twin is bound to a random context."""
    if isinstance(module, ConditionalTransformModule):
        return module.condition(context(batch, dtype))
    return module


# -- the property harness -------------------------------------------------------------------
@pytest.mark.parametrize("kind, conditional, shape", CASES)
@FEW
@given(
    seed=st.integers(0, 2**16),
    batch=st.sampled_from([(), (3,), (3, 4)]),
    split=st.floats(0.0, 1.0),
)
def test_round_trip(kind, conditional, shape, seed, batch, split):
    split_dim = 1 + int(split * (shape[0] - 2))
    module = build(kind, conditional, shape, seed=seed, split_dim=split_dim)
    block = bind(module, batch)
    x = torch.randn(*batch, *shape, dtype=F64)
    y = block._call(x)
    assert not torch.allclose(y, x, atol=1e-3)  # the perturbed block is not the identity
    torch.testing.assert_close(block._inverse(y), x, atol=1e-8, rtol=0)
    torch.testing.assert_close(block._call(block._inverse(x)), x, atol=1e-8, rtol=0)


@pytest.mark.parametrize("kind, conditional, shape", CASES)
def test_identity_at_init(kind, conditional, shape):
    block = bind(build(kind, conditional, shape, perturb=0.0))
    x = torch.randn(3, *shape, dtype=F64)
    y = block(x)
    assert torch.equal(y, x) and torch.equal(block._inverse(x), x)
    assert torch.equal(block.log_abs_det_jacobian(x, y), torch.zeros(3, dtype=F64))


# -- the Pyro contract and the conditional twins ------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_pyro_contract(kind):
    block = build(kind, False, (4,))
    assert block.bijective and block.sign == 1 and block.event_dim == 1
    assert not hasattr(block, "autoregressive")
    assert block._cache_size == 1
    x = torch.randn(5, 4, dtype=F64)
    y = block(x)
    assert block(x) is y and block.inv(y) is x  # the identity cache
    assert block.log_abs_det_jacobian(x, y) is block.log_abs_det_jacobian(x, y)
    assert "split_dim=2" in repr(block)


@pytest.mark.parametrize("kind", KINDS)
def test_condition_shares_parameters(kind):
    twin = build(kind, True, (2, 4, 4))
    assert twin.bijective and not hasattr(twin, "autoregressive")
    block = twin.condition(context())
    assert {id(p) for p in block.parameters()} == {id(p) for p in twin.parameters()}
    # the context matters
    x = torch.randn(2, 4, 4, dtype=F64)
    assert not torch.allclose(block._call(x), twin.condition(context(seed=7))._call(x))


def test_context_batch_broadcasts():
    twin = build("affine", True, (4,))
    ctx = context((3,))
    x = torch.randn(3, 4, dtype=F64)
    y = twin.condition(ctx)._call(x)
    for i in range(3):
        torch.testing.assert_close(y[i], twin.condition(ctx[i])._call(x[i]))


def test_classes_take_any_network():
    net = make_conditioner(1, 2, [4], num_outputs=2)
    assert isinstance(BoundedAffineCoupling(net, 3, split_dim=1), BoundedAffineCoupling)
    assert isinstance(AdditiveCoupling(make_conditioner(2, 2, [4]), 4), AdditiveCoupling)
    f, g = make_conditioner(2, 2, [4]), make_conditioner(2, 2, [4])
    assert RevNetBlock(f, g, 4).event_shape == (4,)
    for cls in (ConditionalAdditiveCoupling, ConditionalBoundedAffineCoupling):
        assert cls(make_conditioner(2, 2, [4], context_dim=1), 4).event_shape == (4,)
    assert ConditionalRevNetBlock(f, g, 4, affine=True).condition(torch.zeros(1)).affine


def test_bounded_log_scale():
    raw = torch.linspace(-50, 50, 101, dtype=F64)
    s = bounded_log_scale(raw, 2.0)
    assert s.abs().max() <= 2.0 and s[50] == 0.0
    torch.testing.assert_close(bounded_log_scale(torch.tensor(1e-6, dtype=F64), 2.0).item(), 1e-6)


def test_affine_log_scale_is_bounded():
    block = build("affine", False, (4,), perturb=0.0, log_scale_bound=0.5)
    with torch.no_grad():
        block.nn.layers[-1].bias.fill_(100.0)
    x = torch.randn(4, dtype=F64)
    assert block.log_abs_det_jacobian(x, block(x)) <= 2 * 0.5


# -- validation -------------------------------------------------------------------------------
FACTORIES = [additive_coupling, affine_coupling, revnet_block]
CONDITIONAL_FACTORIES = [
    conditional_additive_coupling,
    conditional_affine_coupling,
    conditional_revnet_block,
]


@pytest.mark.parametrize("make", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_dim": 4, "split_dim": 0}, "split_dim.*0"),
        ({"input_dim": 4, "split_dim": 4}, "split_dim.*4"),
        ({"input_dim": 4, "split_dim": -1}, "split_dim.*-1"),
        ({"input_dim": (4, 2, 2), "split_dim": 5}, "split_dim.*5"),
        ({"input_dim": 1}, "split_dim"),
        ({"input_dim": (4, 4)}, r"input_dim.*\(4, 4\)"),
        ({"input_dim": 0}, "input_dim"),
        ({"input_dim": 4, "hidden_dims": []}, r"hidden_dims.*\[\]"),
        ({"input_dim": 4, "hidden_dims": [8, 0]}, "hidden_dims"),
        ({"input_dim": 4, "activation": "tanh"}, "tanh"),
        ({"input_dim": 4, "cache_size": 2}, "cache_size"),
    ],
)
def test_bad_arguments(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


@pytest.mark.parametrize("make", CONDITIONAL_FACTORIES, ids=lambda f: f.__name__)
def test_bad_context_dim(make):
    with pytest.raises(ValueError, match="context_dim.*0"):
        make(4, 0)
    with pytest.raises(ValueError, match="split_dim.*7"):
        make(4, 2, split_dim=7)


@pytest.mark.parametrize("make", [affine_coupling, revnet_block], ids=lambda f: f.__name__)
@pytest.mark.parametrize("bound", [0.0, -1.0, math.inf])
def test_bad_log_scale_bound(make, bound):
    with pytest.raises(ValueError, match="log_scale_bound"):
        make(4, log_scale_bound=bound)


def test_wrong_event_shape():
    block = affine_coupling((2, 4, 4), [4])
    with pytest.raises(ValueError, match="event shape"):
        block(torch.randn(3, 2, 4, 5))


# -- conditioners ---------------------------------------------------------------------------
@pytest.mark.parametrize("in_shape, out", [(3, 5), ((2, 6, 5), 3)])
@pytest.mark.parametrize("context_dim", [0, 2])
@pytest.mark.parametrize("num_outputs", [1, 2])
def test_conditioner_shapes_and_zero_output(in_shape, out, context_dim, num_outputs):
    net = make_conditioner(in_shape, out, [7, 7], context_dim=context_dim, num_outputs=num_outputs)
    shape = (in_shape,) if isinstance(in_shape, int) else in_shape
    x = torch.randn(3, 4, *shape)
    if context_dim:
        result = ContextBound(net, torch.randn(4, context_dim))(x)
    else:
        result = net(x)
    outputs = result if num_outputs > 1 else (result,)
    assert len(outputs) == num_outputs
    for o in outputs:
        assert o.shape == (3, 4, out, *shape[1:])
        assert torch.equal(o, torch.zeros_like(o))


def test_conditioner_validation():
    with pytest.raises(ValueError, match="in_shape"):
        make_conditioner((2, 3), 1)
    with pytest.raises(ValueError, match="out_features.*0"):
        make_conditioner(2, 0)
    with pytest.raises(ValueError, match="num_outputs"):
        make_conditioner(2, 1, num_outputs=0)
    assert default_hidden_dims(10) == [100, 100]


@pytest.mark.parametrize("param_dims", [[3], [3, 3], [1, 1], [1]])
def test_lean_dense_nets_match_pyros(param_dims):
    """The conditioners' faster forward returns exactly what Pyro's DenseNN returns."""
    from pyro.nn import ConditionalDenseNN, DenseNN

    from pyro_invres.nn.conditioners import _LeanConditionalDenseNN, _LeanDenseNN

    torch.manual_seed(0)
    ours = _LeanDenseNN(4, [8, 8], param_dims)
    pyros = DenseNN(4, [8, 8], param_dims)
    pyros.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6, 4)
    a, b = ours(x), pyros(x)
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    ours_c = _LeanConditionalDenseNN(4, 2, [8], param_dims)
    pyros_c = ConditionalDenseNN(4, 2, [8], param_dims)
    pyros_c.load_state_dict(ours_c.state_dict())
    context = torch.randn(5, 6, 2)
    a, b = ours_c(x, context), pyros_c(x, context)
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
