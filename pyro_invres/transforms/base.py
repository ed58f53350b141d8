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

* **An explicit contract** (:meth:`InvertibleModule.call_and_ladj`,
  :meth:`~InvertibleModule.inverse_and_ladj`, :meth:`~InvertibleModule.as_coupling`):
  a block returns its output and its log-determinant together, and composites such as
  :class:`~pyro_invres.transforms.ReversibleStack` use only these public methods.

The class docstring of :class:`InvertibleModule` says what a subclass implements.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pyro.distributions as pdist
import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import constraints

from ..nn.conditioners import ContextBound
from ..ops.digest import value_digest
from ..ops.implicit import _functorch_data

__all__ = ["InvertibleModule", "LazyLadj", "as_event_shape"]

#: What a hook returns as the log-det: the tensor, or a zero-argument function computing it
#: (evaluated only if someone asks, so that sampling without scoring never pays for it).
LazyLadj = Tensor | Callable[[], Tensor]


def _settle(ladj: LazyLadj) -> Tensor:
    """The log-det tensor of what a hook returned."""
    return ladj if isinstance(ladj, Tensor) else ladj()


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
    exempt_of = _EXEMPT_BUFFERS
    while stack:
        m = stack.pop()
        state += m._parameters.values()
        kind = type(m)
        exempt = exempt_of.get(kind)
        if exempt is None:
            exempt = _exempt_buffers(kind)
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


def _first_parameter(module: nn.Module) -> Tensor | None:
    """``next(module.parameters(), None)`` without naming every module on the way.

    The same tensor: the first parameter of a pre-order walk in registration order.
    """
    stack = [module]
    while stack:
        m = stack.pop()
        for p in m._parameters.values():
            if p is not None:
                return p
        children = [c for c in m._modules.values() if c is not None]
        children.reverse()
        stack += children
    return None


_REAL_EVENTS: dict[int, constraints.Constraint] = {}


def _real_events(event_dim: int) -> constraints.Constraint:
    """``independent(real, event_dim)``, one object per ``event_dim``.

    Pyro and torch ask a composite for its domain on every log-density (and a composite
    asks every part): building a new constraint each time cost more than some blocks'
    arithmetic. Constraints hold no state, so one object serves every block.
    """
    c = _REAL_EVENTS.get(event_dim)
    if c is None:
        c = _REAL_EVENTS[event_dim] = constraints.independent(constraints.real, event_dim)
    return c


class _Slot:
    """One thread's cached pair, the log-det memo for it, and what both depend on."""

    __slots__ = ("x", "y", "versions", "key", "state", "contexts", "digest", "memo")

    def __init__(self) -> None:
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.versions: tuple[object, object] | None = None
        self.key: tuple | None = None
        # held so that the identities in ``key`` cannot be reused by new tensors
        self.state: list[Tensor] = []
        self.contexts: list[Tensor] = []
        self.digest: tuple[object, ...] = ()
        self.memo: LazyLadj | None = None  # the pair's log-det, or how to compute it


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

    The block contract (what a composite may rely on, in the spirit of Distrax's
    ``Bijector``):

    * :meth:`call_and_ladj` ``(x) -> (y, ladj)``: ``y = f(x)`` and ``log|det df/dx|`` at
      ``x``, shaped like the batch (``x.shape[:-event_dim]``).
    * :meth:`inverse_and_ladj` ``(y) -> (x, ladj)``: ``x = f^{-1}(y)`` and the *forward*
      log-det ``log|det df/dx|`` at that ``x`` (so ``log q(y) = log p(x) - ladj``).
    * :meth:`call` and :meth:`inverse`: the map alone; a log-det the block can defer is
      never computed.
    * :meth:`as_coupling`: a :class:`~pyro_invres.transforms.coupling.Coupling` describing
      how the block couples (split, conditioner passes, update, merge), or ``None`` (the
      default). :class:`~pyro_invres.transforms.ReversibleStack` fuses the reconstruction
      and the backward pass of any block that returns one.

    All four take ``cached``: with ``True`` (the default) they validate the input (event
    shape, dtype, device, finiteness under Pyro validation) and go through this thread's
    cache, so a second question about the same pair costs nothing; ``cached=False`` runs
    the map directly, without validation or cache, for composites that check at their own
    boundary and must not keep every block's activations (``ReversibleStack``).

    What a subclass implements: **either** ``_call(x)``, ``_inverse(y)`` and
    ``_log_abs_det_jacobian(x, y)`` (the log-det of any pair, computed from scratch),
    **or** the hooks ``_call_and_ladj(x)`` and ``_inverse_and_ladj(y)`` returning
    ``(out, ladj)``, where ``ladj`` (the forward log-det in both directions) is a tensor or
    a zero-argument function evaluated only when asked (:data:`LazyLadj`); a block with the
    hooks may also implement ``_log_abs_det_jacobian`` (the default reruns
    ``_call_and_ladj``). What it may assume: inputs reaching the hooks have the right
    event shape, dtype and device (or come from a composite that checked them); hooks are
    called with grad mode as the caller set it; the cache is not its business (never read
    or write another block's private members). A mapping that keeps no parameters of its
    own must still depend only on its parameters, buffers and bound contexts: the cache
    is keyed on exactly those.

    Example:
        A subclass implements the map, its inverse and the log-det:

        >>> import math, torch
        >>> class Double(InvertibleModule):
        ...     def _call(self, x):
        ...         return 2 * x
        ...     def _inverse(self, y):
        ...         return y / 2
        ...     def _log_abs_det_jacobian(self, x, y):
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

        Or the hooks, returning the output and the log-det together (here lazily):

        >>> class Triple(InvertibleModule):
        ...     def _call_and_ladj(self, x):
        ...         return 3 * x, lambda: x.new_full(x.shape[:-1], 3 * math.log(3))
        ...     def _inverse_and_ladj(self, y):
        ...         return y / 3, y.new_full(y.shape[:-1], 3 * math.log(3))
        >>> y, ladj = Triple((3,)).inverse_and_ladj(torch.ones(2, 3), cached=False)
        >>> y[0].tolist(), round(float(ladj[0]), 4)
        ([0.3333333432674408, 0.3333333432674408, 0.3333333432674408], 3.2958)
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
        self._check_hooks()
        self._slot()  # before any thread can race to create the per-thread cache

    def _check_hooks(self) -> None:
        """Refuse a subclass that implements neither form of the contract (see above)."""
        kind, base = type(self), InvertibleModule
        for plain, hook in [("_call", "_call_and_ladj"), ("_inverse", "_inverse_and_ladj")]:
            if getattr(kind, plain) is getattr(base, plain) and getattr(kind, hook) is getattr(
                base, hook
            ):
                raise TypeError(f"{kind.__name__} must implement {plain} or {hook}")
        if (
            kind._log_abs_det_jacobian is base._log_abs_det_jacobian
            and kind._call_and_ladj is base._call_and_ladj
        ):
            raise TypeError(
                f"{kind.__name__} must implement _log_abs_det_jacobian or _call_and_ladj"
            )

    # -- Pyro's contract -------------------------------------------------------------
    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    @constraints.dependent_property(is_discrete=False)
    def domain(self) -> constraints.Constraint:
        return _real_events(self.event_dim)

    @constraints.dependent_property(is_discrete=False)
    def codomain(self) -> constraints.Constraint:
        return _real_events(self.event_dim)

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
        floating = _first_parameter(self)
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

    def __getstate__(self) -> dict:
        # the cache holds graph-carrying tensors and a threading.local (which does not
        # pickle): neither belongs in a copy or a pickle; a copy makes its own lazily
        state = dict(super().__getstate__())
        # (and the attributes older versions kept, should such a state come through)
        for name in ("_cache_local", "_cached_x_y", "_cache_key", "_checksum", "_ladj_memo"):
            state.pop(name, None)
        return state

    def _state_key(self, state: list[Tensor], contexts: list[Tensor]) -> tuple:
        """What makes a cached pair stale, from the tensors ``_dependencies`` found.

        A replaced or written parameter, buffer or context, a different grad mode (a
        graph-less pair cannot serve a backward), a train/eval switch (evaluation may
        refine the spectral norms). A subclass adds its own options to the tuple.
        """
        return _stamps(state), _stamps(contexts), torch.is_grad_enabled(), self.training

    def _pair_is_current(self, slot: _Slot | None = None) -> bool:
        """Whether this thread's cached pair may still be reused."""
        slot = self._slot() if slot is None else slot
        if slot.key is None or slot.versions != (_version(slot.x), _version(slot.y)):
            return False
        # one walk serves the stamps and the digest
        state, contexts = _dependencies(self)
        if self._state_key(state, contexts) != slot.key:
            return False
        # the values too: writes through ``p.data`` keep the versions (the key matched,
        # so ``state`` holds the very tensors the digest was stored for)
        return value_digest(state) == slot.digest

    def _store(self, slot: _Slot, x: Tensor, y: Tensor, ladj: LazyLadj) -> None:
        slot.x, slot.y = x, y
        slot.versions = _version(x), _version(y)
        state, contexts = _dependencies(self)
        slot.state, slot.contexts = state, contexts
        slot.key = self._state_key(state, contexts)
        slot.digest = value_digest(state)
        # only what this very call returned may become the log-det of its pair
        slot.memo = ladj

    def _through_cache(self, value: Tensor, forward: bool) -> Tensor:
        """One direction of the map through this thread's cache (validating a new input)."""
        if forward:
            where: tuple = ("input",)
        else:
            where = ("input of the inverse", self.output_shape)
        if self._cache_size == 0:
            self._validate(value, *where)
            return (self._call_and_ladj if forward else self._inverse_and_ladj)(value)[0]
        slot = self._slot()
        if value is (slot.x if forward else slot.y) and self._pair_is_current(slot):
            return slot.y if forward else slot.x  # type: ignore[return-value]
        self._validate(value, *where)
        slot.memo = None  # the old pair stays, for a warm start
        if forward:
            y, ladj = self._call_and_ladj(value)
            self._store(slot, value, y, ladj)
            return y
        x, ladj = self._inverse_and_ladj(value)
        self._store(slot, x, value, ladj)
        return x

    def __call__(self, x: Tensor) -> Tensor:
        return self._through_cache(x, True)

    def _inv_call(self, y: Tensor) -> Tensor:
        return self._through_cache(y, False)

    # -- the contract -----------------------------------------------------------------------
    def call(self, x: Tensor, cached: bool = True) -> Tensor:
        """``y = f(x)``; a log-det the block can defer is not computed.

        Arguments:
            x: a batch of events.
            cached: validate ``x`` and go through the cache (``False``: neither).

        Example:
            >>> import torch
            >>> from pyro_invres.transforms import affine_coupling
            >>> block = affine_coupling(4, [8])
            >>> x = torch.randn(3, 4)
            >>> block.call(x) is block(x)   # the cached pair
            True
        """
        if cached:
            return self._through_cache(x, True)
        return self._call_and_ladj(x)[0]

    def inverse(self, y: Tensor, cached: bool = True) -> Tensor:
        """``x = f^{-1}(y)`` (what ``t.inv(y)`` computes); the log-det is not computed.

        Arguments:
            y: a batch of outputs.
            cached: validate ``y`` and go through the cache (``False``: neither).

        Example:
            >>> import torch
            >>> from pyro_invres.transforms import affine_coupling
            >>> block = affine_coupling(4, [8])
            >>> y = torch.randn(3, 4)
            >>> torch.equal(block.inverse(y, cached=False), block.inv(y))
            True
        """
        if cached:
            return self._through_cache(y, False)
        return self._inverse_and_ladj(y)[0]

    def call_and_ladj(self, x: Tensor, cached: bool = True) -> tuple[Tensor, Tensor]:
        """``(y, log|det df/dx|)`` at ``x``, the log-det shaped like the batch.

        Arguments:
            x: a batch of events.
            cached: validate ``x`` and go through the cache, so that a later
                ``log_abs_det_jacobian(x, y)`` or ``inv(y)`` costs nothing; ``False`` runs
                the map directly (no validation, nothing kept).

        Example:
            >>> import torch
            >>> from pyro_invres.transforms import affine_coupling
            >>> block = affine_coupling(4, [8])
            >>> x = torch.randn(3, 4)
            >>> y, ladj = block.call_and_ladj(x)
            >>> ladj is block.log_abs_det_jacobian(x, y), ladj.shape
            (True, torch.Size([3]))
        """
        if not cached:
            y, ladj = self._call_and_ladj(x)
            return y, _settle(ladj)
        if self._cache_size == 0:
            self._validate(x, "input")
            y, ladj = self._call_and_ladj(x)
            return y, _settle(ladj)
        y = self._through_cache(x, True)
        return y, self.log_abs_det_jacobian(x, y)

    def inverse_and_ladj(self, y: Tensor, cached: bool = True) -> tuple[Tensor, Tensor]:
        """``(x, log|det df/dx|)`` with ``x = f^{-1}(y)``: the *forward* log-det at ``x``.

        So ``log q(y) = log p(x) - ladj`` for a flow pushing ``p`` forward through ``f``.

        Arguments:
            y: a batch of outputs.
            cached: as in :meth:`call_and_ladj`.

        Example:
            >>> import torch
            >>> from pyro_invres.transforms import affine_coupling
            >>> block = affine_coupling(4, [8])
            >>> y = torch.randn(3, 4)
            >>> x, ladj = block.inverse_and_ladj(y, cached=False)
            >>> y2, ladj2 = block.call_and_ladj(x, cached=False)
            >>> torch.allclose(y2, y, atol=1e-6), torch.allclose(ladj2, ladj, atol=1e-6)
            (True, True)
        """
        if not cached:
            x, ladj = self._inverse_and_ladj(y)
            return x, _settle(ladj)
        if self._cache_size == 0:
            self._validate(y, "input of the inverse", self.output_shape)
            x, ladj = self._inverse_and_ladj(y)
            return x, _settle(ladj)
        x = self._through_cache(y, False)
        return x, self.log_abs_det_jacobian(x, y)

    def as_coupling(self) -> object | None:
        """How this block couples, or ``None`` (the default: it is not a coupling).

        A coupling block returns a :class:`~pyro_invres.transforms.coupling.Coupling`
        (split, conditioner updates, merge) over its own networks; a
        :class:`~pyro_invres.transforms.ReversibleStack` then reconstructs its input and
        back-propagates with one pass of each network.

        Example:
            >>> from pyro_invres.transforms import actnorm, revnet_block
            >>> actnorm(2).as_coupling() is None, len(revnet_block(4, [8]).as_coupling().updates)
            (True, 2)
        """
        return None

    # -- the hooks (see the class docstring) --------------------------------------------------
    def _call(self, x: Tensor) -> Tensor:
        return self._call_and_ladj(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self._inverse_and_ladj(y)[0]

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, LazyLadj]:
        """``(f(x), forward log-det or how to compute it)``; default from ``_call``."""
        y = self._call(x)
        return y, lambda: self._log_abs_det_jacobian(x, y)

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, LazyLadj]:
        """``(f^{-1}(y), forward log-det at it, or how to compute it)``; from ``_inverse``."""
        x = self._inverse(y)
        return x, lambda: self._log_abs_det_jacobian(x, y)

    def _log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """The log-det of a pair, from scratch; the default reruns ``_call_and_ladj(x)``."""
        return _settle(self._call_and_ladj(x)[1])

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """``log |det dy/dx|`` of the forward map, shaped like the batch.

        Computed at most once for the cached pair: a second call returns the same tensor.
        """
        slot = self._slot()
        memo = slot.memo
        if memo is not None and x is slot.x and y is slot.y and self._pair_is_current(slot):
            if isinstance(memo, Tensor):
                return memo
            value = memo()
            if slot.memo is memo:
                # keep the number, drop whatever graph-building state produced it
                slot.memo = value
            return value
        unchanged = slot.versions == (_version(x), _version(y))
        if not (x is slot.x and y is slot.y and unchanged):
            # a pair this block did not just compute (or changed since): check it like any input
            self._validate(x, "input of log_abs_det_jacobian")
            self._validate(y, "output given to log_abs_det_jacobian", self.output_shape)
        return self._log_abs_det_jacobian(x, y)

    def __repr__(self) -> str:
        return torch.nn.Module.__repr__(self)
