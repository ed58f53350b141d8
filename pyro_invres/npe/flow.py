"""A conditional flow ready for neural posterior estimation: ``q(theta | x)``.

:class:`ConditionalFlow` puts together what amortised inference needs around a stack of
conditional transforms (:func:`~pyro_invres.flows.conditional_residual_flow`, or any
Pyro conditional transform):

.. math::

    \\theta = T\\bigl(\\mu + \\sigma \\odot f(z;\\ e(\\tilde x))\\bigr), \\qquad
    z \\sim \\mathcal{N}(0, I), \\qquad \\tilde x = (x - m) / s ,

* ``f``: the conditional flow, from base noise to standardised parameters;
* ``mu, sigma`` and ``m, s``: z-scoring of the parameters (on the unconstrained side) and
  of the observations, fitted to the training data (:meth:`ConditionalFlow.standardize`)
  and kept in buffers, so a saved state dict carries them;
* ``e``: an optional embedding network for the observations, trained with the flow;
* ``T``: the bijection onto the prior's support (:func:`~pyro_invres.npe.support_transform`),
  so that every sample lies in it, with its log-determinant in the density.

``flow.condition(x)`` (or ``flow(x)``) is a Pyro distribution with batch shape
``x.shape[:-1]``: contexts ``(B, C)`` give samples ``(n, B, D)`` from ``.sample((n,))``
and score parameters ``(B, D)`` or ``(n, B, D)``, as zuko's conditional flows do. It can be
observed in a Pyro model like any distribution (see :func:`~pyro_invres.npe.fit_conditional`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import (
    ConditionalComposeTransformModule,
    ConditionalDistribution,
    ConditionalTransform,
)
from torch import Tensor, nn
from torch.distributions import constraints
from torch.distributions.transforms import ComposeTransform, Transform

from .standardize import Standardization
from .support import support_transform

__all__ = ["ConditionalFlow"]


def _support_digest(support: constraints.Constraint | None) -> Tensor:
    """Eight bytes of a SHA-256 of the support's type and bounds (as float64 numbers).

    Kept as a buffer, so a state dict holds tensors only and carries which support its
    parameters were trained on.
    """
    parts: list[Any] = []
    while isinstance(support, constraints.independent):
        parts.append(support.reinterpreted_batch_ndims)
        support = support.base_constraint
    parts.append(type(support).__name__)
    for name in ("lower_bound", "upper_bound"):
        bound = getattr(support, name, None)
        if bound is not None:
            parts.append((name, torch.as_tensor(bound).double().flatten().tolist()))
    digest = hashlib.sha256(repr(parts).encode()).digest()[:8]
    return torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64)


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class _Posterior(dist.TransformedDistribution):
    """``q(theta | x)`` as :meth:`ConditionalFlow.condition` returns it.

    A :class:`~pyro.distributions.TransformedDistribution` whose ``support`` is the
    prior's (the last transform's codomain says only "real" for a scaled sigmoid), so
    Pyro's validation refuses values outside it, and whose density is ``-inf`` there
    when validation is off: the flow puts no mass outside the support, and a clamped
    inverse would otherwise give such values a finite, wrong density. Values broadcast
    against the batch of observations, as any torch distribution's do.
    """

    def __init__(
        self,
        base: dist.Distribution,
        transforms: list[Transform],
        support: constraints.Constraint | None,
    ) -> None:
        self._prior_support = support
        super().__init__(base, transforms)

    def expand(self, batch_shape: Sequence[int], _instance: Any = None) -> _Posterior:
        new = self._get_checked_instance(_Posterior, _instance)
        new._prior_support = self._prior_support
        return super().expand(batch_shape, _instance=new)

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self) -> constraints.Constraint:
        if self._prior_support is None:
            return super().support
        return self._prior_support

    def log_prob(self, value: Tensor) -> Tensor:
        if isinstance(value, Tensor) and value.dim() >= 1:
            try:
                shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
            except RuntimeError:
                raise ValueError(
                    f"parameters of shape {tuple(value.shape)} do not broadcast with the "
                    f"observations' batch shape {tuple(self.batch_shape)}: give (..., D) "
                    "values whose batch shape ends in it (or 1s)"
                ) from None
            if shape != value.shape[:-1]:  # a value of the right shape keeps the cache's pair
                value = value.expand(*shape, value.shape[-1])
        if self._prior_support is None or self._validate_args:
            return super().log_prob(value)  # validation refuses values outside the support
        inside = self._prior_support.check(value)
        if bool(inside.all()):
            return super().log_prob(value)
        support_map = self.transforms[-1].with_cache(0)
        safe = torch.where(inside.unsqueeze(-1), value, support_map(torch.zeros_like(value)))
        lp = super().log_prob(safe)
        return torch.where(inside, lp, lp.new_full((), -math.inf))


class ConditionalFlow(nn.Module, ConditionalDistribution):
    """``q(theta | x)``: base noise through a conditional flow, z-scoring and a support map.

    Arguments:
        transform: the conditional flow from base noise to (standardised, unconstrained)
            parameters: a :class:`~pyro.distributions.conditional.ConditionalTransformModule`
            (such as :func:`~pyro_invres.flows.conditional_residual_flow`) or a list of
            transforms, conditional or not (ActNorm, permutations).
        input_dim: the dimension ``D`` of the parameters.
        context_dim: the dimension ``C`` of the observations as given (before the
            embedding).
        embedding: a module mapping observations ``(..., C)`` (z-scored) to the context
            ``(..., E)`` the transforms take; trained jointly. ``None``: the transforms see
            the z-scored observations.
        support: the prior's support (``prior.support``): samples are mapped into it by
            :func:`~pyro_invres.npe.support_transform`. ``None``: all of ``R^D``.

    Cost: the embedding runs once per :meth:`condition`; sampling ``n`` draws for ``B``
    observations runs the flow once on ``(n, B, D)`` (for a residual flow with
    ``explicit="inverse"``, that is where its blocks iterate); scoring is one pass.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> from pyro_invres.flows import conditional_residual_flow
        >>> prior = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)
        >>> flow = ConditionalFlow(conditional_residual_flow(2, 3, num_blocks=2, hidden_dims=[16]),
        ...                        2, 3, support=prior.support)
        >>> x = torch.randn(4, 3)                      # four observations
        >>> theta = flow.condition(x).sample((100,))
        >>> theta.shape, bool(prior.support.check(theta).all())
        (torch.Size([100, 4, 2]), True)
        >>> flow.condition(x).log_prob(theta).shape
        torch.Size([100, 4])
    """

    def __init__(
        self,
        transform: ConditionalTransform | Transform | Sequence[ConditionalTransform | Transform],
        input_dim: int,
        context_dim: int,
        *,
        embedding: nn.Module | None = None,
        support: constraints.Constraint | None = None,
    ) -> None:
        super().__init__()
        self.input_dim = _positive("input_dim", input_dim)
        self.context_dim = _positive("context_dim", context_dim)
        if isinstance(transform, Sequence):
            transform = ConditionalComposeTransformModule(list(transform))
        if not isinstance(transform, ConditionalTransform | Transform):
            raise ValueError(
                "transform must be a (conditional) transform or a list of them, got "
                f"{type(transform).__name__}"
            )
        if not isinstance(transform, nn.Module):
            raise ValueError(
                f"transform must be a module holding its parameters (a ConditionalTransformModule "
                f"or TransformModule), got {type(transform).__name__}: a bare .inv has no "
                "parameters to train; use pyro_invres.Inverse or explicit= to choose the side"
            )
        if embedding is not None and not isinstance(embedding, nn.Module):
            raise ValueError(f"embedding must be an nn.Module, got {type(embedding).__name__}")
        self.transform = transform
        self.embedding = embedding
        self.parameter_norm = Standardization(self.input_dim)
        self.context_norm = Standardization(self.context_dim)
        self.support = support
        self._support_map = support_transform(support, self.input_dim)
        self.register_buffer(
            "support_digest", _support_digest(None if self._support_map is None else support)
        )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # the support's bijection holds a cache: rebuild it rather than share a pickled one
        self._support_map = support_transform(self.support, self.input_dim)

    # -- the context -------------------------------------------------------------------------
    def _check_context(self, context: Tensor) -> None:
        if not isinstance(context, Tensor):
            raise TypeError(f"context must be a Tensor, got {type(context).__name__}")
        if context.dim() == 0 or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"expected observations of shape (..., {self.context_dim}) "
                f"(context_dim={self.context_dim}), got shape {tuple(context.shape)}"
            )
        loc = self.context_norm.loc
        if context.dtype != loc.dtype or context.device != loc.device:
            raise ValueError(
                f"observations are {context.dtype} on {context.device} but the flow is "
                f"{loc.dtype} on {loc.device}; convert them with .to(...)"
            )

    def embed(self, context: Tensor) -> Tensor:
        """The context the transforms see: ``embedding((x - m) / s)``, ``(..., E)``."""
        self._check_context(context)
        h = self.context_norm.standardize(context)
        if self.embedding is None:
            return h
        out = self.embedding(h)
        if not isinstance(out, Tensor) or out.shape[:-1] != context.shape[:-1]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the embedding must map observations {tuple(context.shape)} to "
                f"{tuple(context.shape[:-1])} + (E,), got {shape}"
            )
        return out

    # -- the distribution --------------------------------------------------------------------
    def conditioned(self, context: Tensor) -> Transform:
        """The flow ``f(.; e(x))`` for ``context`` alone, from base noise to standardised
        parameters (a module, for Pyro's and this package's conditional stacks)."""
        if isinstance(self.transform, ConditionalTransform):
            return self.transform.condition(self.embed(context))
        self._check_context(context)  # an unconditional flow: the same for every context
        return self.transform

    def transforms(self, context: Tensor) -> list[Transform]:
        """The transforms from base noise to parameters for ``context`` (flow, z-score, support).

        A composed flow is given part by part: torch recomputes a composition's domain
        and codomain on every access, which made building the distribution cost more
        than a small batch's scoring pass.
        """
        flow = self.conditioned(context)
        parts = list(flow.parts) if isinstance(flow, ComposeTransform) and flow.parts else [flow]
        parts.append(self.parameter_norm.transform())
        if self._support_map is not None:
            parts.append(self._support_map)
        return parts

    def condition(self, context: Tensor) -> dist.TransformedDistribution:
        """``q(theta | x)`` for observations ``x`` ``(..., C)``: batch shape ``x.shape[:-1]``.

        Its ``support`` is the prior's; a value outside it is refused under Pyro's
        validation (the default) and has density ``-inf`` without it.
        """
        self._check_context(context)
        loc = self.parameter_norm.loc
        zeros = loc.new_zeros(()).expand(*context.shape[:-1], self.input_dim)
        base = dist.Normal(zeros, loc.new_ones(()).expand_as(zeros)).to_event(1)
        support = None
        if self._support_map is not None:
            support = self.support
            support = support if support.event_dim else constraints.independent(support, 1)
        return _Posterior(base, self.transforms(context), support)

    def forward(self, context: Tensor) -> dist.TransformedDistribution:
        """:meth:`condition`, so that ``flow(x)`` is the distribution (as zuko's flows)."""
        return self.condition(context)

    # -- the support travels with the state dict ---------------------------------------------
    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        key = prefix + "support_digest"
        saved = state_dict.get(key)
        if saved is None:  # saved before the support was recorded: loads as it always did
            state_dict[key] = self.support_digest
        elif not torch.equal(saved.cpu(), self.support_digest.cpu()):
            raise RuntimeError(
                "the state dict was saved from a flow on another support than this flow's "
                f"({self.support}): build it with the same support= as the flow that was "
                "trained (its parameters live on that support's unconstrained side)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- z-scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def unconstrain(self, theta: Tensor) -> Tensor:
        """Parameters mapped from the support to ``R^D`` (the side the flow and z-score see)."""
        if self._support_map is None:
            return theta
        # an uncached bijection: a pair cached here, without a graph, must not answer a
        # later log_prob of the same tensor
        return support_transform(self.support, self.input_dim, cache_size=0).inv(theta)

    def standardize(
        self, theta: Tensor | None = None, context: Tensor | None = None
    ) -> ConditionalFlow:
        """Fit the z-scoring of the parameters and/or the observations to training data.

        The parameters are z-scored on the unconstrained side (after the inverse of the
        support map), the observations as given. Either may be ``None`` (left as it is:
        the identity until fitted). Returns ``self``.

        Example:
            >>> import torch
            >>> from pyro_invres.flows import conditional_residual_flow
            >>> flow = ConditionalFlow(conditional_residual_flow(2, 1, num_blocks=1), 2, 1)
            >>> theta, x = 3.0 + torch.randn(500, 2), 100.0 * torch.randn(500, 1)
            >>> _ = flow.standardize(theta, x)
            >>> bool(flow.context_norm.fitted), round(float(flow.context_norm.scale), -1)
            (True, 100.0)
        """
        if theta is not None:
            self.parameter_norm.fit(self.unconstrain(theta))
        if context is not None:
            self._check_context(context)
            self.context_norm.fit(context)
        return self

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, context_dim={self.context_dim}, support={self.support}"
