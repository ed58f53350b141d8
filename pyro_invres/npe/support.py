"""The bijection from ``R^D`` onto a prior's support, for flows whose samples must lie in it.

A flow's samples live on all of ``R^D``; a prior with bounded support (a box, as most
simulation-based-inference benchmarks use) gives zero mass outside it. Rejecting the
samples that fall outside wastes draws and changes the density's normalisation; mapping
them in does neither. Pyro's :func:`~pyro.distributions.transforms.biject_to` gives the
standard bijection onto a constraint (a scaled sigmoid per coordinate for an interval),
and the flow is built on the unconstrained side:

.. math::

    \\theta = T(u), \\qquad \\log q(\\theta) = \\log q_u(u) - \\log|\\det J_T(u)| ,

so every sample is in the support and the density integrates to one over it.

Example:
    >>> import torch, pyro.distributions as dist
    >>> prior = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)
    >>> t = support_transform(prior.support, 2)
    >>> theta = t(torch.tensor([[0.0, 50.0], [-3.0, 200.0]]))   # far out: still inside
    >>> bool(prior.support.check(theta).all()), theta[0, 0].item()
    (True, 0.0)
"""

from __future__ import annotations

import torch
from torch.distributions import constraints
from torch.distributions.transforms import (
    ComposeTransform,
    IndependentTransform,
    Transform,
)

__all__ = ["support_transform"]


def _is_identity(t: Transform) -> bool:
    while isinstance(t, IndependentTransform):
        t = t.base_transform
    # torch's identity_transform is ComposeTransform([])
    return isinstance(t, ComposeTransform) and not t.parts


def support_transform(
    support: constraints.Constraint | None, input_dim: int, cache_size: int = 1
) -> Transform | None:
    """The bijection ``R^input_dim -> support`` (``biject_to``), or ``None`` for all of ``R^D``.

    A constraint on single coordinates (``event_dim`` 0, such as ``interval``) is taken
    coordinate by coordinate, as ``independent(support, 1)``. By default the transform
    caches its last pair (``cache_size=1``), so scoring a sample it produced reuses the
    unconstrained point instead of inverting a sigmoid that has rounded to its bound.

    Arguments:
        support: the prior's support (``prior.support``); ``None``, ``real`` or
            ``real_vector`` mean no bound.
        input_dim: the dimension ``D`` of the parameters.
        cache_size: 1 (keep the last pair, as Pyro's transforms do) or 0.

    Returns:
        A transform with event dimension 1, or ``None`` when the support is all of ``R^D``.

    Raises:
        ValueError: for a support that is not a constraint, one on matrices, one without a
            bijection in Pyro's registry, or one whose shape does not fit ``D``.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> support_transform(dist.Normal(torch.zeros(3), 1.0).to_event(1).support, 3) is None
        True
        >>> t = support_transform(dist.constraints.interval(0.0, 2.0), 3)
        >>> t(torch.zeros(1, 3)), t.log_abs_det_jacobian(torch.zeros(3), t(torch.zeros(3)))
        (tensor([[1., 1., 1.]]), tensor(-2.0794))
    """
    if cache_size not in (0, 1):
        raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
    if support is None:
        return None
    if not isinstance(support, constraints.Constraint):
        raise ValueError(
            f"support must be a torch constraint (prior.support), got {type(support).__name__}"
        )
    if support.event_dim == 0:
        support = constraints.independent(support, 1)
    if support.event_dim != 1:
        raise ValueError(
            f"support must constrain vectors of parameters (event_dim 1), got {support} with "
            f"event_dim {support.event_dim}"
        )
    from pyro.distributions.transforms import biject_to

    try:
        t = biject_to(support)
    except NotImplementedError as err:
        raise ValueError(f"Pyro has no bijection onto the support {support}") from err
    if _is_identity(t):
        return None
    probe = torch.zeros(int(input_dim))
    try:
        out = t(probe)
    except RuntimeError as err:
        raise ValueError(
            f"the support {support} does not fit parameters of dimension {input_dim}: {err}"
        ) from err
    if out.shape != probe.shape or not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"the support {support} does not fit parameters of dimension {input_dim}: its "
            f"bijection maps a ({input_dim},) vector to shape {tuple(out.shape)}"
        )
    return t.with_cache(cache_size)
