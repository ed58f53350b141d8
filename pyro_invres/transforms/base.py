"""What every block in :mod:`pyro_invres.transforms` shares.

:class:`InvertibleModule` is a Pyro :class:`~pyro.distributions.TransformModule` over a
fixed event shape that adds these to Pyro's contract:

* **Validation at the boundary**: a wrong event shape, a dtype or device that differs
  from the parameters', and (while Pyro's validation is on) non-finite values raise a
  ``ValueError`` that names what was expected and what came.
* **A cache that cannot go stale.** Pyro's identity cache (``cache_size=1``) returns the
  pair computed for the same tensor object, even after an optimizer step changed the
  parameters, and then back-propagates through a freed graph (Pyro issue #2292); it also
  misses in-place changes (``x.mul_(2)``). Here a cached pair is reused only while the
  input and output are unchanged (their version counters), and so is everything the block
  reads: its parameters, buffers (a permutation after ``load_state_dict``) and bound
  contexts, by identity, storage and version, and the floating ones by an order-sensitive
  digest of their values (writes through ``p.data`` keep the versions), with the same grad
  mode and train/eval mode. So sampling-then-scoring skips the inverse while full-batch
  training on one data tensor, or a reused input buffer, just works. Inference tensors
  keep no version counter: their pairs are never reused.
* **A memo for the log-determinant**, computed at most once per cached pair, under the
  same rules.
* **Thread safety**: each thread has its own cached pair and memo, so concurrent calls on
  one flow never answer with another thread's pair (a copy or a pickle starts empty).

Subclasses implement ``_call``, ``_inverse`` and ``_log_abs_det_jacobian`` and may store
a value with :meth:`_remember_ladj` while computing the map.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Sequence

import pyro.distributions as pdist
import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import constraints

from ..nn.conditioners import ContextBound
from ..ops.digest import value_digest
from ..ops.implicit import _functorch_data

__all__ = ["InvertibleModule", "as_event_shape"]


# -- what a cached pair depends on ---------------------------------------------------------
def _version(t: object) -> object:
    """The in-place write counter of a tensor, or a fresh object that equals nothing.

    Inference tensors (and tensors that are not plain, such as ``vmap``'s) keep no
    counter: a pair holding one must never be reused, as nothing would see it change.
    """
    try:
        return t._version  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return object()


def _stamps(tensors: list[Tensor]) -> tuple[tuple[object, ...], ...]:
    """Identity, storage (``p.data = other`` and ``.to()`` keep the object) and version."""
    try:
        return tuple([(id(t), t.data_ptr(), t._version) for t in tensors])
    except RuntimeError:  # a tensor without storage or counter: it never matches
        return ((object(),),)


_EXEMPT_BUFFERS: dict[type, frozenset[str]] = {}


def _exempt_buffers(kind: type) -> frozenset[str]:
    """Buffers a module class declares bookkeeping (``_cache_exempt_buffers``).

    Such buffers are written without changing the map (a spectral norm records in
    ``state_dict()`` whether its vectors are fresh): a cached pair survives them.
    """
    exempt = _EXEMPT_BUFFERS.get(kind)
    if exempt is None:
        exempt = _EXEMPT_BUFFERS[kind] = frozenset(getattr(kind, "_cache_exempt_buffers", ()))
    return exempt


def _dependencies(module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Parameters and buffers of the module tree, and the contexts bound into it.

    A flat walk rather than ``parameters()``/``buffers()``, which build a name for every
    module on the way; it runs on every cache check, so that a replaced parameter,
    buffer, submodule or context is seen at once.
    """
    state: list[Tensor] = []
    contexts: list[Tensor] = []
    stack = [module]
    while stack:
        m = stack.pop()
        state += m._parameters.values()
        exempt = _exempt_buffers(type(m))
        if exempt:
            state += [b for name, b in m._buffers.items() if name not in exempt]
        else:
            state += m._buffers.values()
        stack += m._modules.values()
        if isinstance(m, ContextBound) and isinstance(m.context, Tensor):
            contexts.append(m.context)
        if None in stack:  # a submodule slot registered as None
            stack = [c for c in stack if c is not None]
    return [t for t in state if t is not None], contexts


class _Slot:
    """One thread's cached pair, the log-det memo for it, and what both depend on."""

    __slots__ = ("x", "y", "versions", "key", "state", "contexts", "digest", "memo", "pending")

    def __init__(self) -> None:
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.versions: tuple[object, object] | None = None
        self.key: tuple | None = None
        # held so that the identities in ``key`` cannot be reused by new tensors
        self.state: list[Tensor] = []
        self.contexts: list[Tensor] = []
        self.digest: tuple[object, ...] = ()
        self.memo: object = None  # what ``_remember_ladj`` stored, then the log-det
        self.pending: object = None  # what the call now running remembered


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
        self._slot()  # before any thread can race to create the per-thread cache

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
        # a device sync, so only while the user has asked Pyro to validate; inside
        # torch.func transforms (vmap) it reads the unwrapped data, all samples at once
        if pdist.is_validation_enabled() and not bool(torch.isfinite(_functorch_data(x)).all()):
            raise ValueError(f"{type(self).__name__}: {name} has non-finite values (nan or inf)")

    # -- the cache ------------------------------------------------------------------------
    # Each thread has its own cached pair and log-det memo (a ``threading.local``): with
    # one shared pair, two threads scoring different data on one flow answer each other's
    # questions (Pyro's own identity cache has that race). A pair is reused only for the
    # very tensor it was computed for (identity), unchanged since (version counters of x
    # and y), and while everything the block reads is unchanged: its parameters, buffers
    # (a ChannelPermutation's permutation) and bound contexts, by identity, storage and
    # version, the floating ones also by a digest of their values (``p.data`` writes).
    def _slot(self) -> _Slot:
        local = self.__dict__.get("_cache_local")
        if local is None:
            # setdefault is atomic: threads that arrive together share one local
            local = self.__dict__.setdefault("_cache_local", threading.local())
        slot = getattr(local, "slot", None)
        if slot is None:
            slot = local.slot = _Slot()
        return slot

    @property
    def _cached_x_y(self) -> tuple[Tensor | None, Tensor | None]:
        """This thread's cached pair (Pyro's attribute name), current or not."""
        slot = self._slot()
        return slot.x, slot.y

    @_cached_x_y.setter
    def _cached_x_y(self, pair: tuple[Tensor | None, Tensor | None]) -> None:
        slot = self._slot()
        slot.x, slot.y = pair
        slot.key = slot.memo = None  # a pair set from outside is never reused

    @property
    def _pending_memo(self) -> object:
        """What the call now running in this thread passed to :meth:`_remember_ladj`."""
        return self._slot().pending

    @_pending_memo.setter
    def _pending_memo(self, value: object) -> None:
        self._slot().pending = value

    def __getstate__(self) -> dict:
        # the cache holds graph-carrying tensors and a threading.local (which does not
        # pickle): neither belongs in a copy or a pickle; a copy makes its own lazily
        state = dict(super().__getstate__())
        # (and the attributes older versions kept, should such a state come through)
        for name in ("_cache_local", "_cached_x_y", "_cache_key", "_checksum", "_ladj_memo"):
            state.pop(name, None)
        return state

    def _state_key(self) -> tuple:
        # what makes a cached pair stale: a replaced or written parameter, buffer or
        # context, a different grad mode (a graph-less pair cannot serve a backward), a
        # train/eval switch (evaluation may refine the spectral norms)
        state, contexts = _dependencies(self)
        stamps = _stamps(state), _stamps(contexts)
        return stamps, torch.is_grad_enabled(), self.training

    def _pair_is_current(self, slot: _Slot | None = None) -> bool:
        """Whether this thread's cached pair may still be reused."""
        slot = self._slot() if slot is None else slot
        if slot.key is None or slot.versions != (_version(slot.x), _version(slot.y)):
            return False
        if self._state_key() != slot.key:
            return False
        # the values too: writes through ``p.data`` keep the versions
        return value_digest(slot.state) == slot.digest

    def _store(self, slot: _Slot, x: Tensor, y: Tensor) -> None:
        pending, slot.pending = slot.pending, None
        slot.x, slot.y = x, y
        slot.versions = _version(x), _version(y)
        slot.state, slot.contexts = _dependencies(self)
        slot.key = self._state_key()
        slot.digest = value_digest(slot.state)
        # only what this very call remembered may become the memo of its pair
        slot.memo = pending

    def __call__(self, x: Tensor) -> Tensor:
        if self._cache_size == 0:
            self._validate(x, "input")
            return self._call(x)
        slot = self._slot()
        if x is slot.x and self._pair_is_current(slot):
            return slot.y  # type: ignore[return-value]
        self._validate(x, "input")
        slot.memo = slot.pending = None  # the old pair stays, for a warm start
        y = self._call(x)
        self._store(slot, x, y)
        return y

    def _inv_call(self, y: Tensor) -> Tensor:
        if self._cache_size == 0:
            self._validate(y, "input of the inverse", self.output_shape)
            return self._inverse(y)
        slot = self._slot()
        if y is slot.y and self._pair_is_current(slot):
            return slot.x  # type: ignore[return-value]
        self._validate(y, "input of the inverse", self.output_shape)
        slot.memo = slot.pending = None  # the old pair stays, for a warm start
        x = self._inverse(y)
        self._store(slot, x, y)
        return x

    # -- the log-det memo -------------------------------------------------------------------
    def _remember_ladj(self, value: object) -> None:
        """Called by ``_call``/``_inverse`` with what the log-det needs (or the log-det)."""
        self._slot().pending = value

    def _memo_for(self, x: Tensor, y: Tensor) -> object:
        slot = self._slot()
        if slot.memo is not None and x is slot.x and y is slot.y and self._pair_is_current(slot):
            return slot.memo
        return None

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """``log |det dy/dx|`` of the forward map, shaped like the batch.

        Computed at most once for the cached pair: a second call returns the same tensor.
        """
        memo = self._memo_for(x, y)
        if isinstance(memo, Tensor):
            return memo
        slot = self._slot()
        unchanged = slot.versions == (_version(x), _version(y))
        if not (x is slot.x and y is slot.y and unchanged):
            # a pair this block did not just compute (or changed since): check it like any input
            self._validate(x, "input of log_abs_det_jacobian")
            self._validate(y, "output given to log_abs_det_jacobian", self.output_shape)
        value = self._log_abs_det_jacobian(x, y, memo)
        if memo is not None and slot.memo is memo:
            # keep the number, drop whatever graph-building state produced it
            slot.memo = value
        return value

    @abstractmethod
    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor, memo: object) -> Tensor:
        """The log-det for the pair; ``memo`` is what ``_remember_ladj`` stored, or None."""

    def __repr__(self) -> str:
        return torch.nn.Module.__repr__(self)
