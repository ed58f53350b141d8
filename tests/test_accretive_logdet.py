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
    with pytest.raises(ValueError, match="positive definite symmetric part.*pivot was -1"):
        accretive_logdet(torch.tensor([[[-1.0]]]))
    with pytest.raises(ValueError, match="pivot was nan"):
        accretive_logdet(torch.full((2, 2, 3), float("nan")))
    with pytest.raises(ValueError, match=r"expected \(n, n, N\) matrices, got \(2, 3, 4\)"):
        accretive_logdet(torch.zeros(2, 3, 4))


def test_empty_and_half_precision():
    assert accretive_logdet(torch.zeros(3, 3, 0)).shape == (0,)
    a = _accretive(6, 4).permute(1, 2, 0)
    half = accretive_logdet(a.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), torch.linalg.slogdet(a.permute(2, 0, 1))[1],
                               rtol=0, atol=0.05)  # fmt: skip
