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
        if torch.is_grad_enabled():  # create_graph: stored numbers have no derivatives
            raise RuntimeError(
                "a log-det with gradient='forward' has no second derivatives (its gradient "
                "was stored as numbers in the forward pass), and a backward pass asked for "
                "them (create_graph=True: a Hessian, a Laplace approximation); use "
                "logdet='exact' (small dimensions) or gradient='backprop'"
            )
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

    With upstream gradients ``a_i`` on the per-sample estimates ``l_i``, the stored
    gradient is exact only when they are all equal; otherwise backward recomputes
    the left side:

    .. math::

        \\nabla_\\theta \\sum_i a_i \\hat\\ell_i = a\\, \\nabla_\\theta \\sum_i \\hat\\ell_i
        \\quad \\text{when } a_i = a \\text{ for all } i .

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

    Example:
        With ``g(z) = w tanh(z)`` the log-det is ``sum_j log(1 + w sech^2(z_j))``; its
        gradient in ``w`` under unequal sample weights comes out exact:

        >>> import torch
        >>> from pyro_invres.ops import logdet_exact, make_vjp
        >>> w = torch.nn.Parameter(torch.tensor(0.5))
        >>> g = lambda z: w * torch.tanh(z)
        >>> estimate = lambda z, gz, gen: logdet_exact(make_vjp(z, gz, create_graph=True), z)
        >>> x = torch.tensor([[0.0, 1.0], [2.0, -1.0]], requires_grad=True)
        >>> def rebuild():
        ...     leaf = x.detach().requires_grad_()
        ...     return leaf, g(leaf)
        >>> value = logdet_with_forward_gradient(estimate, x, g(x), [w], rebuild, seed=0)
        >>> value.shape, value.grad_fn is not None
        (torch.Size([2]), True)
        >>> weights = torch.tensor([1.0, 3.0])
        >>> (weights * value).sum().backward()
        >>> s = 1 - torch.tanh(x.detach()) ** 2   # sech^2
        >>> bool(torch.allclose(w.grad, (weights * (s / (1 + 0.5 * s)).sum(-1)).sum()))
        True
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
