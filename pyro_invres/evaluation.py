"""Scoring a trained flow: its density, its held-out NLL, the work its inverses cost.

:func:`make_density` pushes a standard normal through a flow (the density
:func:`~pyro_invres.train.fit_density` fits), :func:`evaluate_nll` scores data with it in
eval mode under ``torch.no_grad()``, optionally with the exact log-det, and
:func:`inverse_iterations` counts the fixed-point iterations the flow's blocks have run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor

from .ops.logdet import ESTIMATOR_TYPES

__all__ = ["evaluate_nll", "inverse_iterations", "make_density"]


def make_density(
    flow: TransformModule,
    event_shape: int | Sequence[int],
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dist.TransformedDistribution:
    """The flow pushed forward from a standard normal base of shape ``event_shape``.

    ``event_shape`` is ``D`` or a shape (``(D,)``, ``(C, H, W)``), as a factory's ``input_dim``.

    Example:
        >>> from pyro_invres.flows import build_flow
        >>> flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8])
        >>> make_density(flow, (2,)).log_prob(torch.zeros(3, 2)).shape
        torch.Size([3])
    """
    shape = (
        (int(event_shape),) if isinstance(event_shape, int) else tuple(int(s) for s in event_shape)
    )
    loc = torch.zeros(shape, device=device, dtype=dtype)
    base = dist.Normal(loc, torch.ones_like(loc)).to_event(len(shape))
    return dist.TransformedDistribution(base, flow)


def inverse_iterations(flow: torch.nn.Module) -> int:
    """Total fixed-point iterations run so far by the blocks that count them.

    Sums ``solve_stats.iterations`` over every submodule that has ``solve_stats``
    (:class:`~pyro_invres.InvertibleResidual`); 0 for flows without iterative blocks.

    Example:
        >>> from pyro_invres.flows import build_flow
        >>> inverse_iterations(build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8]))
        0
    """
    total = 0
    for module in flow.modules():
        stats = getattr(module, "solve_stats", None)
        if stats is not None:
            total += int(stats.iterations)
    return total


@contextlib.contextmanager
def _logdet_method(flow: torch.nn.Module, method: str | None) -> Iterator[None]:
    """Temporarily switch every block that has a ``logdet`` option to ``method``."""
    saved = []
    if method is not None:
        for module in flow.modules():
            # an i-ResNet's estimator is an object (or, in blocks of other kinds, a name)
            if isinstance(getattr(module, "logdet", None), (str, *ESTIMATOR_TYPES)):
                saved.append((module, module.logdet))
                module.logdet = method
    try:
        yield
    finally:
        for module, value in saved:
            module.logdet = value


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def evaluate_nll(
    flow: TransformModule,
    data: Tensor,
    *,
    batch_size: int = 4096,
    logdet: str | None = None,
) -> float:
    """Mean negative log-likelihood of ``data`` (nats per sample), in eval mode.

    Runs under ``torch.no_grad()`` with the flow in eval mode (restored afterwards).

    Arguments:
        flow: the flow; ``data`` lives on the flow's device, in its dtype.
        data: ``(N, *event_shape)``.
        batch_size: samples scored at once.
        logdet: switch the blocks' log-det estimator for this evaluation (``"exact"``
            removes the roulette estimator's noise; it costs ``D`` backward passes).

    Example:
        >>> from pyro_invres.flows import build_flow
        >>> flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8])
        >>> nll = evaluate_nll(flow, torch.randn(100, 2))
        >>> 2.0 < nll < 4.0
        True
    """
    if data.dim() < 2 or len(data) == 0:
        raise ValueError(f"data must be a non-empty batch (N, *event_shape), got {data.shape}")
    density = make_density(flow, data.shape[1:], data.device, data.dtype)
    total = 0.0
    with _eval_mode(flow), _logdet_method(flow, logdet), torch.no_grad():
        for chunk in data.split(int(batch_size)):
            total += float(density.log_prob(chunk).sum())
    return -total / len(data)
