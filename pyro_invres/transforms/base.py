"""What every block in :mod:`pyro_invres.transforms` shares.

:class:`InvertibleModule` is a Pyro :class:`~pyro.distributions.TransformModule` over a
fixed event shape that adds three things to Pyro's contract:

* **Validation at the boundary**: a wrong event shape, a dtype or device that differs
  from the parameters', and (while Pyro's validation is on) non-finite values raise a
  ``ValueError`` that names what was expected and what came.
* **A cache that cannot go stale.** Pyro's identity cache (``cache_size=1``) returns the
  pair computed for the same tensor object, even after an optimizer step changed the
  parameters, and then back-propagates through a freed graph (Pyro issue #2292). Here a
  cached pair also remembers the parameters' versions and whether grad mode was on; it is
  reused only while both still hold, so sampling-then-scoring skips the inverse while
  full-batch training on one data tensor just works.
* **A memo for the log-determinant**, computed at most once per cached pair.

Subclasses implement ``_call``, ``_inverse`` and ``_log_abs_det_jacobian`` and may store
a value with :meth:`_remember_ladj` while computing the map.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import pyro.distributions as pdist
import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import constraints

__all__ = ["InvertibleModule", "as_event_shape"]


def as_event_shape(input_dim: int | Sequence[int]) -> tuple[int, ...]:
    """Normalise ``input_dim`` (an int or a shape such as ``(C, H, W)``) to a shape tuple.

    Example:
        >>> as_event_shape(3), as_event_shape([1, 28, 28])
        ((3,), (1, 28, 28))
        >>> as_event_shape(0)
        Traceback (most recent call last):
        ...
        ValueError: input_dim must be a positive int or shape, got 0
    """
    shape = (int(input_dim),) if isinstance(input_dim, int) else tuple(int(d) for d in input_dim)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_dim must be a positive int or shape, got {input_dim!r}")
    return shape


class InvertibleModule(TransformModule):
    """Base class: a bijection of ``R^event_shape`` with validation and a safe cache.

    Arguments:
        event_shape: the shape of one event, ``(D,)`` or ``(C, H, W)``; ``-1`` accepts any
            size in that position (``ActNorm`` over images of any size).
        cache_size: 0 or 1, as in Pyro.
        output_shape: the event shape of the output when it differs (space-to-depth),
            same rank as ``event_shape``.

    Example:
        A subclass implements the map, its inverse and the log-det:

        >>> import math, torch
        >>> class Double(InvertibleModule):
        ...     def _call(self, x):
        ...         return 2 * x
        ...     def _inverse(self, y):
        ...         return y / 2
        ...     def _log_abs_det_jacobian(self, x, y, memo):
        ...         return x.new_full(x.shape[:-1], self.event_shape[0] * math.log(2))
        >>> t = Double((3,))
        >>> x = torch.ones(4, 3)
        >>> y = t(x)
        >>> t.inv(y) is x   # the cached pair: no inverse computed
        True
        >>> torch.allclose(t.log_abs_det_jacobian(x, y), torch.full((4,), math.log(8)))
        True
        >>> t(torch.ones(4, 2))
        Traceback (most recent call last):
        ...
        ValueError: Double: expected input with event shape (3,) (trailing dims), got shape (4, 2)
    """

    bijective = True

    def __init__(
        self,
        event_shape: Sequence[int],
        cache_size: int = 1,
        output_shape: Sequence[int] | None = None,
    ) -> None:
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size}")
        super().__init__(cache_size=cache_size)
        shape = tuple(int(d) for d in event_shape)
        out = shape if output_shape is None else tuple(int(d) for d in output_shape)
        for s in (shape, out):
            if not s or any(d < 1 and d != -1 for d in s):
                raise ValueError(f"event shapes must hold positive sizes (or -1: any), got {s}")
        if len(out) != len(shape):
            raise ValueError(f"input and output event shapes differ in rank: {shape} vs {out}")
        self.event_shape = shape
        self.output_shape = out
        self._cache_key: tuple | None = None
        self._checksum: Tensor | None = None
        self._ladj_memo: tuple | None = None

    # -- Pyro's contract -------------------------------------------------------------
    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    @constraints.dependent_property(is_discrete=False)
    def domain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, self.event_dim)

    @constraints.dependent_property(is_discrete=False)
    def codomain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, self.event_dim)

    def with_cache(self, cache_size: int = 1) -> InvertibleModule:
        """Return this block if ``cache_size`` is its own; raise ``ValueError`` otherwise."""
        if cache_size == self._cache_size:
            return self
        raise ValueError(
            f"{type(self).__name__} keeps cache_size={self._cache_size}; build a new block "
            "to change it (a copy would not share the parameters' training state)"
        )

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        self._check_shape(shape, "input")
        return self._swap_event(shape, self.output_shape)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        self._check_shape(shape, "input of the inverse", self.output_shape)
        return self._swap_event(shape, self.event_shape)

    def _swap_event(self, shape: Sequence[int], event: tuple[int, ...]) -> torch.Size:
        n = self.event_dim
        tail = [d if e == -1 else e for e, d in zip(event, shape[len(shape) - n :])]
        return torch.Size([*shape[: len(shape) - n], *tail])

    # -- validation ---------------------------------------------------------------------
    def _check_shape(
        self, shape: Sequence[int], name: str, expected: tuple[int, ...] | None = None
    ) -> None:
        expected = self.event_shape if expected is None else expected
        n = self.event_dim
        trailing = tuple(shape[len(shape) - n :]) if len(shape) >= n else ()
        if len(trailing) != n or any(e not in (-1, d) for e, d in zip(expected, trailing)):
            raise ValueError(
                f"{type(self).__name__}: expected {name} with event shape {expected} "
                f"(trailing dims), got shape {tuple(shape)}"
            )

    def _reference_tensors(self) -> tuple[Tensor | None, Tensor | None]:
        """A floating tensor for the dtype check and any tensor for the device check."""
        floating = next((p for p in self.parameters()), None)
        if floating is None:
            floating = next((b for b in self.buffers() if b.is_floating_point()), None)
        anything = floating if floating is not None else next(self.buffers(), None)
        return floating, anything

    def _validate(self, x: Tensor, name: str, expected: tuple[int, ...] | None = None) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: {name} must be a Tensor, got {type(x)}")
        self._check_shape(x.shape, name, expected)
        floating, anything = self._reference_tensors()
        if floating is not None and x.dtype != floating.dtype:
            raise ValueError(
                f"{type(self).__name__}: {name} has dtype {x.dtype} but the parameters "
                f"are {floating.dtype}; call .to({x.dtype}) on the flow or convert the input"
            )
        if anything is not None and x.device != anything.device:
            raise ValueError(
                f"{type(self).__name__}: {name} is on {x.device} but the parameters are "
                f"on {anything.device}; move the flow with .to(device)"
            )
        # a device sync, so only while the user has asked Pyro to validate
        if pdist.is_validation_enabled() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{type(self).__name__}: {name} has non-finite values (nan or inf)")

    # -- the cache ------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        # walking the module tree on every call is measurable on small blocks; the list
        # is rebuilt after .to()/.double() (see _apply) and whenever it was dropped
        params = self.__dict__.get("_param_list")
        if params is None:
            params = list(self.parameters())
            self.__dict__["_param_list"] = params
        return params

    def __getstate__(self) -> dict:
        # the cache and memo hold graph-carrying tensors: not part of a copy or a pickle
        state = super().__getstate__()
        state = dict(state)
        state.update(
            _cached_x_y=(None, None),
            _cache_key=None,
            _checksum=None,
            _ladj_memo=None,
            _pending_memo=None,
            _param_list=None,
        )
        return state

    def _apply(self, *args: object, **kwargs: object) -> InvertibleModule:
        self.__dict__["_param_list"] = None
        return super()._apply(*args, **kwargs)

    def _state_key(self) -> tuple:
        # what makes a cached pair stale: new parameter values, a different grad mode
        # (a graph-less pair cannot serve a backward), a train/eval switch (evaluation
        # may refine the spectral norms)
        versions = tuple((p.data_ptr(), p._version) for p in self._params())
        return versions, torch.is_grad_enabled(), self.training

    def _param_checksum(self) -> Tensor | None:
        params = self._params()
        if not params:
            return None
        with torch.no_grad():
            return torch.stack(
                [torch.linalg.vector_norm(p) for p in params] + [p.sum() for p in params]
            )

    def _pair_is_current(self) -> bool:
        if self._cache_key != self._state_key():
            return False
        if self._checksum is None:
            return True
        # values too: writes through ``p.data`` (Pyro's ClippedAdam) keep the versions
        current = self._param_checksum()
        return current is not None and torch.equal(current, self._checksum)

    def _cache_hit(self, x: Tensor | None, y: Tensor | None) -> bool:
        x_old, y_old = self._cached_x_y
        same = (x is not None and x is x_old) or (y is not None and y is y_old)
        return same and self._pair_is_current()

    def _store(self, x: Tensor, y: Tensor) -> None:
        self._cached_x_y = x, y
        self._cache_key = self._state_key()
        self._checksum = self._param_checksum()
        self._promote_memo(x, y)

    def __call__(self, x: Tensor) -> Tensor:
        if self._cache_size == 0:
            self._validate(x, "input")
            return self._call(x)
        if self._cache_hit(x, None):
            return self._cached_x_y[1]
        self._validate(x, "input")
        self._ladj_memo = None
        self._pending_memo = None  # only what this very call remembers may be promoted
        y = self._call(x)
        self._store(x, y)
        return y

    def _inv_call(self, y: Tensor) -> Tensor:
        if self._cache_size == 0:
            self._validate(y, "input of the inverse", self.output_shape)
            return self._inverse(y)
        if self._cache_hit(None, y):
            return self._cached_x_y[0]
        self._validate(y, "input of the inverse", self.output_shape)
        self._ladj_memo = None
        self._pending_memo = None
        x = self._inverse(y)
        self._store(x, y)
        return x

    # -- the log-det memo -------------------------------------------------------------------
    def _remember_ladj(self, value: object) -> None:
        """Called by ``_call``/``_inverse`` with what the log-det needs (or the log-det)."""
        self._pending_memo = value

    def _promote_memo(self, x: Tensor, y: Tensor) -> None:
        value = getattr(self, "_pending_memo", None)
        self._pending_memo = None
        self._ladj_memo = (x, y, None, value) if value is not None else None

    def _memo_for(self, x: Tensor, y: Tensor) -> object:
        memo = self._ladj_memo
        if memo is not None and memo[0] is x and memo[1] is y and self._pair_is_current():
            return memo[3]
        return None

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """``log |det dy/dx|`` of the forward map, shaped like the batch.

        Computed at most once for the cached pair: a second call returns the same tensor.
        """
        memo = self._memo_for(x, y)
        if isinstance(memo, Tensor):
            return memo
        x_old, y_old = getattr(self, "_cached_x_y", (None, None))
        if not (x is x_old and y is y_old):
            # a pair this block did not just compute: check it like any input
            self._validate(x, "input of log_abs_det_jacobian")
            self._validate(y, "output given to log_abs_det_jacobian", self.output_shape)
        value = self._log_abs_det_jacobian(x, y, memo)
        if memo is not None:
            # keep the number, drop whatever graph-building state produced it
            self._ladj_memo = (*self._ladj_memo[:3], value)  # type: ignore[misc]
        return value

    @abstractmethod
    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor, memo: object) -> Tensor:
        """The log-det for the pair; ``memo`` is what ``_remember_ladj`` stored, or None."""

    def __repr__(self) -> str:
        return torch.nn.Module.__repr__(self)
