"""accretive_logdet: pivot-free elimination against LAPACK's slogdet, in float64."""

from __future__ import annotations

import pytest
import torch

from pyro_invres.ops.accretive import accretive_logdet


def _accretive(batch: int, n: int, norm: float = 0.9, seed: int = 0) -> torch.Tensor:
    """``I + J`` with ``||J||_2 = norm`` for each of ``batch`` matrices, ``(batch, n, n)``."""
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    j = norm * j / torch.linalg.matrix_norm(j, 2)[:, None, None]
    return torch.eye(n, dtype=torch.float64) + j


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("norm", [0.5, 0.99])
def test_value_and_gradient_match_slogdet(n, norm):
    a = _accretive(40, n, norm, seed=n).requires_grad_(True)
    weights = torch.randn(40, dtype=torch.float64)
    ref = torch.linalg.slogdet(a)[1]
    ours = accretive_logdet(a.permute(1, 2, 0))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), a)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), a)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-10)


def test_gradcheck_and_second_derivatives():
    a = _accretive(5, 3).permute(1, 2, 0).contiguous().requires_grad_(True)
    assert torch.autograd.gradcheck(accretive_logdet, (a,))
    assert torch.autograd.gradgradcheck(accretive_logdet, (a,))


def test_refuses_what_it_cannot_eliminate():
    # a negative pivot: not I + J with ||J|| < 1
    with pytest.raises(ValueError, match="positive definite symmetric part.*pivot 0 was -1"):
        accretive_logdet(torch.tensor([[[-1.0]]]))
    # a zero pivot is named as such, not by the infinities that follow from it
    singular = torch.tensor([[1.0, 2.0], [0.5, 1.0]]).unsqueeze(-1)
    with pytest.raises(ValueError, match="pivot 1 was 0"):
        accretive_logdet(singular)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="expected finite matrices"):
            accretive_logdet(torch.full((2, 2, 3), bad))
    with pytest.raises(ValueError, match=r"expected \(n, n, N\) matrices, got \(2, 3, 4\)"):
        accretive_logdet(torch.zeros(2, 3, 4))


def test_empty_and_half_precision():
    empty = torch.zeros(3, 3, 0, requires_grad=True)
    value = accretive_logdet(empty)
    assert value.shape == (0,)
    value.sum().backward()  # the graph survives an empty batch
    assert empty.grad.shape == empty.shape
    a = _accretive(6, 4).permute(1, 2, 0)
    half = accretive_logdet(a.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), torch.linalg.slogdet(a.permute(2, 0, 1))[1],
                               rtol=0, atol=0.05)  # fmt: skip


def test_pixel_residual_under_torch_func_falls_back_to_lapack():
    from pyro_invres.transforms.pixel_residual import PixelResidual

    torch.manual_seed(0)
    block = PixelResidual((3, 2, 2), 4).double()
    x = torch.randn(3, 2, 2, dtype=torch.float64)

    def ladj(x):
        return block.call_and_ladj(x.unsqueeze(0), cached=False)[1][0]

    grad = torch.func.grad(ladj)(x)
    reference = torch.autograd.functional.jacobian(ladj, x)
    torch.testing.assert_close(grad, reference, rtol=0, atol=1e-12)
    assert grad.abs().max() > 0
