"""``AutoResidualFlow``: a residual-flow autoguide for Pyro models.

The guide is a flow over the model's unconstrained latents, built by
:func:`~pyro_invres.flows.posterior_flow`: from a standard normal base, masked affine
coupling layers (every coordinate rescaled by every other somewhere, see
:func:`~pyro_invres.transforms.masked_coupling.pairwise_masks`) alternating with i-ResNet
blocks ``z + g(z)`` (explicit in the sampling direction, exact log-determinant), then a
learned full-rank affine map ``loc + L z`` that starts at the model's initial point.

Why this shape: a residual block with ``Lip(g) <= c`` has Jacobian singular values in
``[1 - c, 1 + c]``, so a stack of them cannot change local scale by the ``e^9`` a funnel's
neck and mouth differ by. The scale layers do that job cheaply (a log-scale close to
linear in the conditioning coordinates, as in a funnel ``x_j | v ~ N(0, e^{v})`` or a
centred hierarchy ``theta_j = mu + tau eta_j``); the full-rank affine map carries location,
global scale and correlation (the ``AutoMultivariateNormal`` family is the special case
with no other layer); the residual blocks add the smooth, dense, non-axis-aligned
nonlinearity the others lack. Every layer is explicit in the sampling direction, so
drawing and scoring its own samples (ELBO, importance weights, NeuTra-HMC) never solves a
fixed point, and every log-determinant is exact.

It is correct straight after training in either module mode: it holds no data-initialised
layer (no ActNorm), and the spectral normalisation refreshes only when weights change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median

from .flows import posterior_flow
from .transforms.chain import Chain
from .transforms.triangular import TriangularAffine

__all__ = ["AutoResidualFlow"]


class AutoResidualFlow(AutoContinuous):
    """A residual-flow guide over the model's unconstrained latent vector.

    Use it as Pyro's ``AutoIAFNormal``: with ``SVI`` and any ELBO, ``Predictive``,
    ``Importance``, and as the trained guide of ``NeuTraReparam``
    (:meth:`get_transform` maps the standard normal base to the latents).

    Arguments:
        model: a Pyro model.
        num_blocks: i-ResNet blocks (0 leaves the scale layers and the affine map).
        hidden_dims: hidden sizes of each block's Lipschitz network (default
            ``[max(32, 4 D)] * 2``).
        coupling_hidden_dims: hidden sizes of the scale layers' conditioners (default
            ``[max(32, 4 D)]``, with a linear skip path); ``[]`` keeps them log-linear.
        lipschitz: the bound ``c < 1`` on each block's ``Lip(g)``.
        log_scale_bound: the bound on each scale layer's log-scale.
        init_scale: the starting scale of the affine map (as ``AutoMultivariateNormal``).
        init_loc_fn: where the affine map starts (a Pyro init strategy).
        activation: the blocks' activation.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model():
        ...     v = pyro.sample("v", dist.Normal(0.0, 3.0))
        ...     pyro.sample("x", dist.Normal(0.0, (v / 2).exp()).expand([2]).to_event(1))
        >>> pyro.clear_param_store()
        >>> guide = AutoResidualFlow(model, num_blocks=1)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        >>> loss = svi.step()
        >>> posterior = guide.get_posterior()
        >>> z = posterior.sample((5,))
        >>> posterior.log_prob(z).shape   # scored through the cache: no inverse solved
        torch.Size([5])
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        num_blocks: int = 2,
        hidden_dims: Sequence[int] | None = None,
        coupling_hidden_dims: Sequence[int] | None = None,
        lipschitz: float = 0.9,
        log_scale_bound: float = 4.0,
        init_scale: float = 0.1,
        init_loc_fn: Callable[[dict], torch.Tensor] = init_to_median,
        activation: str = "lipswish",
    ) -> None:
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale}")
        self._flow_options = {
            "num_blocks": int(num_blocks),
            "hidden_dims": None if hidden_dims is None else list(hidden_dims),
            "coupling_hidden_dims": (
                None if coupling_hidden_dims is None else list(coupling_hidden_dims)
            ),
            "lipschitz": float(lipschitz),
            "log_scale_bound": float(log_scale_bound),
            "init_scale": float(init_scale),
            "activation": activation,
        }
        # fail at construction, not at the first SVI step, on options the flow refuses
        posterior_flow(2, **self._flow_options)
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        loc = self._init_loc()
        flow = posterior_flow(self.latent_dim, **self._flow_options)
        flow = flow.to(device=loc.device, dtype=loc.dtype)
        affine = flow.parts[-1]
        if not isinstance(affine, TriangularAffine):  # posterior_flow's contract
            raise TypeError(f"posterior_flow must end with TriangularAffine, got {affine!r}")
        affine.set_loc(loc)
        self.transform: Chain = flow

    def get_base_dist(self) -> dist.Distribution:
        """The standard normal base over the latent vector (on the guide's device)."""
        ref = self.transform.parts[-1].loc
        return dist.Normal(ref.new_zeros(()), 1.0).expand([self.latent_dim]).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any) -> Chain:
        """The flow from the base to the unconstrained latents (``NeuTraReparam`` uses it)."""
        return self.transform

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TransformedDistribution:
        """The flow's distribution over the unconstrained latent vector."""
        return dist.TransformedDistribution(self.get_base_dist(), [self.transform])
