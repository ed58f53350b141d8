"""Activation normalisation: a per-channel affine map initialised from data (Glow).

.. math::

    y = x \\odot e^{s} + b, \\qquad \\log|\\det J| = N_{\\text{pos}} \\sum_c s_c ,

with one ``(s_c, b_c)`` per channel (per coordinate for vectors) and ``N_pos`` the number
of spatial positions (1 for vectors).

Initialisation happens once and is never redone: a trained layer is never overwritten by a
later call, in any mode. The layer counts as initialised (its ``initialized`` buffer set)
from the first of these on:

* the first training-mode call on a batch of at least two samples: ``s, b`` are set so
  that the data side is standardised (the output of ``_call`` when the forward direction
  sees data first, as in a guide; the output of ``_inverse`` when the inverse does, as in
  density estimation);
* the first training-mode call on a batch of one with grad enabled (an autoguide draws one
  latent per SVI step): one sample has no spread, so the layer keeps its identity
  initialisation and trains from there; a later batched call such as
  ``guide.get_posterior().sample((500,))`` does not touch it;
* its parameters have left their initial zeros (trained in evaluation mode, set by hand,
  or loaded with :meth:`~torch.nn.Module.load_state_dict`);
* an explicit :meth:`ActNorm.initialize_from`, or :func:`initialize_actnorm` for every
  ActNorm of a flow, which :func:`~pyro_invres.train.fit_density` calls before training.

Evaluation-mode calls never initialise, and neither does a batch of one under
``torch.no_grad()``. Under ``torch.distributed`` the statistics are all-reduced so every
rank initialises alike.

References:
    [1] Kingma & Dhariwal, *Glow: Generative Flow with Invertible 1x1 Convolutions*,
        NeurIPS 2018. arXiv:1807.03039
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyro.distributions as pdist
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from .base import InvertibleModule

__all__ = ["ActNorm", "actnorm", "initialize_actnorm"]


class ActNorm(InvertibleModule):
    """Per-channel scale and shift with data-dependent initialisation.

    Arguments:
        num_features: channels ``C`` (or the dimension ``D`` of vectors).
        event_dim: 1 for vectors ``(D,)``, 3 for images ``(C, H, W)`` of any size.
        eps: floor on the standard deviation used at initialisation.
        cache_size: 0 or 1.

    Cost and cache: closed-form both ways, one multiply-add; nothing to iterate.

    Example:
        >>> import torch
        >>> norm = ActNorm(3)
        >>> y = norm(5.0 + 2.0 * torch.randn(100, 3))   # initialises on this batch
        >>> std = y.std(0, correction=0)
        >>> bool(y.mean(0).abs().max() < 1e-5), bool((std - 1).abs().max() < 1e-4)
        (True, True)
    """

    sign = 1

    def __init__(
        self, num_features: int, event_dim: int = 1, eps: float = 1e-6, cache_size: int = 1
    ) -> None:
        if event_dim not in (1, 2, 3):
            raise ValueError(f"event_dim must be 1 (vectors), 2 or 3 (images), got {event_dim}")
        if int(num_features) < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        super().__init__((int(num_features),) + (-1,) * (event_dim - 1), cache_size=cache_size)
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.log_scale = nn.Parameter(torch.zeros(self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_features))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _shaped(self, p: Tensor) -> Tensor:
        return p.view(self.num_features, *([1] * (self.event_dim - 1)))

    @property
    def is_initialized(self) -> bool:
        """Whether the layer is initialised (a device sync on the GPU)."""
        return bool(self.initialized)

    def _moved_from_init(self) -> bool:
        # the identity init is exactly zero; any other value was put there on purpose
        with torch.no_grad():
            return bool(self.log_scale.ne(0).any() | self.bias.ne(0).any())

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # a checkpoint saved before the flag was set (a guide trained on batches of one by
        # an older version) still carries trained values: they must never be overwritten
        if any(t.is_meta for t in (self.initialized, self.log_scale, self.bias)):
            return  # no values to look at yet (a module built on the meta device)
        if not bool(self.initialized) and self._moved_from_init():
            self.initialized.fill_(True)

    def _initialize(self, data: Tensor, data_is_output: bool) -> None:
        """The first-call rule (see the module docstring)."""
        # not under no_grad: whether this call can reach an optimiser is the caller's mode
        forced = self.__dict__.get("_forced", False)  # set by initialize_actnorm
        if not (self.training or forced) or bool(self.initialized):
            return
        if forced:
            if not self._set_from(data, data_is_output, lock_on_one=False):
                raise ValueError(
                    "initialize_actnorm needs a batch of at least two samples; an ActNorm "
                    f"got shape {tuple(data.shape)}"
                )
            return
        if self._moved_from_init():
            self.initialized.fill_(True)  # a buffer: no graph, whatever the mode
            return
        # a call on one sample that can reach an optimiser: the identity is what trains
        lock_on_one = torch.is_grad_enabled() and (
            self.log_scale.requires_grad or self.bias.requires_grad
        )
        self._set_from(data, data_is_output, lock_on_one=lock_on_one)

    @torch.no_grad()
    def _set_from(self, data: Tensor, data_is_output: bool, lock_on_one: bool) -> bool:
        """Standardise the data side on ``data``; False (nothing set) for a batch of one."""
        n_batch = data.dim() - self.event_dim
        # channels first, everything else pooled; statistics in float64 (x * x overflows
        # float32 above 1.8e19) and in two passes (E[x^2] - E[x]^2 cancels for data far
        # from zero: float32 data at 1e4 +- 1 gave a standard deviation of 0)
        acc = torch.float64 if data.device.type != "mps" else torch.float32
        flat = data.movedim(n_batch, 0).reshape(self.num_features, -1).to(acc)
        total = flat.sum(1)
        samples = torch.tensor(
            [float(math.prod(data.shape[:n_batch])), float(flat.shape[1])],
            dtype=acc,
            device=data.device,
        )
        distributed = torch_dist.is_available() and torch_dist.is_initialized()
        if distributed:
            # every rank joins the collectives and the decision is taken on the pooled
            # counts, so a rank with a batch of one cannot desynchronise the others
            torch_dist.all_reduce(total)
            torch_dist.all_reduce(samples)
        if samples[0] < 2:
            if lock_on_one:
                self.initialized.fill_(True)
            return False
        if torch.jit.is_tracing():
            raise RuntimeError(
                "ActNorm: initialise it (one training-mode call on a batch of at least two) "
                "before tracing; a trace would freeze the initialisation branch"
            )
        count = samples[1]
        mean = total / count
        spread = (flat - mean[:, None]).square().sum(1)
        if distributed:
            torch_dist.all_reduce(spread)
        std = (spread / count).sqrt().clamp_min(self.eps)
        finite = torch.isfinite(mean).all() & torch.isfinite(std).all()
        if pdist.is_validation_enabled() and not bool(finite):
            raise ValueError(
                "ActNorm: cannot initialise from data this large "
                f"(max |x| = {data.abs().max().item():.3g}); rescale the data"
            )
        mean, std = mean.to(self.bias.dtype), std.to(self.bias.dtype)
        if data_is_output:
            # data arrives at _inverse: x = (y - b) e^{-s} standardised
            self.log_scale.copy_(std.log())
            self.bias.copy_(mean)
        else:
            # data arrives at _call: y = x e^{s} + b standardised
            self.log_scale.copy_(-std.log())
            self.bias.copy_(-mean / std)
        self.initialized.fill_(True)
        return True

    def initialize_from(self, data: Tensor, side: str = "output", force: bool = False) -> ActNorm:
        """Initialise from ``data`` now, in any mode, so that the data side is standardised.

        Arguments:
            data: a batch of at least two samples ``(*batch, *event)`` (pooled over the
                ranks under ``torch.distributed``).
            side: ``"output"`` when the data are this layer's outputs (density estimation:
                ``_inverse`` standardises them), ``"input"`` when they are its inputs.
            force: re-initialise a layer that is already initialised (or whose parameters
                have left their initial zeros); without it that is an error, since it would
                throw away what was trained.

        Returns:
            This layer.

        Raises:
            ValueError: for a wrong ``side``, a batch of one, or data of the wrong shape,
                dtype or device.
            RuntimeError: when the layer is initialised already and ``force`` is False.

        Example:
            >>> norm = ActNorm(2).initialize_from(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
            >>> norm.is_initialized, norm.bias.tolist(), norm.log_scale.exp().tolist()
            (True, [2.0, 20.0], [1.0, 10.0])
            >>> norm.initialize_from(torch.randn(8, 2))  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            RuntimeError: ActNorm is initialised already ...
        """
        if side not in ("output", "input"):
            raise ValueError(f"side must be 'output' or 'input', got {side!r}")
        expected = self.output_shape if side == "output" else self.event_shape
        self._validate(data, f"data ({side} side)", expected)
        if not force and (self.is_initialized or self._moved_from_init()):
            raise RuntimeError(
                "ActNorm is initialised already (or its parameters were trained); "
                "pass force=True to overwrite log_scale and bias from this data"
            )
        if not self._set_from(data, data_is_output=side == "output", lock_on_one=False):
            raise ValueError(
                "ActNorm.initialize_from needs a batch of at least two samples, got data of "
                f"shape {tuple(data.shape)} for event shape {expected}"
            )
        return self

    def _call(self, x: Tensor) -> Tensor:
        self._initialize(x, data_is_output=False)
        return x * self._shaped(self.log_scale).exp() + self._shaped(self.bias)

    def _inverse(self, y: Tensor) -> Tensor:
        self._initialize(y, data_is_output=True)
        return (y - self._shaped(self.bias)) * self._shaped(-self.log_scale).exp()

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        n_batch = x.dim() - self.event_dim
        positions = math.prod(x.shape[n_batch + 1 :])
        value = self.log_scale.sum() * positions
        return value.expand(x.shape[:n_batch])

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, event_dim={self.event_dim}"


def actnorm(input_dim: int | Sequence[int]) -> ActNorm:
    """Build an :class:`ActNorm` for vectors (``input_dim`` an int) or images ``(C, H, W)``.

    Example:
        >>> actnorm((3, 8, 8)).event_dim
        3
    """
    if isinstance(input_dim, int):
        return ActNorm(input_dim, event_dim=1)
    shape = tuple(input_dim)
    return ActNorm(shape[0], event_dim=len(shape))


def initialize_actnorm(flow: nn.Module, data: Tensor, side: str = "output") -> int:
    """Initialise every ActNorm of ``flow`` that is not yet initialised, from a data batch.

    ``data`` is pushed through the flow once under ``torch.no_grad()``, in whatever mode
    the flow is in, and each ActNorm standardises what reaches it there. Layers already
    initialised, or whose parameters were trained, are left exactly as they are, so this is
    safe on a resumed run. Call it before training a density rather than relying on the
    first training step (Pyro's plate-nesting probe, or a first batch of one, would lock
    the layers at the identity).

    Arguments:
        flow: a transform module holding ActNorm layers (a ``ComposeTransformModule``).
        data: at least two samples. ``side="output"`` (density estimation: the data are
            samples of ``TransformedDistribution(base, flow)``) pushes them through
            ``flow.inv``; ``side="input"`` through ``flow`` itself.
        side: ``"output"`` or ``"input"``.

    Returns:
        How many ActNorm layers were initialised from ``data``.

    Raises:
        ValueError: for a wrong ``side`` or a batch of one.
        RuntimeError: when the pass did not reach an ActNorm of ``flow``.

    Example:
        >>> from pyro_invres import residual_flow
        >>> flow = residual_flow(2, num_blocks=2, hidden_dims=[8], explicit="inverse")
        >>> data = 3.0 + 2.0 * torch.randn(500, 2)
        >>> initialize_actnorm(flow, data), initialize_actnorm(flow, data)   # once only
        (2, 0)
        >>> x = flow[-1].inv(data)  # the last layer sees the data: standardised
        >>> std = x.std(0, correction=0)
        >>> bool(x.mean(0).abs().max() < 1e-5), bool((std - 1).abs().max() < 1e-4)
        (True, True)
    """
    if side not in ("output", "input"):
        raise ValueError(f"side must be 'output' or 'input', got {side!r}")
    pending = []
    for module in flow.modules():
        if not isinstance(module, ActNorm) or module.is_initialized:
            continue
        if module._moved_from_init():
            module.initialized.fill_(True)  # trained: keep it
        else:
            pending.append(module)
    if not pending:
        return 0
    for module in pending:
        module.__dict__["_forced"] = True
    try:
        with torch.no_grad():
            flow.inv(data) if side == "output" else flow(data)  # type: ignore[operator,union-attr]
    finally:
        for module in pending:
            module.__dict__.pop("_forced", None)
    missed = sum(not module.is_initialized for module in pending)
    if missed:
        raise RuntimeError(
            f"initialize_actnorm: {missed} of {len(pending)} ActNorm layers were not reached "
            "by the data pass (a conditional or branching flow?); call "
            "ActNorm.initialize_from on them"
        )
    return len(pending)
