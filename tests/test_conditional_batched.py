"""Batched contexts: B observations at once give what a loop over single ones gives.

zuko's convention, which NPE code relies on: ``flow.condition(x).sample((n,))`` with
contexts ``(B, C)`` returns ``(n, B, D)``, and ``log_prob`` scores ``(B, D)`` or
``(n, B, D)`` against them. Checked for both explicit directions of the conditional
i-ResNet and for the conditional couplings, in both directions of each map, against the
same computation done one context at a time.
"""

import pytest
import torch
from torch.distributions.transforms import ComposeTransform

from pyro_invres import (
    ActNorm,
    conditional_additive_coupling,
    conditional_affine_coupling,
    conditional_iresnet,
)
from pyro_invres.flows import conditional_residual_flow
from pyro_invres.npe import ConditionalFlow

D, C, B, N = 3, 2, 4, 5


def _perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random parameters everywhere (couplings start as the identity: zero last layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


TRANSFORMS = {
    "iresnet-forward": lambda: [conditional_iresnet(D, C, [16], explicit="forward"), ActNorm(D)],
    "iresnet-inverse": lambda: [conditional_iresnet(D, C, [16], explicit="inverse"), ActNorm(D)],
    "iresnet-newton": lambda: [
        conditional_iresnet(D, C, [16], explicit="inverse", solver="newton")
    ],
    "affine-coupling": lambda: [conditional_affine_coupling(D, C, [16])],
    "additive-coupling": lambda: [conditional_additive_coupling(D, C, [16])],
    "preset": lambda: conditional_residual_flow(D, C, num_blocks=2, hidden_dims=[16]),
}


def _flow(name: str) -> ConditionalFlow:
    torch.manual_seed(0)
    flow = ConditionalFlow(TRANSFORMS[name](), D, C).double()
    _perturb(flow)
    return flow.eval()  # ActNorm: no data-dependent initialisation on the first call


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_sample_shapes_follow_the_context_batch(name: str) -> None:
    flow = _flow(name)
    x = torch.randn(B, C, dtype=torch.float64)
    theta = flow.condition(x).sample((N,))
    assert theta.shape == (N, B, D)
    assert flow.condition(x).log_prob(theta).shape == (N, B)
    assert flow.condition(x[0]).sample((N,)).shape == (N, D)
    assert flow(x).sample().shape == (B, D)
    assert flow.condition(x.expand(2, B, C)).sample((N,)).shape == (N, 2, B, D)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_log_prob_matches_a_loop_over_single_contexts(name: str) -> None:
    flow = _flow(name)
    x = torch.randn(B, C, dtype=torch.float64)
    theta = torch.randn(N, B, D, dtype=torch.float64)
    # fresh tensors: the scoring side runs (iterative for explicit="forward")
    batched = flow.condition(x).log_prob(theta.clone())
    single = torch.stack([flow.condition(x[b]).log_prob(theta[:, b].clone()) for b in range(B)], 1)
    torch.testing.assert_close(batched, single, atol=1e-7, rtol=1e-7)
    one_each = flow.condition(x).log_prob(theta[0].clone())  # (B, D) against (B, C)
    torch.testing.assert_close(one_each, single[0], atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_both_directions_match_a_loop_over_single_contexts(name: str) -> None:
    flow = _flow(name)
    x = torch.randn(B, C, dtype=torch.float64)
    z = torch.randn(N, B, D, dtype=torch.float64)
    t = ComposeTransform(flow.transforms(x))
    forward, backward = t(z.clone()), t.inv(z.clone())
    for b in range(B):
        tb = ComposeTransform(flow.transforms(x[b]))
        torch.testing.assert_close(forward[:, b], tb(z[:, b].clone()), atol=1e-7, rtol=1e-7)
        torch.testing.assert_close(backward[:, b], tb.inv(z[:, b].clone()), atol=1e-7, rtol=1e-7)
    # and each is the other's inverse, batched
    torch.testing.assert_close(t.inv(forward.clone()), z, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_samples_match_a_loop_for_the_same_noise(name: str) -> None:
    flow = _flow(name)
    x = torch.randn(B, C, dtype=torch.float64)
    torch.manual_seed(3)
    theta = flow.condition(x).sample((N,))
    torch.manual_seed(3)
    z = torch.randn(N, B, D, dtype=torch.float64)  # the base draws the same numbers
    single = [ComposeTransform(flow.transforms(x[b]))(z[:, b]) for b in range(B)]
    torch.testing.assert_close(theta, torch.stack(single, 1), atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_context_shapes_are_checked_with_clear_errors(name: str) -> None:
    flow = _flow(name)
    with pytest.raises(
        ValueError, match=r"observations of shape \(\.\.\., 2\).*got shape \(4, 3\)"
    ):
        flow.condition(torch.randn(B, C + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        flow.condition(torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"float32"):
        flow.condition(torch.randn(B, C))
    # parameters whose batch does not fit the contexts': refused, never broadcast
    x = torch.randn(B, C, dtype=torch.float64)
    with pytest.raises(ValueError):
        flow.condition(x).log_prob(torch.randn(7, D, dtype=torch.float64))


BLOCKS = {
    "iresnet-forward": lambda: conditional_iresnet(D, C, [16], explicit="forward"),
    "iresnet-inverse": lambda: conditional_iresnet(D, C, [16], explicit="inverse"),
    "affine-coupling": lambda: _perturb(conditional_affine_coupling(D, C, [16])),
    "additive-coupling": lambda: _perturb(conditional_additive_coupling(D, C, [16])),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_a_block_refuses_a_context_batch_its_input_does_not_absorb(name: str) -> None:
    block = BLOCKS[name]()
    # inputs (B, D) against contexts (N, B, C) would broadcast to (N, B, D): a block must keep
    # its input's shape, so both directions refuse, naming the shapes
    bound = block.condition(torch.randn(N, B, C))
    for direction in (bound, bound.inv):
        with pytest.raises(ValueError, match=r"context's batch shape \(5, 4\) does not expand"):
            direction(torch.randn(B, D))
    # (n, D) against (B, C), n != B: the size mismatch says which shapes
    for direction in (block.condition(torch.randn(B, C)), block.condition(torch.randn(B, C)).inv):
        with pytest.raises(ValueError, match=r"context's batch shape \(4,\)"):
            direction(torch.randn(7, D))


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_log_det_matches_a_loop(name: str) -> None:
    torch.manual_seed(1)
    block = BLOCKS[name]().double()
    x = torch.randn(B, C, dtype=torch.float64)
    z = torch.randn(N, B, D, dtype=torch.float64)
    t = block.condition(x)
    y = t(z.clone())
    ladj = t.log_abs_det_jacobian(z, y)
    for b in range(B):
        tb = block.condition(x[b])
        yb = tb(z[:, b].clone())
        torch.testing.assert_close(y[:, b], yb, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(
            ladj[:, b], tb.log_abs_det_jacobian(z[:, b], yb), atol=1e-8, rtol=1e-8
        )
