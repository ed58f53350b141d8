"""Checkpoints: atomic writes, safe reads, and rebuilding a flow from what a file stores.

A checkpoint written by :func:`~pyro_invres.train.fit_density` is a plain ``dict``
(``format``, ``step``, ``flow_state``, ``optim_state``, ``rng``, ``config``, ``losses``)
saved with :func:`torch.save`:

* it is written atomically (:func:`atomic_write`: a temporary file in the same directory,
  ``fsync``, :func:`os.replace`), so a crash or a full disk mid-write never leaves a
  half-written file where the last good checkpoint was;
* it is read with ``torch.load(..., weights_only=True)`` (:func:`load_checkpoint`): no code
  in the file runs, and a damaged or foreign file raises :class:`CheckpointError` naming
  what is wrong;
* ``config["flow"]`` is the ``flow_config`` that :func:`~pyro_invres.flows.build_flow`
  records (the flow's name, ``input_dim`` and options, plain types only);
  :func:`load_flow` checks it against the stored tensors before building anything, then
  rebuilds the flow by name;
* ``config["metadata"]["standardization"]``, written by ``pyro-invres fit --data``, holds
  the per-column mean and standard deviation the flow's data were standardised with
  (:class:`~pyro_invres.data_files.Standardization`): :func:`load_standardization` reads
  it, and ``load_flow(path, data_units=True)`` returns the flow followed by the map back
  to data units, so its samples and densities are in the units of the data file.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor

from .flows import FLOWS, build_flow
from .transforms.legacy_layout import legacy_renames, loads_legacy_layout, upgrade_state_dict

__all__ = [
    "CHECKPOINT_FORMAT",
    "MAX_CONFIG_INT",
    "CheckpointError",
    "atomic_write",
    "load_checkpoint",
    "load_flow",
    "load_standardization",
    "save_checkpoint",
]

#: The ``format`` entry of every checkpoint this package writes.
CHECKPOINT_FORMAT = "pyro_invres.checkpoint/1"

_REQUIRED_KEYS = ("format", "step", "flow_state", "optim_state", "rng", "config")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted, or does not fit the flow.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_checkpoint(pathlib.Path(tmp) / "c.pt", {"x": torch.ones(2)})
        ...     _ = path.write_bytes(path.read_bytes()[:100])   # a copy cut short
        ...     load_checkpoint(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pyro_invres.checkpoint.CheckpointError: cannot read checkpoint ...: truncated ...
    """


# -- random-number states -------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "random": [version, list(keys), gauss],
        "numpy": [name, torch.as_tensor(np_keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, keys, gauss = state["random"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not every OS opens directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: whole, or not at all.

    The bytes go to a temporary file in the same directory, which is flushed,
    ``fsync``-ed and then renamed over ``path`` with :func:`os.replace` (atomic on POSIX
    and Windows). Whatever happens mid-write, ``path`` holds either the previous
    checkpoint or the new one.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.pt"
        >>> save_checkpoint(p, {"x": torch.ones(2)}) == p, torch.load(p)["x"].sum().item()
        (True, 2.0)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda handle: torch.save(dict(state), handle))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file atomically: ``write(handle)`` fills a temporary file, which replaces ``path``.

    The temporary file lives in the same directory (so :func:`os.replace` is a rename on
    one file system), is flushed and ``fsync``-ed before the rename, and is removed if
    anything fails (a full disk, a crash of ``write``, an interrupt). So ``path`` holds
    either its previous content or the complete new one, never a 0-byte or half-written
    file. Every file ``pyro-invres`` writes goes through here.

    Arguments:
        path: the file to write; its directory must exist, and it must not be a directory.
        write: called once with a binary file handle.

    Raises:
        OSError: from the file system (the temporary file is gone by then), or
            ``IsADirectoryError`` when ``path`` is a directory.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
        >>> atomic_write(p, lambda f: f.write(b"hello")) == p, p.read_bytes()
        (True, b'hello')
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the mode an ordinary open() would
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`~pyro_invres.train.fit_density`, safely.

    Uses ``torch.load(..., weights_only=True)``: no code in the file is executed.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted, or not a checkpoint of
            this package (the message says which).

    Example:
        >>> load_checkpoint("/no/such/file.pt")
        Traceback (most recent call last):
        ...
        pyro_invres.checkpoint.CheckpointError: no checkpoint at /no/such/file.pt
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for damaged files
        text = " ".join(str(err).split())
        reason = text.split(". ")[0][:200] if text else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated or corrupted ({reason[:200]})"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a pyro-invres checkpoint ({CHECKPOINT_FORMAT})")
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    _check_structure(state, f"checkpoint {path}")
    return dict(_upgrade_layout(state))


def _check_structure(state: Mapping[str, Any], where: str) -> None:
    """Refuse a checkpoint whose entries have the wrong types (hand-edited, or forged).

    Later code indexes into these entries; a string where a dict belongs would otherwise
    surface as an ``AttributeError`` deep inside the command line.
    """
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{where}: 'step' must be an int >= 0, got {step!r:.80}")
    weights = state.get("flow_state")
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items()
    ):
        raise CheckpointError(f"{where}: 'flow_state' must map names to tensors")
    for key in ("optim_state", "rng", "config"):
        if not isinstance(state.get(key), Mapping):
            raise CheckpointError(f"{where}: {key!r} must be a dict, got {state.get(key)!r:.80}")
    for key in ("flow", "fit", "metadata"):
        entry = state["config"].get(key)
        if entry is not None and not isinstance(entry, Mapping):
            raise CheckpointError(f"{where}: config[{key!r}] must be a dict, got {entry!r:.80}")
    losses = state.get("losses", [])
    if not isinstance(losses, list | tuple) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in losses
    ):
        raise CheckpointError(f"{where}: 'losses' must be a list of numbers")


#: The most any integer of a checkpoint's flow config may ask for (blocks, widths, solver
#: iterations, ...): far above any flow this package trains, far below what would exhaust
#: memory or time before the stored tensors are compared.
MAX_CONFIG_INT = 1 << 20


def _check_flow_config(config: Mapping[str, Any], weights: Mapping[str, Tensor]) -> None:
    """Check a checkpoint's flow config against its stored tensors, before building the flow.

    A config is only a description; the tensors are what the file really holds. The
    config must ask for the stored tensors, key for key and shape for shape, so that
    rebuilding the flow costs what the file already cost, whatever the config says.

    The shapes it implies are found without building it at its size: small probe flows
    (every hidden width 1, then one width at a time 2) give each dimension as
    ``a + sum_j b_j (h_j - 1)``, linear in the widths ``h_j``, which is how layer widths
    enter weight shapes. Each probe has at most as many blocks as the file has tensors.

    Raises:
        CheckpointError: naming the first option or tensor that does not match.
    """
    name, input_dim, options, hidden = _check_config_sizes(config, weights)

    def probe(widths: list[int] | None) -> dict[str, tuple[int, ...]]:
        cfg = dict(options) if widths is None else {**options, "hidden_dims": widths}
        flow = build_flow(name, input_dim, **cfg)
        return {k: tuple(v.shape) for k, v in flow.state_dict().items()}

    # the probes draw initial weights: leave the caller's random stream as it was
    with torch.random.fork_rng(devices=[]):
        expected = _probe_shapes(probe, hidden)
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"the checkpoint's flow config does not describe its weights: stored tensor "
            f"{unexpected[0]!r} (and {len(unexpected) - 1} more) is not in a {name} flow of "
            f"{options.get('num_blocks', 1)} blocks"
        )
    for key, shape in expected.items():
        if key not in weights:
            # a missing flag (a buffer added in a later version) is left to the module's
            # own loading; a missing weight means the config asks for more than is stored
            if math.prod(d for d in shape if d >= 0) > 1:
                raise CheckpointError(
                    f"the checkpoint's flow config asks for tensor {key!r} of shape "
                    f"{list(shape)}, which the file does not store"
                )
            continue
        stored = tuple(weights[key].shape)
        if len(stored) != len(shape) or any(d >= 0 and d != s for d, s in zip(shape, stored)):
            raise CheckpointError(
                f"the checkpoint's flow config asks for {key!r} of shape {list(shape)}, but "
                f"the file stores shape {list(stored)}"
            )


def _check_config_sizes(
    config: Mapping[str, Any], weights: Mapping[str, Tensor]
) -> tuple[str, Any, dict[str, Any], list[int] | None]:
    """Bound what a flow config asks for by what the file stores, before building any flow.

    Returns the flow's name, ``input_dim``, its other options and ``hidden_dims``.
    """

    def ints_in(value: Any) -> Iterator[int]:
        if isinstance(value, int) and not isinstance(value, bool):
            yield value
        elif isinstance(value, list | tuple):
            for v in value:
                yield from ints_in(v)
        elif isinstance(value, Mapping):
            for v in value.values():
                yield from ints_in(v)

    too_big = [v for v in ints_in(dict(config)) if abs(v) > MAX_CONFIG_INT]
    if too_big:
        raise CheckpointError(
            f"the checkpoint's flow config asks for {too_big[0]}, above the limit "
            f"{MAX_CONFIG_INT} of any size or count it may ask for"
        )
    name, input_dim = config["name"], config["input_dim"]
    options = {k: v for k, v in config.items() if k not in ("name", "input_dim")}
    blocks, hidden = options.get("num_blocks", 1), options.get("hidden_dims")
    for what, value in [("input_dim", input_dim), ("num_blocks", blocks)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(
                f"the checkpoint's flow config has {what}={value!r:.80}; expected a positive int"
            )
    if hidden is not None and (
        not isinstance(hidden, list)
        or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden)
    ):
        raise CheckpointError(
            f"the checkpoint's flow config has hidden_dims={hidden!r:.80}; "
            "expected a list of positive ints"
        )
    # every block holds at least one tensor, and every layer adds one to each block
    if blocks > len(weights) or (hidden is not None and len(hidden) > len(weights)):
        raise CheckpointError(
            f"the checkpoint's flow config asks for {blocks} blocks of {len(hidden or [])} "
            f"hidden layers, but the file stores only {len(weights)} tensors"
        )
    largest = max((max(v.shape, default=1) for v in weights.values()), default=0)
    if input_dim > largest:
        raise CheckpointError(
            f"the checkpoint's flow config has input_dim={input_dim}, but no stored tensor "
            f"has a dimension that large (largest {largest})"
        )
    return name, input_dim, options, hidden


def _upgrade_layout(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A checkpoint saved before a preset's fixed permutations were modules, renumbered.

    The ``additive``, ``affine`` and ``pyro-affine`` presets once put Pyro's ``Permute``
    (no module, no state) between their blocks; they now hold a
    :class:`~pyro_invres.transforms.ChannelPermutation`, which shifts the indices of the
    blocks after it (:mod:`pyro_invres.transforms.legacy_layout`). The flow's tensors, and
    the optimiser's entries named after them, move to the new indices and the missing
    permutation buffers are filled from a freshly built flow of the same config (the
    reversal it rebuilds). Any other checkpoint comes back as it is, as does one whose
    config cannot be probed: the later checks say what is wrong with it.
    """
    config, weights = state["config"].get("flow"), state["flow_state"]
    if not isinstance(config, Mapping) or config.get("name") not in FLOWS:
        return state
    if any(k.endswith(".permutation") for k in weights):
        return state  # saved with its permutations
    try:
        name, input_dim, options, hidden = _check_config_sizes(config, weights)
        if hidden is not None:  # the layout does not depend on the widths
            options = {**options, "hidden_dims": [1] * len(hidden)}
        with torch.random.fork_rng(devices=[]):
            probe = build_flow(name, input_dim, **options)
    except (CheckpointError, KeyError, RuntimeError, ValueError, TypeError):
        return state
    renames: dict[str, str] = {}
    for prefix, module in probe.named_modules():
        if loads_legacy_layout(module):
            renames.update(legacy_renames(module, weights, prefix + "." if prefix else ""))
    upgraded = upgrade_state_dict(probe, weights)
    if not renames and upgraded.keys() == weights.keys():
        return state
    upgraded_state = {**state, "flow_state": upgraded}
    if "optim_state" in state:
        upgraded_state["optim_state"] = _rename_optim_entries(state["optim_state"], renames)
    return upgraded_state


def _rename_optim_entries(optim_state: Any, renames: Mapping[str, str]) -> Any:
    """The optimiser state with its per-tensor entries keyed by the renamed tensors.

    The entries are keyed by param-store name, ``"<module>$$$<state-dict key>"``, either
    under ``"params"`` (:class:`~pyro_invres.optim.JointOptim`) or at the top level (Pyro's
    own optimisers).
    """
    if not isinstance(optim_state, Mapping) or not renames:
        return optim_state

    def rename(name: Any) -> Any:
        if not isinstance(name, str):
            return name
        head, divider, key = name.rpartition("$$$")
        return head + divider + renames[key] if key in renames else name

    if isinstance(optim_state.get("params"), Mapping):
        return {**optim_state, "params": {rename(k): v for k, v in optim_state["params"].items()}}
    return {rename(k): v for k, v in optim_state.items()}


def _probe_shapes(
    probe: Callable[[list[int] | None], dict[str, tuple[int, ...]]], hidden: list[int] | None
) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes a config implies, from probes of width 1 and 2 (-1: unknown)."""
    try:
        if hidden is None:  # sizes follow from input_dim alone, bounded above
            expected = probe(None)
        else:
            base = probe([1] * len(hidden))
            slopes = []
            for j in range(len(hidden)):
                bumped = probe([2 if i == j else 1 for i in range(len(hidden))])
                if bumped.keys() != base.keys():  # width changes the structure: no shapes
                    slopes = None
                    break
                slopes.append(bumped)
            expected = {
                k: tuple(
                    d + sum((s[k][i] - d) * (h - 1) for s, h in zip(slopes, hidden))
                    if slopes is not None and all(len(s[k]) == len(shape) for s in slopes)
                    else -1  # unknown: left to load_state_dict
                    for i, d in enumerate(shape)
                )
                for k, shape in base.items()
            }
    except (RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"the checkpoint's flow config is not valid: {err}") from err
    return expected


def load_standardization(checkpoint: str | os.PathLike | Mapping[str, Any]) -> Any:
    """The per-column standardisation a checkpoint stores, or ``None`` if it has none.

    ``pyro-invres fit --data FILE`` fits the flow to standardised columns and stores their
    training-row means and standard deviations in the checkpoint; flows fitted to toy data
    sets or from Python have none.

    Returns:
        A :class:`~pyro_invres.data_files.Standardization`, or ``None``.

    Raises:
        CheckpointError: an unreadable checkpoint, or a stored standardisation that is
            malformed or has another number of columns than the flow.

    Example:
        >>> load_standardization({"config": {"metadata": {"dataset": "moons"}}}) is None
        True
        >>> entry = {"mean": [10.0, 0.0], "std": [2.0, 0.5]}
        >>> state = {"config": {"flow": {"input_dim": 2},
        ...                     "metadata": {"standardization": entry}}}
        >>> load_standardization(state).std.tolist()
        [2.0, 0.5]
    """
    from .data_files import Standardization

    state = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
    config = state.get("config")
    metadata = config.get("metadata") if isinstance(config, Mapping) else None
    entry = metadata.get("standardization") if isinstance(metadata, Mapping) else None
    if entry is None:
        return None
    flow = config.get("flow")
    dim = flow.get("input_dim") if isinstance(flow, Mapping) else None
    try:
        return Standardization.from_dict(entry, dim if isinstance(dim, int) else None)
    except ValueError as err:
        raise CheckpointError(f"the checkpoint's standardisation is damaged: {err}") from err


def load_flow(
    checkpoint: str | os.PathLike | Mapping[str, Any], *, data_units: bool = False
) -> TransformModule:
    """Rebuild the flow stored in a checkpoint (a path or a loaded dict), in eval mode.

    With ``data_units=True`` and a checkpoint of ``pyro-invres fit --data``, the flow is
    followed by the map from standardised columns back to data units
    (:meth:`~pyro_invres.data_files.Standardization.wrap`): its samples, and the
    ``log_prob`` of a density built on it, are in the units of the data file. Without a
    stored standardisation the flow is returned as it is.

    The flow config is checked against the stored tensors (names and shapes) before the
    flow is built, so a config that asks for more than the file holds fails at once
    instead of allocating it; every integer in it is bounded by :data:`MAX_CONFIG_INT`.

    Raises:
        CheckpointError: unreadable file, no flow config, a config that does not describe
            the stored tensors, or weights that do not fit.

    Example:
        >>> import pathlib, tempfile
        >>> from pyro_invres.datasets import sample_toy
        >>> from pyro_invres.evaluation import evaluate_nll
        >>> from pyro_invres.train import fit_density
        >>> data = sample_toy("moons", 256, seed=0)
        >>> flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp) / "fit.pt"
        ...     _ = fit_density(flow, data, steps=3, batch_size=64, checkpoint_path=path,
        ...                     progress=False)
        ...     loaded = load_flow(path)
        >>> loaded.training, abs(evaluate_nll(loaded, data) - evaluate_nll(flow, data)) < 1e-6
        (False, True)
    """
    if isinstance(checkpoint, Mapping):
        state: Mapping[str, Any] = checkpoint
    else:
        state = load_checkpoint(checkpoint)
    flow = _rebuild_flow(state)
    scale = load_standardization(state) if data_units else None
    return flow if scale is None else scale.wrap(flow).eval()


def _rebuild_flow(state: Mapping[str, Any]) -> TransformModule:
    missing = [k for k in ("step", "flow_state", "config") if k not in state]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {', '.join(missing)}")
    # optimiser and RNG states are not needed to rebuild the flow
    _check_structure({"optim_state": {}, "rng": {}, **state}, "the checkpoint")
    state = _upgrade_layout(state)
    config = dict(state["config"].get("flow") or {})
    if "name" not in config or "input_dim" not in config:
        raise CheckpointError("the checkpoint has no flow config to rebuild the flow from")
    if config["name"] not in FLOWS:
        raise CheckpointError(
            f"the checkpoint's flow config names flow {config['name']!r:.80}; "
            f"expected one of {', '.join(FLOWS)}"
        )
    # before building anything: a config that asks for more than the file stores (20,000
    # blocks, 30,000-wide layers) would otherwise cost minutes and gigabytes to refuse
    _check_flow_config(config, state["flow_state"])
    name, input_dim = config.pop("name"), config.pop("input_dim")
    try:
        flow = build_flow(name, input_dim, **config)
        flow.load_state_dict(state["flow_state"])
    except (RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot rebuild the flow from the checkpoint: {err}") from err
    return flow.eval()
