"""An order-sensitive digest of tensor values, to notice writes that keep version counters.

Writes through ``p.data`` (Pyro's ``ClippedAdam``, model surgery) leave a tensor's version
counter alone, so a cache or a refresh policy that must notice them compares the values
themselves. Norms and sums do not see a permutation of the values; this digest does.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["value_digest"]

_DIGEST_WEIGHTS: dict[tuple[torch.device, torch.dtype], Tensor] = {}
_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TRACING = (-1, "traced")  # the digest while torch.jit.trace runs


def _position_weights(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``n`` fixed pseudo-random odd integer weights, the same for a position whatever ``n``."""
    weights = _DIGEST_WEIGHTS.get((device, dtype))
    if weights is None or weights.numel() < n:
        size = max(n, 1024, 0 if weights is None else 2 * weights.numel())
        # splitmix64's finaliser of the position (int64 arithmetic wraps), truncated to
        # the width of the values; ``| 1`` makes every weight odd
        z = torch.arange(1, size + 1, dtype=torch.int64, device=device) * -7046029254386353131
        z = (z ^ (z >> 30)) * -4658895280553007687
        z = (z ^ (z >> 27)) * -7723592293110705685
        weights = ((z ^ (z >> 31)) | 1).to(dtype)
        _DIGEST_WEIGHTS[(device, dtype)] = weights  # a race only recomputes the same values
    return weights[:n]


def value_digest(tensors: list[Tensor]) -> tuple[object, ...]:
    """An order-sensitive digest of the tensors' values (one entry per dtype and device).

    The bits of the values, read as integers of their width, dotted with fixed odd
    pseudo-random weights, with wrap-around: a change of any single entry always
    changes it (an odd weight times a non-zero difference is never 0 mod 2^bits), and a
    permutation of values (which keeps the norm and the sum) changes it but with
    probability about 2^-bits. Groups of at most 64 KiB on the CPU are kept as their raw
    bytes instead, which every change alters. Writes through ``p.data`` (Pyro's
    ``ClippedAdam``) leave the version counters alone, so the values themselves must be
    compared: one pass over them, in a few kernels whatever the number of tensors.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0, 3.0])
        >>> before = value_digest([w])
        >>> w.data[[0, 2]] = w.data[[2, 0]]   # same norm and sum, same version counter
        >>> value_digest([w]) == before
        False
    """
    if torch.jit.is_tracing():
        # a trace would record these ops (and cannot record a dtype view); nothing writes
        # the weights while a trace runs, and a pair stored outside a trace never matches
        # this marker, nor one stored inside it a real digest
        return _TRACING
    if not tensors:
        return ()
    # integer buffers too (a permutation's indices); complex tensors have no int view
    kinds = {(t.dtype, t.device) for t in tensors}
    if len(kinds) == 1 and not tensors[0].is_complex():
        groups = [tensors]  # the common case, told apart in one pass
    else:
        by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            if not t.is_complex():
                by_kind.setdefault((t.dtype, t.device), []).append(t)
        groups = list(by_kind.values())
    with torch.no_grad():
        # one C++ call flattens and concatenates each group
        return tuple(
            [_group_digest(torch._utils._flatten_dense_tensors(group)) for group in groups]
        )


#: Up to this many bytes a CPU group is kept as its raw bytes: the exact values, compared
#: as bytes, cost less than the weighted dot product's four dispatches for small blocks
#: (an ActNorm's handful of values, a 2-D flow's few thousand weights).
_RAW_BYTES_MAX = 1 << 16


def _group_digest(values: Tensor) -> object:
    """The digest of one flat tensor: its bytes if small and on the CPU, else the wrapped
    dot product of its bits with the position weights."""
    # as integers of their width: every dtype (bfloat16, bool) has a numpy view then
    bits = values.view(_INT_OF_WIDTH[values.element_size()])
    if bits.device.type == "cpu":
        if bits.numel() * bits.element_size() <= _RAW_BYTES_MAX:
            try:
                return bits.numpy().tobytes()
            except RuntimeError:  # a torch.func wrapper has no storage to read: the product
                pass
        return int(torch.dot(bits, _position_weights(bits.numel(), bits.device, bits.dtype)))
    weights = _position_weights(bits.numel(), bits.device, bits.dtype)
    # integer dot products are CPU-only; the wrapped products still sum
    return int((bits * weights).sum())
