"""``AutoResidualFlow``: a residual-flow autoguide for Pyro models.

The guide is a flow over the model's unconstrained latents, built by
:func:`~pyro_invres.flows.posterior_flow`: from a standard normal base, two rounds of an
affine autoregressive layer (IAF direction, MADE conditioner with a linear skip path; the
second round in the reversed order) followed by a one-hidden-layer i-ResNet block
``z + g(z)`` (``Lip(g) <= 0.9``, exact log-determinant), then a learned full-rank affine
map ``loc + L z`` that starts at the model's initial point.

Why this shape: a residual block with ``Lip(g) <= c`` has Jacobian singular values in
``[1 - c, 1 + c]``, so a stack of them cannot change local scale by the ``e^9`` a funnel's
neck and mouth differ by. The autoregressive layers do that job (a log-scale close to
linear in the earlier coordinates, as in a funnel ``x_j | v ~ N(0, e^{v})`` or a centred
hierarchy ``theta_j = mu + tau eta_j``), but each is affine in the coordinate it moves: it
cannot bend a marginal (the skewed posterior of eight schools' ``log tau``). The
residual blocks add that smooth, dense, non-axis-aligned nonlinearity; the full-rank
affine map carries location, global scale and correlation (the ``AutoMultivariateNormal``
family is the special case with no other layer).

What each part earns, measured (``examples/benchmarks/study_guide_ablation.py``, results
in ``examples/benchmarks/results/guide_ablation_cpu.json``: 2000 SVI steps, ClippedAdam
``1e-2 -> 1e-3``, 8 particles, PSIS k-hat of 10,000 exact importance weights, mean over
seeds 0-2 where run): on the 10-D funnel the residual blocks are what brings k-hat down
(0.65 with them, 0.85 without; ``AutoIAFNormal`` 0.74); on centred eight schools they
earn little (0.66 against 0.69; ``AutoIAFNormal`` 0.86 over seeds 1-2, with two
layers 0.60); on non-centred eight schools (0.48 against 0.43) and logistic regression
(one seed: 0.53 against 0.50, ``AutoIAFNormal`` 0.70) they earn nothing. The seed-to-seed
spread of k-hat is about 0.1. Cost (``examples/benchmarks/bench_guide_step.py``,
``results/guide_step_cpu.json``, interleaved, one thread's CPU time): an SVI step costs
1.7-1.8x ``AutoIAFNormal``'s at ``D = 10``, 1.6x at 23, 2.0x at ``D = 31`` (1.2-1.3x
without the blocks). The blocks are kept cheap for a posterior's size: one hidden layer, so the
exact log-det is one batched ``D x D`` determinant, and exact spectral norms (one small
symmetric eigenvalue call) instead of power iterations.

Every layer is explicit in the sampling direction, so drawing and scoring its own samples
(ELBO, importance weights, NeuTra-HMC) never solves anything, and every log-determinant
is exact. It is correct straight after training in either module mode: it holds no
data-initialised layer (no ActNorm) and no power-iteration state.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.params.param_store import param_with_module_name

from .flows import posterior_flow
from .transforms.chain import Chain
from .transforms.triangular import TriangularAffine

__all__ = ["AutoResidualFlow"]

#: The Student t base's starting degrees of freedom, and the most it takes (learned too).
BASE_DF, MAX_DF = 10.0, 1000.0

#: The options of the NeuTra-HMC warp (:meth:`AutoResidualFlow.for_neutra`): one affine
#: autoregressive layer and one residual block (the variational default has two of each).
NEUTRA_OPTIONS: Mapping[str, Any] = MappingProxyType({"num_autoregressive": 1, "num_blocks": 1})

#: The NUTS target acceptance rate the NeuTra warp was measured at (Pyro's default: 0.8).
NEUTRA_TARGET_ACCEPT = 0.95


class AutoResidualFlow(AutoContinuous):
    """A residual-flow guide over the model's unconstrained latent vector.

    Use it as Pyro's ``AutoIAFNormal``: with ``SVI`` and any ELBO, ``Predictive``,
    ``Importance``, and as the trained guide of ``NeuTraReparam``
    (:meth:`get_transform` maps the standard normal base to the latents).

    Build each guide after ``pyro.clear_param_store()`` (a second guide of the same name
    would silently not train, so it raises). Save and restore it with ``state_dict`` /
    ``load_state_dict`` on a guide already called once, or ``torch.save`` the guide: the
    param store's ``save``/``load`` cannot restore the flow. A copy (``copy.deepcopy``, or
    ``torch.load`` in the process that trained the original) trains on its own: whichever
    guide is called holds the param store's entries under their shared names. It has no
    ``median`` or
    ``quantiles`` (not Gaussian): estimate them from draws (``Predictive``). Latent sites
    in a subsampled plate are refused.

    For NeuTra-HMC, train the shallower warp :meth:`for_neutra` builds (one
    autoregressive layer, one block) and run ``NUTS(...,
    target_accept_prob=NEUTRA_TARGET_ACCEPT)`` (0.95): a warp wants to be smooth more
    than it wants every bit of density. Every sampler at 0.95, it gave 24x plain NUTS's
    effective samples per gradient on Neal's funnel (nine seeds used for no earlier
    choice) and on centred eight schools (4.4 and 10.5 per 1,000 gradients;
    ``AutoIAFNormal`` 0.4 and 3.1), and diverged less than plain NUTS on schools (7 times
    over six seeds against 66, fewer on each); on the funnel 34 times against 67, fewer on
    five seeds and more on two: fewer in all, not beyond chance. As a variational
    posterior the default is the better guide on the funnel and non-centred schools
    (k-hat 0.66 against 0.73, 0.42 against 0.63), the shallow one on centred schools and
    logistic regression (0.62 against 0.69, 0.42 against 0.51; ``docs/posteriors.md``).

    Arguments:
        model: a Pyro model.
        num_blocks: residual blocks (0: the ablation without them).
        hidden_dim: each block's hidden units (default ``max(16, 2 D)``).
        num_autoregressive: affine autoregressive layers.
        autoregressive_hidden_dim: their MADE's hidden units (default ``3 D + 1``); 0
            keeps each log-scale linear in the earlier coordinates.
        lipschitz: the bound ``c < 1`` on each block's ``Lip(g)``.
        log_scale_bound: the bound on each autoregressive layer's log-scale.
        init_scale: the starting scale of the affine map (as ``AutoMultivariateNormal``).
        init_loc_fn: where the affine map starts (a Pyro init strategy).
        base: the base distribution: ``"normal"`` (standard normal) or ``"student_t"``
            (a standard Student t per coordinate with its own learned degrees of freedom
            ``nu_i = 1 + exp(theta_i)``). Every part of the flow grows at most linearly,
            ``|f(z)| <= a + b |z|`` (the blocks as ``Lip(g) <= c``, the autoregressive
            layers by their bounded log-scales), so from a Gaussian base the guide's
            tails stay Gaussian (the argument of Jaini et al., *Tails of Lipschitz
            triangular flows*, ICML 2020); a t base lets them be heavier than the
            posterior's, which bounds the importance weights there.
        base_df: the starting degrees of freedom of the ``"student_t"`` base, in
            ``(1, 1000]`` (default 10; learned values are held at most 1000 as well).

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model():
        ...     v = pyro.sample("v", dist.Normal(0.0, 3.0))
        ...     pyro.sample("x", dist.Normal(0.0, (v / 2).exp()).expand([2]).to_event(1))
        >>> pyro.clear_param_store()
        >>> guide = AutoResidualFlow(model)
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
        hidden_dim: int | None = None,
        num_autoregressive: int = 2,
        autoregressive_hidden_dim: int | None = None,
        lipschitz: float = 0.9,
        log_scale_bound: float = 4.0,
        init_scale: float = 0.1,
        init_loc_fn: Callable[[dict], torch.Tensor] = init_to_median,
        base: str = "normal",
        base_df: float | None = None,
    ) -> None:
        # name the option and what came, not float()'s or int()'s message (or a silent
        # truncation of 2.7 hidden units to 2), and refuse a bad init_loc_fn before the
        # first step calls it
        for name, value in [
            ("lipschitz", lipschitz),
            ("log_scale_bound", log_scale_bound),
            ("init_scale", init_scale),
        ]:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {value!r}")
        for name, value in [
            ("hidden_dim", hidden_dim),
            ("autoregressive_hidden_dim", autoregressive_hidden_dim),
        ]:
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Real) or value % 1
            ):
                raise TypeError(f"{name} must be an integer or None, got {value!r}")
        if not callable(init_loc_fn):
            raise TypeError(f"init_loc_fn must be a Pyro init strategy, got {init_loc_fn!r}")
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale}")
        if base not in ("normal", "student_t"):
            raise ValueError(f"base must be 'normal' or 'student_t', got {base!r}")
        if base == "normal" and base_df is not None:
            # a silently ignored option would leave the user believing the tails are set
            raise ValueError(f"base_df applies to base='student_t' only, got base_df={base_df!r}")
        base_df = BASE_DF if base_df is None else base_df
        if isinstance(base_df, bool) or not isinstance(base_df, numbers.Real):
            raise TypeError(f"base_df must be a real number, got {base_df!r}")
        if not (math.isfinite(base_df) and base_df > 1):
            raise ValueError(f"base_df must be a finite number > 1, got {base_df}")
        if base_df > MAX_DF:
            # float32 StudentT.log_prob takes a difference of lgamma(~df/2): past 1e3 it
            # loses its normaliser, silently (0.02 nats per coordinate at 1e5, 0.9 at 1e7)
            raise ValueError(
                f"base_df must be <= {MAX_DF:g} (past that a float32 Student t density is "
                f"not resolved; base='normal' is its Gaussian limit), got {base_df}"
            )
        self._base = base
        self._base_df = float(base_df)
        self._flow_options = {
            "num_blocks": num_blocks,
            "hidden_dim": hidden_dim,
            "num_autoregressive": num_autoregressive,
            "autoregressive_hidden_dim": autoregressive_hidden_dim,
            "lipschitz": float(lipschitz),
            "log_scale_bound": float(log_scale_bound),
            "init_scale": float(init_scale),
        }
        # fail at construction, not at the first SVI step, on options the flow refuses
        posterior_flow(2, **self._flow_options)
        super().__init__(model, init_loc_fn=init_loc_fn)

    @classmethod
    def for_neutra(cls, model: Callable[..., Any], **options: Any) -> AutoResidualFlow:
        """The guide to train as the warp of NeuTra-HMC (Hoffman et al., 2019).

        ``AutoResidualFlow(model, **NEUTRA_OPTIONS)``, any option overridden by
        ``options``. A warp wants to be smooth more than it wants every bit of density, so
        it is shallower than the variational default: one affine autoregressive layer,
        one residual block, the affine map. Run NUTS on it at
        ``target_accept_prob=NEUTRA_TARGET_ACCEPT`` (0.95). Measured with every sampler at
        0.95 (``docs/posteriors.md``): on Neal's funnel, nine seeds used for no earlier
        choice, 4.4 effective samples per 1,000 gradients against plain NUTS's 0.18, with
        34 divergences against 67 (fewer on five seeds, more on two); on centred eight
        schools 10.5 against 0.44, with 7 over six seeds against 66. On the funnel,
        ``for_neutra(model, autoregressive_hidden_dim=0, log_scale_bound=8.0)`` (log-scales
        linear in the earlier coordinates, the funnel's own form, with room for its
        ``e^9``) did better still (17.9, 14 divergences) but worse on schools (57).

        Arguments:
            model: a Pyro model.
            **options: any of the constructor's options, replacing the warp's.

        Example:
            >>> import pyro, pyro.distributions as dist, torch
            >>> from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
            >>> from pyro.infer.reparam import NeuTraReparam
            >>> def model():
            ...     v = pyro.sample("v", dist.Normal(0.0, 3.0))
            ...     pyro.sample("x", dist.Normal(0.0, (v / 2).exp()).expand([2]).to_event(1))
            >>> pyro.clear_param_store()
            >>> guide = AutoResidualFlow.for_neutra(model)
            >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
            >>> for _ in range(5):   # 2000 steps in earnest
            ...     loss = svi.step()
            >>> neutra = NeuTraReparam(guide.requires_grad_(False))
            >>> warped = pyro.poutine.reparam(model, config=lambda msg: neutra)
            >>> kernel = NUTS(warped, target_accept_prob=NEUTRA_TARGET_ACCEPT)
            >>> mcmc = MCMC(kernel, num_samples=5, warmup_steps=5, disable_progbar=True)
            >>> mcmc.run()
            >>> [type(p).__name__ for p in guide.get_transform().parts]
            ['AffineAutoregressive', 'DenseResidual', 'TriangularAffine']
        """
        return cls(model, **{**NEUTRA_OPTIONS, **options})

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        for name, stack in self._cond_indep_stacks.items():
            for frame in stack:
                if frame.full_size is not None and frame.full_size != frame.size:
                    # one latent vector of the subsample's size would stand for different
                    # data points at every step: a silently wrong posterior
                    raise NotImplementedError(
                        f"{type(self).__name__} cannot fit the local latent site {name!r} "
                        f"in the subsampled plate {frame.name!r} (size {frame.size} of "
                        f"{frame.full_size}): subsample only plates without latent sites, "
                        "or use AutoNormal for the local sites (AutoGuideList)"
                    )
        stale = param_with_module_name(self._pyro_get_fullname("transform"), "")
        if any(key.startswith(stale) for key in pyro.get_param_store().keys()):
            # pyro.module would hand the optimizer the stored tensors, not this flow's:
            # the guide would neither train nor restore, silently
            raise RuntimeError(
                f"the param store already holds parameters named {stale!r}... from another "
                f"{type(self).__name__}; this guide would silently never train. Call "
                "pyro.clear_param_store() before building a new guide (to restore a saved "
                "guide, call it once, then load_state_dict)"
            )
        loc = self._init_loc()
        if not torch.isfinite(loc).all():
            bad = [
                site["name"]
                for site, value in self._unpack_latent(loc)
                if not torch.isfinite(value).all()
            ]
            raise ValueError(
                f"{type(self).__name__}: the initial point (init_loc_fn) is not finite in "
                f"the unconstrained space at sites {bad} (a value on the boundary of its "
                "support, e.g. 0 for a positive site, maps to -inf); start inside the support"
            )
        flow = posterior_flow(self.latent_dim, **self._flow_options)
        flow = flow.to(device=loc.device, dtype=loc.dtype)
        affine = flow.parts[-1]
        if not isinstance(affine, TriangularAffine):  # posterior_flow's contract
            raise TypeError(f"posterior_flow must end with TriangularAffine, got {affine!r}")
        affine.set_loc(loc)
        self.transform: Chain = flow
        if self._base == "student_t":
            # df = 1 + exp(.) per coordinate: any tail from Cauchy's to the Gaussian's
            self.base_log_df = torch.nn.Parameter(
                loc.new_full((self.latent_dim,), math.log(self._base_df - 1))
            )

    def get_base_dist(self) -> dist.Distribution:
        """The base over the latent vector (on the guide's device): standard normal, or a
        standard Student t per coordinate with its learned degrees of freedom."""
        # through _modules, not the attribute: PyroModule's attribute access registers every
        # flow parameter with the param store again (pyro.module), ~4% of a 31-D step;
        # get_posterior's access already does that once per step
        ref = self._modules["transform"].parts[-1].loc
        if self._base == "student_t":
            # learned past MAX_DF the float32 density would lose its normaliser: held there
            # (the Gaussian limit, to 0.1%), with no gradient pushing further
            df = (1 + self.base_log_df.exp()).clamp(max=MAX_DF)
            return dist.StudentT(df, ref.new_zeros(()), 1.0).to_event(1)
        return dist.Normal(ref.new_zeros(()), 1.0).expand([self.latent_dim]).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any) -> Chain:
        """The flow from the base to the unconstrained latents (``NeuTraReparam`` uses it)."""
        return self.transform

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # Pyro's median() and quantiles() need a Gaussian (loc, scale): say so, not a bare error
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form median or quantiles (its posterior is "
            "not Gaussian): estimate them from draws, e.g. Predictive(model, guide=guide, "
            "num_samples=...)() or guide.get_posterior().sample(...)"
        )

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TransformedDistribution:
        """The flow's distribution over the unconstrained latent vector."""
        self._claim_param_store()
        return dist.TransformedDistribution(self.get_base_dist(), [self.transform])

    def _claim_param_store(self) -> None:
        """Make the param store's entries under this guide's names this guide's tensors.

        A copy of a trained guide (``copy.deepcopy``, or ``torch.load`` in the process that
        trained the original) has the original's names: ``pyro.param`` would hand SVI the
        original's stored tensors while the copy computes with its own, so the copy would
        silently never train. The guide being called is the one SVI should train: its
        tensors replace the stored ones (the original's, if called again, claim theirs
        back). Done before this step's parameters are recorded in the trace.
        """
        store = pyro.get_param_store()
        prefix = self._pyro_get_fullname("transform")
        owned = [
            (param_with_module_name(prefix, name), value)
            for name, value in self._modules["transform"].named_parameters()
        ]
        if self._base == "student_t":
            owned.append((self._pyro_get_fullname("base_log_df"), self._parameters["base_log_df"]))
        for key, value in owned:
            if key in store._params and store._params[key] is not value:
                store._params[key] = value
                store._param_to_name[value] = key
