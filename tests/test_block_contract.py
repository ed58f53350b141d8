"""The block contract of ``InvertibleModule`` and the coupling core (issue 14, items 1-2).

A block defined here, outside the package, that describes itself through ``as_coupling``
must run inside ``ReversibleStack`` with the fused backward, and give the same numbers as
plain autograd.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from pyro_invres.transforms import (
    InvertibleModule,
    ReversibleStack,
    additive_coupling,
    affine_coupling,
    channel_permutation,
    revnet_block,
)
from pyro_invres.transforms.coupling import Coupling, CouplingUpdate
from pyro_invres.transforms.reversible import reversible_step

F64 = torch.float64


class ScaledHalfSwap(InvertibleModule):
    """A user coupling: the second half scaled and shifted by a net of the first, then the
    first half by a net of the new second half (two updates), over a 1-D event."""

    sign = 1

    def __init__(self, dim: int) -> None:
        super().__init__((dim,))
        self.k = dim // 2
        self.a = nn.Sequential(nn.Linear(self.k, 2 * (dim - self.k)), _Pair())
        self.b = nn.Linear(dim - self.k, self.k)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[..., : self.k], x[..., self.k :]

    def _merge(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], -1)

    def as_coupling(self) -> Coupling:
        updates = (CouplingUpdate(0, self.a, 1.5), CouplingUpdate(1, self.b))
        return Coupling(self._split, self._merge, updates, 1)

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.as_coupling().forward(x)

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.as_coupling().inverse(y)


class _Pair(nn.Module):
    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = h.chunk(2, -1)
        return raw, shift


def _perturbed(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _jacobian_logdet(f, x: Tensor) -> Tensor:
    return torch.stack(
        [torch.linalg.slogdet(torch.autograd.functional.jacobian(f, xi))[1] for xi in x]
    )


def test_a_user_coupling_block_gets_the_fused_backward_and_plain_autograd_gradients():
    torch.manual_seed(0)
    blocks = [
        _perturbed(b, i).to(F64)
        for i, b in enumerate(
            [ScaledHalfSwap(5), channel_permutation(5), ScaledHalfSwap(5), ScaledHalfSwap(5)]
        )
    ]
    assert reversible_step(blocks[0]).inverse_vjp is not None  # fused, through as_coupling
    stack = ReversibleStack(blocks, checkpoint_every=4).to(F64)
    x = torch.randn(7, 5, dtype=F64)
    y, ladj = stack.call_and_ladj(x, cached=False)
    (y.square().sum() + ladj.sum()).backward()
    fused = [p.grad.clone() for p in stack.parameters()]
    stack.zero_grad()
    # the same blocks composed by plain autograd
    h, total = x, torch.zeros(7, dtype=F64)
    for block in blocks:
        h, part = block.call_and_ladj(h, cached=False)
        total = total + part
    (h.square().sum() + total.sum()).backward()
    for a, p in zip(fused, stack.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, h)
    torch.testing.assert_close(ladj, total)
    # and the log-det is the Jacobian's
    expect = _jacobian_logdet(lambda v: stack.call(v, cached=False), x.detach())
    torch.testing.assert_close(ladj.detach(), expect, rtol=1e-10, atol=1e-10)


def test_the_inverse_direction_of_a_user_coupling_in_a_stack_matches_autograd():
    torch.manual_seed(1)
    block = _perturbed(ScaledHalfSwap(4), 3).to(F64)
    from pyro_invres.transforms import inverse

    stack = ReversibleStack([inverse(block), block, inverse(block)], checkpoint_every=3)
    x = torch.randn(6, 4, dtype=F64)
    y, ladj = stack.call_and_ladj(x, cached=False)
    ladj.sum().backward()
    fused = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    a, l1 = block.inverse_and_ladj(x, cached=False)
    b, l2 = block.call_and_ladj(a, cached=False)
    _, l3 = block.inverse_and_ladj(b, cached=False)
    (-l1 + l2 - l3).sum().backward()
    for g, p in zip(fused, block.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda: additive_coupling(4, [8]),
        lambda: affine_coupling(4, [8]),
        lambda: revnet_block(4, [8], affine=True),
        lambda: revnet_block(4, [8]),
        lambda: ScaledHalfSwap(4),
    ],
)
def test_both_explicit_directions_give_the_forward_logdet_of_the_jacobian(make):
    torch.manual_seed(2)
    block = _perturbed(make(), 5).to(F64)
    y = torch.randn(3, 4, dtype=F64)
    x, ladj_inv = block.inverse_and_ladj(y, cached=False)
    y2, ladj = block.call_and_ladj(x, cached=False)
    torch.testing.assert_close(y2, y)
    expect = _jacobian_logdet(lambda v: block.call(v, cached=False), x)
    torch.testing.assert_close(ladj, expect, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ladj_inv, expect, rtol=1e-10, atol=1e-10)
    # the pair's log-det from scratch agrees too
    torch.testing.assert_close(block.log_abs_det_jacobian(x, y), expect, rtol=1e-10, atol=1e-10)


def test_a_lazy_logdet_is_computed_only_when_asked_and_then_once():
    evaluations: list[int] = []

    class Lazy(InvertibleModule):
        def _call_and_ladj(self, x):
            def ladj():
                evaluations.append(1)
                return x.new_full(x.shape[:-1], 2 * math.log(2))

            return 2 * x, ladj

        def _inverse_and_ladj(self, y):
            return y / 2, y.new_full(y.shape[:-1], 2 * math.log(2))

    block = Lazy((2,))
    x = torch.ones(3, 2)
    y = block(x)
    block.call(torch.ones(3, 2), cached=False)
    assert evaluations == []  # sampling without scoring never pays for the log-det
    first = block.log_abs_det_jacobian(x, y)
    assert block.log_abs_det_jacobian(x, y) is first
    assert evaluations == [1]
    torch.testing.assert_close(first, torch.full((3,), 2 * math.log(2)))


def test_cached_contract_calls_share_the_pair_and_validate():
    block = affine_coupling(4, [8])
    x = torch.randn(3, 4)
    y, ladj = block.call_and_ladj(x)
    assert block.inv(y) is x
    assert block.log_abs_det_jacobian(x, y) is ladj
    x2, ladj2 = block.inverse_and_ladj(y)
    assert x2 is x and ladj2 is ladj
    with pytest.raises(ValueError, match=r"expected input with event shape \(4,\)"):
        block.call_and_ladj(torch.randn(3, 5))


def test_a_block_implementing_neither_form_is_refused_at_construction():
    class Empty(InvertibleModule):
        pass

    with pytest.raises(TypeError, match="must implement _call or _call_and_ladj"):
        Empty((2,))


def test_our_affine_coupling_does_not_take_pyros_class_name():
    import pyro.distributions.transforms as pyro_transforms

    import pyro_invres
    from pyro_invres.transforms import BoundedAffineCoupling, coupling

    assert not hasattr(pyro_invres, "AffineCoupling")
    assert not hasattr(pyro_invres, "ConditionalAffineCoupling")
    assert BoundedAffineCoupling.__name__ != pyro_transforms.AffineCoupling.__name__
    # a module pickled under the old name still loads, with a warning naming the new one
    with pytest.warns(DeprecationWarning, match="now BoundedAffineCoupling"):
        assert coupling.AffineCoupling is BoundedAffineCoupling


@pytest.mark.parametrize("factory", ["conditional_affine_coupling", "conditional_revnet_block"])
def test_a_conditional_coupling_around_a_float64_network_builds_and_runs(factory):
    from pyro_invres import transforms

    make = getattr(transforms, factory)
    template = make(4, 3, [8])
    nets = {name: getattr(template, name).to(F64) for name in template.net_names}
    options = dict(template.options)
    block = type(template)(*nets.values(), 4, **options)
    assert all(p.dtype == F64 for p in block.parameters())
    context = torch.randn(3, dtype=F64)
    x = torch.randn(5, 4, dtype=F64)
    y, ladj = block.condition(context).call_and_ladj(x)
    assert y.dtype == ladj.dtype == F64
    x2, _ = block.condition(context).inverse_and_ladj(y, cached=False)
    torch.testing.assert_close(x2, x)
