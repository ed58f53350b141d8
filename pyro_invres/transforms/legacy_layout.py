"""State dicts of stacks saved before their fixed permutations were modules.

The ``additive``, ``affine`` and ``pyro-affine`` presets of :func:`~pyro_invres.build_flow`
once put Pyro's :class:`~pyro.distributions.transforms.Permute` between their blocks. It is
not an :class:`~torch.nn.Module`, so :class:`~pyro.distributions.torch_transform.
ComposeTransformModule` left it out of its module list: a stack ``[c0, a0, P, c1, a1]``
saved its weights under the indices ``0, 1, 2, 3`` and no permutation at all. The presets
now use :class:`~pyro_invres.transforms.ChannelPermutation`, a module with buffers (it
moves with ``.to(device)`` and deep-copies after use), so the same stack saves under
``0, 1, 3, 4`` with the permutation under ``2``.

:func:`load_legacy_layout` lets such a stack load both. Only when *every* fixed
permutation of the stack is absent from the state dict, and the other entries are exactly
what the stack's other modules hold in the old numbering, are the entries renumbered; the
absent permutation buffers are then filled from the stack's own, freshly built values
(the presets rebuild the same reversal from their config). Anything else is left to
:meth:`~torch.nn.Module.load_state_dict`, which reports it as usual.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, MutableMapping
from typing import Any

from torch import Tensor, nn

from .downsample import ChannelPermutation

__all__ = ["legacy_renames", "load_legacy_layout", "loads_legacy_layout", "upgrade_state_dict"]

_MARK = "_loads_legacy_permutations"


def load_legacy_layout(stack: nn.Module) -> nn.Module:
    """Let ``stack`` load state dicts saved when its fixed permutations were not modules.

    Call it only on a stack whose :class:`~pyro_invres.transforms.ChannelPermutation`
    children are rebuilt identically from its config (the presets' reversals): their
    buffers are filled from the stack's own values when a state dict lacks them.

    Example:
        >>> import torch
        >>> from pyro.distributions.torch_transform import ComposeTransformModule
        >>> from pyro_invres.transforms import ActNorm
        >>> rev = ChannelPermutation(2, permutation=[1, 0], event_dim=1)
        >>> stack = load_legacy_layout(ComposeTransformModule([ActNorm(2), rev, ActNorm(2)]))
        >>> old = {k.replace("2.", "1."): v for k, v in stack.state_dict().items()
        ...        if not k.startswith("1.")}   # saved when the reversal was Pyro's Permute
        >>> sorted(old)[:3]
        ['0.bias', '0.initialized', '0.log_scale']
        >>> stack.load_state_dict(old)
        <All keys matched successfully>
    """
    if not isinstance(stack, nn.Module):
        raise TypeError(f"load_legacy_layout needs an nn.Module stack, got {type(stack).__name__}")
    setattr(stack, _MARK, True)
    stack.register_load_state_dict_pre_hook(_upgrade_before_loading)
    return stack


def loads_legacy_layout(module: nn.Module) -> bool:
    """Whether :func:`load_legacy_layout` was applied to ``module``.

    Example:
        >>> from pyro_invres.flows import build_flow
        >>> [loads_legacy_layout(build_flow(name, 2)) for name in ("affine", "iresnet")]
        [True, False]
    """
    return bool(getattr(module, _MARK, False))


def legacy_renames(stack: nn.Module, keys: Collection[str], prefix: str = "") -> dict[str, str]:
    """Old key -> new key for a state dict of ``stack`` saved in the old numbering.

    Empty unless all of the stack's permutation buffers are absent from ``keys`` and every
    key under ``prefix`` names, in the old numbering (the permutations left out), an entry
    that the stack's module at the new index holds.

    Example:
        >>> from pyro.distributions.torch_transform import ComposeTransformModule
        >>> from pyro_invres.transforms import ActNorm
        >>> rev = ChannelPermutation(2, permutation=[1, 0], event_dim=1)
        >>> stack = ComposeTransformModule([ActNorm(2), rev, ActNorm(2)])
        >>> legacy_renames(stack, ["0.bias", "1.bias"])
        {'1.bias': '2.bias'}
    """
    names = list(stack._modules)
    fixed = [n for n in names if isinstance(stack._modules[n], ChannelPermutation)]
    if not fixed:
        return {}
    own = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    buffers = {f"{n}.{b}" for n in fixed for b in ("permutation", "inverse_permutation")}
    if buffers.intersection(own):
        return {}  # saved with its permutations: nothing to renumber
    others = [n for n in names if n not in fixed]
    held: dict[str, Collection[str]] = {}
    renames: dict[str, str] = {}
    for key in own:
        head, _, rest = key.partition(".")
        if head not in names or names.index(head) >= len(others):
            return {}
        new = others[names.index(head)]
        if new not in held:
            child = stack._modules[new]
            held[new] = set() if child is None else set(child.state_dict())
        if rest not in held[new]:
            return {}
        if new != head:
            renames[prefix + key] = prefix + new + "." + rest
    return renames


def upgrade_state_dict(flow: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` in the current numbering of ``flow`` (a copy; tensors shared).

    Every stack inside ``flow`` marked by :func:`load_legacy_layout` is renumbered when its
    entries follow the old numbering (:func:`legacy_renames`), and its permutation buffers
    absent from the state dict are filled from ``flow``'s own.

    Example:
        >>> from pyro_invres.flows import build_flow
        >>> flow = build_flow("affine", 3, num_blocks=2, hidden_dims=[4])  # c a rev c a
        >>> new = flow.state_dict()
        >>> old_index = {"0": "0", "1": "1", "3": "2", "4": "3"}  # the reversal: no entry
        >>> old = {old_index[k[0]] + k[1:]: v for k, v in new.items() if k[0] != "2"}
        >>> upgraded = upgrade_state_dict(flow, old)
        >>> upgraded.keys() == new.keys(), upgraded["2.permutation"].tolist()
        (True, [2, 1, 0])
    """
    upgraded = dict(state_dict)
    for name, module in flow.named_modules():
        if loads_legacy_layout(module):
            _upgrade(module, upgraded, name + "." if name else "")
    return upgraded


def _upgrade(stack: nn.Module, state_dict: MutableMapping[str, Any], prefix: str) -> None:
    renames = legacy_renames(stack, list(state_dict), prefix)
    # all taken out before any is put back: an old index can be another entry's new one
    moved = {new: state_dict.pop(old) for old, new in renames.items()}
    state_dict.update(moved)
    for name, child in stack._modules.items():
        if isinstance(child, ChannelPermutation):
            for buffer in ("permutation", "inverse_permutation"):
                state_dict.setdefault(f"{prefix}{name}.{buffer}", getattr(child, buffer))


def _upgrade_before_loading(
    module: nn.Module, state_dict: MutableMapping[str, Any], prefix: str, *args: Any
) -> None:
    # called by load_state_dict on its own copy, before the stack's children load
    _upgrade(module, state_dict, prefix)
