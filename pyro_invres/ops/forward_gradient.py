"""The log-det's gradient computed in the forward pass, correct under per-sample weights.

Residual Flows' "backward-in-forward" trick differentiates the log-det estimate while the
forward pass still holds its graph, stores the gradients and frees that graph at once,
which lowers peak memory. The stored parameter gradient is the gradient of the *sum* of
the per-sample estimates, so it is only right when every sample receives the same
upstream gradient. Under importance weights or a plate with unequal scales it is wrong.

Here the backward checks: the input gradient is stored per sample and always exact; the
parameter gradient is used as stored when the upstream gradient is uniform, and is
otherwise recomputed exactly (same probes and same roulette draw, from a saved seed) with
the upstream weights applied. A uniform scale, as in a subsampled plate, keeps the saving.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["logdet_with_forward_gradient"]

Estimate = Callable[[Tensor, Tensor, torch.Generator], Tensor]


class _State:
    def __init__(
        self,
        dx: Tensor | None,
        dparams: list[Tensor | None],
        recompute: Callable[[Tensor], list[Tensor | None]],
        event_dim: int,
    ) -> None:
        self.dx = dx
        self.dparams = dparams
        self.recompute = recompute
        self.event_dim = event_dim
        self.recomputed = 0


class _StoredGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, x: Tensor, state: _State, *params: Tensor) -> Tensor:  # noqa: ANN001
        # saved, not kept on the state: autograd frees them after a backward pass that does
        # not retain the graph, even while something (a log-det memo) keeps this node alive
        ctx.save_for_backward(state.dx, *state.dparams)
        state.dx, state.dparams = None, []
        ctx.state = state
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        state: _State = ctx.state
        dx, *dparams = ctx.saved_tensors
        shaped = grad.reshape(grad.shape + (1,) * state.event_dim)
        gx = None if dx is None else shaped * dx
        flat = grad.reshape(-1)
        if flat.numel() == 0 or bool((flat == flat[0]).all()):
            scale = flat[0] if flat.numel() else grad.new_zeros(())
            gp = [None if d is None else d * scale for d in dparams]
        else:
            state.recomputed += 1
            gp = state.recompute(grad)
        return (None, gx, None, *gp)


def logdet_with_forward_gradient(
    estimate: Estimate,
    x: Tensor,
    gx: Tensor,
    params: Sequence[Tensor],
    rebuild: Callable[[], tuple[Tensor, Tensor]],
    seed: int,
    event_dim: int = 1,
) -> Tensor:
    """Evaluate ``estimate`` and its gradients now; return a value whose backward uses them.

    Arguments:
        estimate: ``(x, gx, generator) -> per-sample log-det`` with a differentiable
            (e.g. Neumann) gradient in ``x`` and the parameters.
        x: the point, part of the caller's graph; ``gx = g(x)`` computed from it.
        gx: the residual at ``x``.
        params: the parameters the log-det depends on.
        rebuild: ``() -> (leaf, g(leaf))`` on a fresh graph, for an exact recomputation
            when the upstream gradient differs across samples.
        seed: the seed of the estimate's randomness (probes, roulette draw).
        event_dim: number of event dimensions.

    Returns:
        The estimate (batch-shaped) wired to the stored gradients.
    """
    params = [p for p in params if p.requires_grad]
    device = x.device

    def generator() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    with torch.enable_grad():
        value = estimate(x, gx, generator())
        inputs = ([x] if x.requires_grad else []) + params
        # retain: x and gx also carry the block's output; the surrogate's own nodes are
        # freed anyway when `value` goes out of scope, which is the point of this mode
        grads = torch.autograd.grad(value.sum(), inputs, retain_graph=True, allow_unused=True)
    dx = grads[0] if x.requires_grad else None
    dparams = list(grads[1:] if x.requires_grad else grads)

    def recompute(upstream: Tensor) -> list[Tensor | None]:
        with torch.enable_grad():
            leaf, g_leaf = rebuild()
            weighted = (estimate(leaf, g_leaf, generator()) * upstream).sum()
            return list(torch.autograd.grad(weighted, params, allow_unused=True))

    state = _State(dx, dparams, recompute, event_dim)
    return _StoredGradient.apply(value.detach(), x, state, *params)
