"""The conditional elementwise affine layer and the conditional preset's layout."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_invres.flows import conditional_residual_flow
from pyro_invres.npe import ConditionalFlow
from pyro_invres.transforms.actnorm import ActNorm
from pyro_invres.transforms.conditional_affine import (
    ConditionalElementwiseAffine,
    conditional_elementwise_affine,
)
from pyro_invres.transforms.coupling import ConditionalBoundedAffineCoupling
from pyro_invres.transforms.downsample import ChannelPermutation
from pyro_invres.transforms.iresnet import ConditionalInvertibleResidual


def _perturb(module: torch.nn.Module, seed: int = 0, size: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(size * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_starts_as_the_identity() -> None:
    layer = conditional_elementwise_affine(3, 2)
    t = layer.condition(torch.randn(2))
    z = torch.randn(7, 3)
    assert torch.equal(t(z), z)
    assert torch.equal(t.log_abs_det_jacobian(z, t(z)), torch.zeros(7))


def test_log_det_inverse_and_context_dependence() -> None:
    torch.manual_seed(0)
    layer = ConditionalElementwiseAffine(3, 2, [8], log_scale_bound=1.5).double()
    _perturb(layer, size=1.0)
    c = torch.randn(2, dtype=torch.float64)
    t = layer.condition(c)
    z = torch.randn(3, dtype=torch.float64)
    jac = jacobian(t, z)
    torch.testing.assert_close(t.log_abs_det_jacobian(z, t(z)), torch.linalg.slogdet(jac)[1])
    torch.testing.assert_close(t.inv(t(z)), z)
    assert bool(jac.diagonal().log().abs().max() < 1.5)  # the log-scale bound holds
    assert not torch.allclose(layer.condition(-c)(z), t(z))  # another context, another map


def test_batched_contexts_broadcast_over_draws() -> None:
    torch.manual_seed(0)
    layer = ConditionalElementwiseAffine(2, 3, [8])
    _perturb(layer)
    c = torch.randn(4, 3)
    t = layer.condition(c)
    z = torch.randn(5, 4, 2)
    y = t(z)
    assert y.shape == (5, 4, 2) and t.log_abs_det_jacobian(z, y).shape == (5, 4)
    # row b of the batch uses context b
    torch.testing.assert_close(y[:, 1], layer.condition(c[1])(z[:, 1]))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="input_dim must be a positive integer"):
        ConditionalElementwiseAffine(0, 2)
    with pytest.raises(ValueError, match="log_scale_bound must be positive"):
        ConditionalElementwiseAffine(2, 2, log_scale_bound=0.0)
    with pytest.raises(ValueError, match=r"context of shape \(\.\.\., 2\)"):
        ConditionalElementwiseAffine(2, 2).condition(torch.randn(4, 3))


# -- the preset ---------------------------------------------------------------------------------
def test_preset_layout() -> None:
    flow = conditional_residual_flow(3, 2, num_blocks=2, hidden_dims=[16])
    kinds = [type(t) for t in flow]  # the modules, in order
    step = [ConditionalBoundedAffineCoupling, ChannelPermutation]
    step += [ConditionalInvertibleResidual, ActNorm]
    assert kinds == step * 2 + [ConditionalElementwiseAffine]
    assert flow[2].explicit == "inverse"
    bare = conditional_residual_flow(1, 2, num_blocks=2, couplings=False, context_affine=False)
    assert [type(t) for t in bare] == [ConditionalInvertibleResidual, ActNorm] * 2
    with pytest.raises(ValueError, match="couplings need input_dim >= 2"):
        conditional_residual_flow(1, 2)


@pytest.mark.parametrize("explicit", ["inverse", "forward"])
def test_preset_density_is_the_change_of_variables(explicit: str) -> None:
    torch.manual_seed(0)
    transform = conditional_residual_flow(2, 3, num_blocks=2, hidden_dims=[16], explicit=explicit)
    flow = ConditionalFlow(transform, 2, 3).double()
    _perturb(flow)
    flow.eval()
    x = torch.randn(3, dtype=torch.float64)
    theta = flow.condition(x).sample((3,))
    assert theta.shape == (3, 2) and bool(torch.isfinite(theta).all())
    chain = flow.transforms(x)

    def to_base(t: torch.Tensor) -> torch.Tensor:
        for part in reversed(chain):
            t = part.inv(t)
        return t

    for th in theta:
        z = to_base(th)
        base = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
        expected = base + torch.linalg.slogdet(jacobian(to_base, th))[1]
        torch.testing.assert_close(flow.condition(x).log_prob(th), expected, rtol=1e-6, atol=1e-6)
