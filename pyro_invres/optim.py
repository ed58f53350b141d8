"""One torch optimizer for all of a flow's parameters, usable by Pyro's ``SVI``.

Pyro's :class:`pyro.optim.PyroOptim` builds one torch optimizer (and one scheduler) *per
parameter tensor*, so that parameters can appear at any step. A flow's parameters are known
up front, and with dozens of small tensors the per-tensor Python overhead (an optimizer
step, a clip and a scheduler each) costs about a third of a 2-D training step.
:class:`JointOptim` keeps Pyro's interface and semantics (``SVI`` accepts it, per-tensor
gradient-norm clipping as ``clip_args={"clip_norm": c}`` does, state keyed by parameter
name for checkpoints) with a single ``foreach`` optimizer, one vectorised clip and one
learning-rate scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyro
import torch
from pyro.optim import PyroOptim
from torch import Tensor

__all__ = ["JointOptim", "joint_adam"]

_FORMAT = "pyro_invres.joint_optim/1"


class JointOptim(PyroOptim):
    """A :class:`~pyro.optim.PyroOptim` with one torch optimizer over every parameter.

    Each call clips every gradient tensor to norm at most ``clip_norm`` on its own (as
    Pyro's ``clip_args={"clip_norm": clip_norm}``), then takes one step of one optimizer
    holding the tensors of the first call in one parameter group (sorted by param-store
    name); tensors first seen later join as a new group at the current learning rate.
    :meth:`step` advances the optional learning-rate scheduler, as
    :meth:`pyro.optim.PyroLRScheduler.step` does.

    The state (:meth:`get_state`) maps each parameter name to its optimizer state, so a
    checkpoint does not depend on the order of tensors; :meth:`set_state` also reads the
    per-parameter state that :class:`pyro.optim.PyroLRScheduler` writes, so a checkpoint
    saved with Pyro's optimizer resumes here.

    Arguments:
        optim_constructor: a :class:`torch.optim.Optimizer` class.
        optim_args: its keyword arguments (``lr``, ...).
        clip_norm: the largest gradient norm of each tensor (``None``: no clipping).
        scheduler_constructor: a :mod:`torch.optim.lr_scheduler` class, or ``None``.
        scheduler_args: its keyword arguments (``gamma``, ...).

    Example:
        >>> import torch, pyro
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> optim = JointOptim(torch.optim.Adam, {"lr": 0.1}, clip_norm=10.0,
        ...                    scheduler_constructor=torch.optim.lr_scheduler.ExponentialLR,
        ...                    scheduler_args={"gamma": 0.99})
        >>> def model():
        ...     loc = pyro.param("loc", torch.zeros(2))
        ...     pyro.sample("x", pyro.distributions.Normal(loc, 1.0).to_event(1),
        ...                 obs=torch.ones(2))
        >>> svi = SVI(model, lambda: None, optim, Trace_ELBO())
        >>> with pyro.get_param_store().scope():
        ...     for _ in range(50):
        ...         _ = svi.step()
        ...         optim.step()
        ...     bool((pyro.param("loc") - 1).abs().max() < 0.1)
        True
    """

    def __init__(
        self,
        optim_constructor: Callable[..., torch.optim.Optimizer],
        optim_args: Mapping[str, Any],
        clip_norm: float | None = None,
        scheduler_constructor: Callable[..., Any] | None = None,
        scheduler_args: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(optim_constructor, dict(optim_args))
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm}")
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.scheduler_constructor = scheduler_constructor
        self.scheduler_args = dict(scheduler_args or {})
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self._params: list[Tensor] = []
        self._names: list[str] = []
        self._known: set[Tensor] = set()
        self._pending: dict[str, Any] | None = None

    # -- SVI's interface ----------------------------------------------------------------------
    def __call__(self, params: Iterable[Tensor], *args: Any, **kwargs: Any) -> None:
        new = [p for p in params if p not in self._known]
        if new:
            self._add(new)
        live = [p for p in self._params if p.grad is not None]
        if self.clip_norm is not None and live:
            grads = [p.grad for p in live]
            norms = torch._foreach_norm(grads)
            # the coefficient of torch.nn.utils.clip_grad_norm_, applied per tensor
            coefs = [torch.clamp(self.clip_norm / (n + 1e-6), max=1.0) for n in norms]
            torch._foreach_mul_(grads, coefs)
        assert self.optimizer is not None
        self.optimizer.step(*args, **kwargs)

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Advance the learning-rate scheduler (if any) by one step."""
        if self.scheduler is not None:
            self.scheduler.step(*args, **kwargs)

    # -- state ----------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """The optimizer and scheduler state, each tensor's entry keyed by its name."""
        if self.optimizer is None:
            return dict(self._pending) if self._pending is not None else {"format": _FORMAT}
        full = self.optimizer.state_dict()
        tensors = {name: full["state"].get(i, {}) for i, name in enumerate(self._names)}
        groups = [_group_options(group) for group in full["param_groups"]]
        scheduler = None if self.scheduler is None else self.scheduler.state_dict()
        return {"format": _FORMAT, "params": tensors, "groups": groups, "scheduler": scheduler}

    def set_state(self, state_dict: Mapping[str, Any]) -> None:
        """Load :meth:`get_state`'s output (or :class:`pyro.optim.PyroOptim`'s)."""
        state = dict(state_dict)
        if state.get("format") != _FORMAT:
            state = _from_pyro_state(state)
        if self.optimizer is None:
            self._pending = state
            return
        self._load(state)

    # -- internals ------------------------------------------------------------------------------
    def _add(self, new: list[Tensor]) -> None:
        store = pyro.get_param_store()
        named = sorted(((store.param_name(p), p) for p in new), key=lambda item: item[0])
        args = self._get_optim_args(new[0])
        tensors = [p for _, p in named]
        if self.optimizer is None:
            # one group: foreach kernels work group by group
            try:
                self.optimizer = self.pt_optim_constructor(tensors, **args, foreach=True)
            except TypeError:  # an optimizer without a foreach option
                self.optimizer = self.pt_optim_constructor(tensors, **args)
            if self.scheduler_constructor is not None:
                self.scheduler = self.scheduler_constructor(self.optimizer, **self.scheduler_args)
        else:
            first = self.optimizer.param_groups[0]
            extra = {k: first[k] for k in ("lr", "initial_lr") if k in first}
            self.optimizer.add_param_group({"params": tensors, **extra})
        for name, p in named:
            self._params.append(p)
            self._names.append(name)
            self._known.add(p)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._load(pending)

    def _load(self, state: Mapping[str, Any]) -> None:
        assert self.optimizer is not None
        saved = state.get("params", {})
        current = self.optimizer.state_dict()
        for i, name in enumerate(self._names):
            if name in saved:
                current["state"][i] = saved[name]
        # group options (the learning rate, ...): the saved first group's apply to all
        for group in current["param_groups"]:
            group.update(state.get("groups", [{}])[0])
        self.optimizer.load_state_dict(current)
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])


def _group_options(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _from_pyro_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Translate ``{name: optimizer state}`` (PyroOptim / PyroLRScheduler) to ours."""
    per_param: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    scheduler = None
    for name, entry in state.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"unrecognised optimizer state for {name!r}")
        if "optimizer" in entry:  # a PyroLRScheduler entry: optimizer + scheduler
            scheduler = entry.get("scheduler", scheduler)
            entry = entry["optimizer"]
        tensors = entry.get("state", {})
        per_param[name] = next(iter(tensors.values()), {}) if tensors else {}
        groups = groups or [_group_options(entry["param_groups"][0])]
    return {"format": _FORMAT, "params": per_param, "groups": groups, "scheduler": scheduler}


def joint_adam(
    lr: float, *, clip_norm: float | None = 10.0, gamma: float | None = None, **adam_args: Any
) -> JointOptim:
    """:class:`JointOptim` over :class:`torch.optim.Adam`, with an optional exponential decay.

    Arguments:
        lr: the initial learning rate.
        clip_norm: the largest gradient norm of each parameter tensor (``None``: no clip).
        gamma: multiply the learning rate by this at each :meth:`JointOptim.step`
            (``None``: constant).
        **adam_args: other :class:`torch.optim.Adam` options (``betas``, ...).

    Example:
        >>> optim = joint_adam(1e-2, gamma=0.999)
        >>> optim.clip_norm
        10.0
    """
    scheduler = None if gamma is None else torch.optim.lr_scheduler.ExponentialLR
    return JointOptim(
        torch.optim.Adam,
        {"lr": float(lr), **adam_args},
        clip_norm=clip_norm,
        scheduler_constructor=scheduler,
        scheduler_args=None if gamma is None else {"gamma": float(gamma)},
    )
