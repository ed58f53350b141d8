"""The user's own data: ``N x D`` tables from ``.npy``, ``.csv`` or ``.pt`` files.

``pyro-invres fit --data FILE`` and ``evaluate --data FILE`` read files through here, and
Python code can too:

* :func:`load_data` reads a file into a float64 ``(N, D)`` tensor (any ``D >= 1``) and its
  column names (a ``.csv`` header row, else ``x0, x1, ...``), refusing anything that is
  not such a table with a one-line message naming what was expected and what came: the
  wrong number of dimensions, non-numeric cells, NaN or infinite values (with the first
  row and column), a constant column, too few rows.
* :func:`split_data` keeps a seeded random fraction of the rows aside as held-out data.
* :class:`Standardization` is the per-column map :math:`z = (x - \\mu) / \\sigma` with the
  training rows' mean and standard deviation. A flow is fitted to ``z``; its density in
  data units is

  .. math::

      \\log p_x(x) = \\log p_z\\big((x - \\mu) / \\sigma\\big) - \\sum_j \\log \\sigma_j,

  so an NLL in data units is the standardised one plus :attr:`Standardization.log_scale`.
  The statistics travel in the checkpoint (:meth:`Standardization.to_dict`), so sampling
  returns data units and evaluation reports data units.

Why standardise: the tuned flows, their Lipschitz bounds and learning rates were chosen
for data of unit scale; a column in thousands would otherwise need a different flow.

Example:
    >>> import pathlib, tempfile
    >>> import numpy as np
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "table.csv"
    >>> _ = path.write_text("height,weight\\n1.70,65\\n1.80,80\\n1.60,55\\n1.75,70\\n")
    >>> table = load_data(path)
    >>> table.data.shape, table.columns
    (torch.Size([4, 2]), ['height', 'weight'])
    >>> train, test = split_data(table.data, test_fraction=0.25, seed=0)
    >>> len(train), len(test)
    (3, 1)
    >>> scale = Standardization.from_data(train)
    >>> bool(torch.allclose(scale.decode(scale.encode(test)), test))
    True
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATA_SUFFIXES",
    "DataTable",
    "Standardization",
    "check_table",
    "load_data",
    "nll_in_data_units",
    "split_data",
]

#: The file types :func:`load_data` reads.
DATA_SUFFIXES: tuple[str, ...] = (".npy", ".csv", ".pt")


@dataclass(frozen=True)
class DataTable:
    """A data file read by :func:`load_data`.

    Attributes:
        data: the rows, float64, shape ``(N, D)``.
        columns: ``D`` column names (the ``.csv`` header, else ``x0, x1, ...``).
        path: the file it was read from.
        sha256: the hex digest of the file's bytes (tells whether a file changed).
        has_header: whether the names came from the file (a ``.csv`` header row).

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.csv"
        >>> _ = path.write_text("a,b\\n1,2\\n3,5\\n4,4\\n")
        >>> table = load_data(path)
        >>> table.columns, tuple(table.data.shape), table.has_header
        (['a', 'b'], (3, 2), True)
    """

    data: Tensor
    columns: list[str]
    path: Path
    sha256: str
    has_header: bool = False


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """Rows of numbers, after an optional header row; ``#`` lines and blank lines skipped."""
    header: list[str] | None = None
    rows: list[list[float]] = []
    width = None
    with path.open(newline="", encoding="utf-8-sig") as handle:
        for line_no, cells in enumerate(csv.reader(handle), start=1):
            if not cells or all(not c.strip() for c in cells) or cells[0].lstrip()[:1] == "#":
                continue
            values = [_number(c) for c in cells]
            if width is None:  # the first line: a header if any cell is not a number
                width = len(cells)
                if any(v is None for v in values):
                    header = [c.strip() for c in cells]
                    continue
            if len(cells) != width:
                raise ValueError(
                    f"{path}: line {line_no} has {len(cells)} cells, expected {width} like the "
                    "first line (every row needs one number per column)"
                )
            bad = next((j for j, v in enumerate(values) if v is None), None)
            if bad is not None:
                raise ValueError(
                    f"{path}: line {line_no}, column {bad + 1}: {cells[bad].strip()[:40]!r} is "
                    "not a number (only a first header row may hold text)"
                )
            rows.append(values)  # type: ignore[arg-type]
    if not rows:
        what = "a header row and no data" if header is not None else "no rows"
        raise ValueError(f"{path}: the file holds {what}")
    return np.asarray(rows, dtype=np.float64), header


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:  # object arrays need pickle: refused, no code runs
        raise ValueError(f"{path}: cannot read it as a numeric .npy array ({err})") from err
    except OSError as err:
        raise ValueError(f"{path}: not a .npy file ({err})") from err
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise ValueError(f"{path}: expected one array saved with numpy.save, got an archive")
    return array


def _read_pt(path: Path) -> np.ndarray:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or unsafe files
        text = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"{path}: cannot read it as a saved tensor ({text})") from err
    if not isinstance(value, Tensor):
        raise ValueError(
            f"{path}: expected a tensor saved with torch.save(tensor, path), got "
            f"{type(value).__name__}"
        )
    if value.is_complex():
        raise ValueError(f"{path}: expected real numbers, got {value.dtype}")
    return value.detach().cpu().numpy()


def load_data(path: str | os.PathLike) -> DataTable:
    """Read an ``N x D`` table of numbers from a ``.npy``, ``.csv`` or ``.pt`` file.

    * ``.npy``: one numeric array saved with :func:`numpy.save` (no pickled objects);
    * ``.csv``: comma-separated numbers, one row per sample; the first line may be a
      header of column names, lines starting with ``#`` and blank lines are skipped;
    * ``.pt``: one tensor saved with :func:`torch.save` (read with ``weights_only=True``,
      so no code in the file runs).

    The table is then checked by :func:`check_table`.

    Arguments:
        path: the file.

    Returns:
        A :class:`DataTable` with the rows as a float64 tensor.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown suffix, an unreadable file, or a table that fails
            :func:`check_table`; the message names the file and what is wrong.

    Example:
        >>> import pathlib, tempfile
        >>> import numpy as np
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.npy"
        >>> np.save(path, np.random.default_rng(0).normal(size=(100, 5)))
        >>> load_data(path).data.shape
        torch.Size([100, 5])
        >>> np.save(path, np.zeros(100))
        >>> load_data(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...x.npy: expected a 2-D table (N rows x D columns), got shape (100,)...
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(
            f"{path}: cannot read {suffix or 'a file without a suffix'!r}; --data takes "
            f"{', '.join(DATA_SUFFIXES)} files"
        )
    if not path.exists():
        raise FileNotFoundError(f"no data file {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; --data names a file")
    header = None
    if suffix == ".csv":
        try:
            array, header = _read_csv(path)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not a text .csv file ({err.reason})") from err
        except csv.Error as err:
            raise ValueError(f"{path}: not a readable .csv file ({err})") from err
    elif suffix == ".npy":
        array = _read_npy(path)
    else:
        array = _read_pt(path)
    columns = header if header is not None else None
    data = check_table(array, str(path), columns)
    names = columns if columns is not None else [f"x{j}" for j in range(data.shape[1])]
    return DataTable(data, names, path, _digest(path), header is not None)


def check_table(
    array: Any, where: str = "data", columns: Sequence[str] | None = None, min_rows: int = 2
) -> Tensor:
    """Check an ``N x D`` table of real numbers and return it as a float64 tensor.

    Arguments:
        array: a NumPy array or a tensor.
        where: how messages name it (a file name).
        columns: the column names, used in messages.
        min_rows: the fewest rows accepted.

    Raises:
        ValueError: not 2-D, not numeric, fewer than ``min_rows`` rows, NaN or infinite
            values (the first one's row and column are named), or a constant column.

    Example:
        >>> check_table(np.ones((3, 2)) * [[1.0], [2.0], [3.0]]).dtype
        torch.float64
        >>> check_table(np.array([[0.0, 1.0], [float("nan"), 2.0], [3.0, 4.0]]))
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: data: 1 NaN or infinite value (the first at row 1, column 0 'x0'); ...
    """
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype == np.bool_ or array.dtype.kind not in "fiu":
        raise ValueError(f"{where}: expected real numbers, got dtype {array.dtype}")
    if array.ndim != 2:
        hint = (
            "; for one-dimensional data give shape (N, 1), e.g. x[:, None]"
            if array.ndim == 1
            else "; flatten each sample into a row first"
            if array.ndim > 2
            else ""
        )
        raise ValueError(
            f"{where}: expected a 2-D table (N rows x D columns), got shape "
            f"{tuple(array.shape)}{hint}"
        )
    n, dim = array.shape
    if dim < 1:
        raise ValueError(f"{where}: the table has no columns (shape {tuple(array.shape)})")
    if n < min_rows:
        raise ValueError(f"{where}: {n} row(s); at least {min_rows} are needed")
    names = list(columns) if columns is not None else [f"x{j}" for j in range(dim)]
    if len(names) != dim:
        raise ValueError(f"{where}: {len(names)} column names for {dim} columns")
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        row, col = (int(v) for v in bad[0])
        count = len(bad)
        raise ValueError(
            f"{where}: {count} NaN or infinite value{'s' if count > 1 else ''} (the first at "
            f"row {row}, column {col} {names[col]!r}); remove or fill those rows"
        )
    _refuse_constant_columns(array, where, names)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))


def _refuse_constant_columns(array: np.ndarray, where: str, names: Sequence[str]) -> None:
    """A column that does not vary (within the float spacing of its values) has no density,
    and standardising it would divide by zero."""
    hi, lo = array.max(0).astype(np.float64), array.min(0).astype(np.float64)
    eps = np.finfo(array.dtype).eps if array.dtype.kind == "f" else 0.0
    flat = (hi - lo) <= 4 * eps * np.maximum(np.abs(hi), np.abs(lo))
    if flat.any():
        cols = [int(j) for j in np.flatnonzero(flat)]
        shown = ", ".join(f"{j} {names[j]!r}" for j in cols[:5])
        more = f" and {len(cols) - 5} more" if len(cols) > 5 else ""
        raise ValueError(
            f"{where}: column{'s' if len(cols) > 1 else ''} {shown}{more} "
            f"{'are' if len(cols) > 1 else 'is'} constant (value {hi[cols[0]]:.6g}): a "
            "constant column has no density; drop it"
        )


def split_data(data: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split rows at random into training and held-out rows, reproducibly from ``seed``.

    ``round(N * test_fraction)`` rows (at least one) are held out; which ones depends only
    on ``N``, ``test_fraction`` and ``seed`` (a CPU :class:`torch.Generator`), so the same
    file gives the same split on any machine and in any later command.

    Arguments:
        data: ``(N, D)`` rows.
        test_fraction: the held-out share, in ``(0, 1)``.
        seed: seeds the permutation.

    Returns:
        ``(train, test)``, each in the original row order.

    Raises:
        ValueError: a fraction outside ``(0, 1)``, or a split that leaves fewer than two
            training rows.

    Example:
        >>> x = torch.arange(10.0).unsqueeze(1)
        >>> train, test = split_data(x, 0.2, seed=0)
        >>> train.shape, test.shape
        (torch.Size([8, 1]), torch.Size([2, 1]))
        >>> torch.equal(split_data(x, 0.2, seed=0)[1], test)
        True
    """
    if not (isinstance(test_fraction, int | float) and 0 < test_fraction < 1):
        raise ValueError(f"the held-out fraction must be in (0, 1), got {test_fraction!r}")
    n = len(data)
    n_test = max(1, round(n * test_fraction))
    if n - n_test < 2:
        raise ValueError(
            f"{n} rows are too few to hold out {test_fraction:g} of them and still train on "
            f"two or more (got {n - n_test} training rows)"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    held = torch.zeros(n, dtype=torch.bool)
    held[order[:n_test]] = True
    return data[~held], data[held]


@dataclass(frozen=True)
class Standardization:
    """The per-column map ``z = (x - mean) / std`` and its inverse.

    ``std`` is the population standard deviation of the rows it was fitted on (float64).
    A density fitted to ``z`` has, in data units, the log-density minus
    :attr:`log_scale`; an NLL in data units is the standardised NLL plus it.

    Attributes:
        mean: ``(D,)`` column means.
        std: ``(D,)`` column standard deviations, all positive.

    Example:
        >>> s = Standardization.from_data(torch.tensor([[0.0, 10.0], [2.0, 30.0]]))
        >>> s.mean.tolist(), s.std.tolist()
        ([1.0, 20.0], [1.0, 10.0])
        >>> s.encode(torch.tensor([[1.0, 40.0]])).tolist()
        [[0.0, 2.0]]
        >>> import math
        >>> round(s.log_scale, 6) == round(math.log(10.0), 6)
        True
    """

    mean: Tensor
    std: Tensor

    def __post_init__(self) -> None:
        mean = torch.as_tensor(self.mean, dtype=torch.float64).detach().cpu()
        std = torch.as_tensor(self.std, dtype=torch.float64).detach().cpu()
        if mean.dim() != 1 or std.shape != mean.shape or len(mean) == 0:
            raise ValueError(
                f"a standardisation needs mean and std of one shape (D,), got "
                f"{tuple(mean.shape)} and {tuple(std.shape)}"
            )
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all())):
            raise ValueError("a standardisation's mean and std must be finite")
        if not bool((std > 0).all()):
            raise ValueError(f"a standardisation's std must be positive, got {std.tolist()}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def from_data(cls, data: Tensor) -> Standardization:
        """Fit the map to ``data`` ``(N, D)``: column means and standard deviations."""
        rows = torch.as_tensor(data, dtype=torch.float64)
        mean = rows.mean(0)
        std = (rows - mean).square().mean(0).sqrt()
        if not bool((std > 0).all()):
            cols = (std <= 0).nonzero().flatten().tolist()
            raise ValueError(f"column(s) {cols} are constant: they cannot be standardised")
        return cls(mean, std)

    @property
    def dim(self) -> int:
        """The number of columns ``D``."""
        return len(self.mean)

    @property
    def log_scale(self) -> float:
        """``sum_j log std_j``: NLL in data units = standardised NLL + this."""
        return float(self.std.log().sum())

    def encode(self, x: Tensor) -> Tensor:
        """Data units to standardised units, in ``x``'s dtype and device (computed in float64)."""
        self._check_dim(x)
        z = (x.double() - self.mean.to(x.device)) / self.std.to(x.device)
        return z.to(x.dtype if x.is_floating_point() else torch.float32)

    def decode(self, z: Tensor) -> Tensor:
        """Standardised units to data units, as float64 (offsets far from 0 keep their digits)."""
        self._check_dim(z)
        return z.double() * self.std.to(z.device) + self.mean.to(z.device)

    def _check_dim(self, x: Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"the standardisation has {self.dim} columns, the data shape {tuple(x.shape)}"
            )

    def wrap(self, flow: torch.nn.Module) -> torch.nn.Module:
        """``flow`` followed by :meth:`decode`: a flow whose density is in data units.

        ``make_density(scale.wrap(flow), (D,))`` samples in data units and its
        ``log_prob`` is the data-unit log-density (the affine map's log-determinant,
        :attr:`log_scale`, included). It computes in the flow's dtype; to score data far
        from 0 in float32, standardise in float64 with :meth:`encode` instead.

        Example:
            >>> from pyro_invres.evaluation import make_density
            >>> from pyro_invres.flows import build_flow
            >>> flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8])
            >>> s = Standardization(torch.tensor([5.0, -1.0]), torch.tensor([2.0, 3.0]))
            >>> x = torch.tensor([[6.0, 2.0]])
            >>> inside = make_density(flow, (2,)).log_prob(s.encode(x)) - s.log_scale
            >>> bool(torch.allclose(make_density(s.wrap(flow), (2,)).log_prob(x), inside))
            True
        """
        from pyro.distributions.torch_transform import ComposeTransformModule
        from torch.distributions import AffineTransform

        place = next(iter(flow.parameters()), torch.zeros(()))
        dtype = place.dtype if place.is_floating_point() else torch.float32
        affine = AffineTransform(
            self.mean.to(place.device, dtype), self.std.to(place.device, dtype), event_dim=1
        )
        return ComposeTransformModule([flow, affine])

    def to_dict(self) -> dict[str, list[float]]:
        """Plain lists (for a checkpoint's metadata or JSON); :meth:`from_dict` reverses it."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any], dim: int | None = None) -> Standardization:
        """Rebuild from :meth:`to_dict`'s output, checking it (a checkpoint may be edited).

        Raises:
            ValueError: missing or non-numeric entries, or ``dim`` columns expected and
                another number stored.
        """
        if not isinstance(entry, Mapping) or not {"mean", "std"} <= set(entry):
            raise ValueError(f"a stored standardisation needs 'mean' and 'std', got {entry!r:.80}")
        values = []
        for key in ("mean", "std"):
            value = entry[key]
            if not isinstance(value, list | tuple) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value
            ):
                raise ValueError(
                    f"a stored standardisation's {key!r} must be a list of numbers, got "
                    f"{value!r:.80}"
                )
            values.append(torch.tensor([float(v) for v in value], dtype=torch.float64))
        scale = cls(*values)
        if dim is not None and scale.dim != dim:
            raise ValueError(
                f"the stored standardisation has {scale.dim} columns, the flow {dim} dimensions"
            )
        return scale


def nll_in_data_units(nll_standardized: float, scale: Standardization | None) -> float:
    """``nll_standardized + sum(log std)`` (unchanged without a standardisation).

    Example:
        >>> import math
        >>> s = Standardization(torch.zeros(2), torch.tensor([2.0, 3.0]))
        >>> round(nll_in_data_units(1.0, s) - 1.0 - math.log(6.0), 12)
        0.0
    """
    return nll_standardized if scale is None else nll_standardized + scale.log_scale
