"""1-Lipschitz activations for residual branches.

Any activation with ``|phi'| <= 1`` keeps the Lipschitz bound of a spectrally normalised
network. ReLU does too, but its derivative jumps, which makes the log-det series and the
Jacobian discontinuous; the two here are smooth.

References:
    [1] Chen et al., *Residual Flows for Invertible Generative Modeling*, NeurIPS 2019.
        arXiv:1906.02735 (LipSwish)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LipSwish", "LipELU", "make_activation", "ACTIVATIONS"]


class LipSwish(nn.Module):
    """``x * sigmoid(beta * x) / 1.1`` with a learnable ``beta > 0``.

    .. math::

        \\phi(x) = \\frac{x\\,\\sigma(\\beta x)}{1.1}, \\qquad \\beta = \\mathrm{softplus}(b)

    The maximum slope of Swish is about 1.0998 for every ``beta``, so dividing by 1.1
    makes it 1-Lipschitz.

    Example:
        >>> import torch
        >>> LipSwish()(torch.zeros(3))
        tensor([0., 0., 0.], grad_fn=<DivBackward0>)
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        # softplus^{-1}(beta) so that beta is exactly the starting slope parameter
        self.raw_beta = nn.Parameter(torch.tensor(float(beta)).expm1().log())

    def forward(self, x: Tensor) -> Tensor:
        beta = F.softplus(self.raw_beta)
        return x * torch.sigmoid(beta * x) / 1.1


class LipELU(nn.ELU):
    """ELU with ``alpha = 1`` (1-Lipschitz, smooth at 0 to first order).

    Example:
        >>> import torch
        >>> LipELU()(torch.tensor([-1.0, 1.0]))
        tensor([-0.6321,  1.0000])
    """

    def __init__(self) -> None:
        super().__init__(alpha=1.0)


ACTIVATIONS = {"lipswish": LipSwish, "elu": LipELU}


def make_activation(name: str) -> nn.Module:
    """Build an activation by name (``"lipswish"`` or ``"elu"``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None
