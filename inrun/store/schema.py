"""The store's schema and versioning: format name, schema version, column specs and the file options.

A run store is one HDF5 file per rank with a ``steps`` table (one row per optimizer step) and a ``records`` table
(one row per sample occurrence), each column a resizable dataset. The layout is documented in docs/store-schema.md;
change it only together with ``SCHEMA_VERSION`` and that page. Nothing here writes rows: see
:mod:`inrun.store.writer` (commit protocol), :mod:`inrun.store.compression` (repack) and
:mod:`inrun.store.rankfile` (reading one file).
"""

from __future__ import annotations

import errno
import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import h5py
import numpy as np

from inrun.errors import InRunError
from inrun.version import __version__

FORMAT = "inrun-run"


SCHEMA_VERSION = 1


# Superblock v0 ("earliest") keeps files readable after kill -9: with ("v110", "v110") HDF5 leaves a
# "file is open for write" flag set that blocks every later open until h5clear is run.
# The upper bound "v110" allows large attributes while keeping HDF5 1.10+ readers working.
LIBVER = ("earliest", "v110")


CHUNK_ELEMENTS = 16384  # target elements per chunk (NOTES.md: 16-64k elements, written in blocks)


CHUNK_CACHE_BYTES = 32 << 20


STEPS, RECORDS = "steps", "records"


# No HDF5 file locks, for writers and readers alike: readers of a live store only read committed rows, which the
# writer never changes (docs/store-schema.md, "Reading a live run"), and one writer per store is ensured by
# inrun.store.lock instead. (HDF5 also refuses to open a file twice in one process with different locking flags,
# so a reader in the writer's process needs the writer's setting.)
READ_OPTIONS = {"locking": False}


OPEN_OPTIONS = {"libver": LIBVER, "rdcc_nbytes": CHUNK_CACHE_BYTES, **READ_OPTIONS}


# The live file: no free-space reuse (a file creation setting, kept by the file), so bytes that the last flush
# points at are never overwritten by a later allocation.
CREATE_OPTIONS = {**OPEN_OPTIONS, "fs_strategy": "none"}


class Column(NamedTuple):
    """One column of the steps or records table: each row is an array of ``shape`` and ``dtype``.

    ``fill`` is used when a row leaves the column out; ``None`` means NaN for float columns and "required" otherwise.
    """

    dtype: Any
    shape: tuple[int, ...] = ()
    fill: float | int | None = None


DEFAULT_STEP_COLUMNS: dict[str, Column] = {
    "step": Column(np.int64),  # optimizer step number, from 0
    "lr": Column(np.float64),
    "train_loss": Column(np.float64),
    "val_loss": Column(np.float64),  # validation loss at the start of the step (theta_t)
    "n_samples": Column(np.int64),  # filled by the writer
    "row_start": Column(np.int64),  # filled by the writer: first row of this step in `records`
    "skipped": Column(np.int8, fill=0),
    "residual_1": Column(np.float64),  # efficiency residuals, NaN when not known
    "residual_2": Column(np.float64),
}


DEFAULT_RECORD_COLUMNS: dict[str, Column] = {
    "step": Column(np.int64),  # filled by the writer from the step row
    "sample_id": Column(np.int64),
    "value_1": Column(np.float64),
    "value_2": Column(np.float64),
    "grad_norm_sq": Column(np.float64),
    "source": Column(np.int32, fill=-1),  # -1: the batch carries no source label
}


REQUIRED_STEP_COLUMNS = ("step", "n_samples", "row_start")


REQUIRED_RECORD_COLUMNS = ("step", "sample_id")


class StoreError(InRunError):
    """A run store cannot be created, opened, written or read as asked."""


class StoreIOError(StoreError, OSError):
    """The file system refused: the store cannot be created, opened or written."""


class IncompatibleStoreError(StoreError, ValueError):
    """The file is not an inrun run store this code can use (format, schema, run id or columns differ)."""


class StoreBusyError(StoreIOError):
    """Another writer holds the store (one writer per store); nothing was changed."""


class DamagedStoreError(StoreIOError):
    """The file is damaged or not a complete run store (cut short, killed while being created, not HDF5)."""


def as_column(spec: Column | tuple) -> Column:
    """Normalise ``(dtype, shape)`` or ``(dtype, shape, fill)`` to a ``Column`` with a numpy dtype and int shape."""
    col = Column(*spec)
    dtype = np.dtype(col.dtype)
    if dtype.kind not in "biuf":
        raise TypeError(f"column dtype {dtype} is not supported: use a bool, integer or float dtype")
    shape = tuple(int(n) for n in col.shape)
    if any(n < 1 for n in shape):
        raise ValueError(f"column row shape {shape} has an empty dimension; every dimension must be >= 1")
    return Column(dtype, shape, col.fill)


def as_columns(specs: Mapping[str, Column | tuple], required: tuple[str, ...], table: str) -> dict[str, Column]:
    columns = {str(name): as_column(spec) for name, spec in specs.items()}
    missing = [name for name in required if name not in columns]
    if missing:
        raise ValueError(f"the {table} table needs the columns {missing}; start from DEFAULT_{table.upper()}_COLUMNS")
    return columns


def fill_value(name: str, col: Column) -> Any:
    if col.fill is not None:
        return col.fill
    if col.dtype.kind == "f":
        return np.nan
    raise KeyError(f"column {name!r} has no value in this row and no fill value; pass it")


def _chunk_rows(col: Column) -> int:
    return max(1, CHUNK_ELEMENTS // math.prod(col.shape))


def compression_options(compression: str | None) -> dict[str, Any]:
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression is None:
        return {}
    raise ValueError(f"compression must be 'gzip', 'lzf' or None, not {compression!r}")


def create_table(group: h5py.Group, columns: dict[str, Column], compression: str | None = None) -> None:
    """One resizable dataset per column; chunked along rows. Live files use ``compression=None``."""
    for name, col in columns.items():
        ds = group.create_dataset(
            name,
            shape=(0, *col.shape),
            maxshape=(None, *col.shape),
            chunks=(_chunk_rows(col), *col.shape),
            dtype=col.dtype,
            **compression_options(compression),
        )
        if col.fill is not None:
            ds.attrs["fill"] = col.fill


def table_columns(group: h5py.Group) -> dict[str, Column]:
    """The column specs of a stored table, read back from its datasets."""
    return {
        name: Column(ds.dtype, tuple(ds.shape[1:]), _plain(ds.attrs["fill"]) if "fill" in ds.attrs else None)
        for name, ds in group.items()
    }


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def inrun_version() -> str:
    return __version__


def check_header(attrs: h5py.AttributeManager, path: Path) -> None:
    """Raise a clear error unless ``attrs`` belong to an inrun run store of a schema this code reads."""
    fmt = _plain(attrs.get("format"))
    if fmt != FORMAT:
        raise IncompatibleStoreError(f"{path} is not an inrun run store (its 'format' attribute is {fmt!r})")
    version = int(attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise IncompatibleStoreError(
            f"{path} was written by inrun {_plain(attrs.get('inrun_version'))} with schema {version}; "
            f"this inrun ({inrun_version()}) reads up to schema {SCHEMA_VERSION}; upgrade inrun"
        )
    if version < 1:
        raise IncompatibleStoreError(f"{path} has no valid schema_version attribute ({version})")


def open_error(path: Path, err: BaseException, mode: str) -> StoreIOError:
    """The error to raise when HDF5 cannot open ``path``: the file system's refusal, a file held open with HDF5's
    own lock, or (anything else on an existing file) a damaged or incomplete store.

    HDF5's text for a damaged superblock contains "sblock": only the exact "unable to lock file" means a lock.
    """
    what = "read" if mode == "r" else "write"
    text = str(err).lower()
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
        return StoreIOError(f"cannot open run store {path} to {what}: {err}")
    if "flag values don't match" in text or "already open" in text:
        return StoreIOError(
            f"cannot open run store {path} to {what}: {err}. This process holds it open with other settings (an "
            "h5py.File opened without locking=False?): close that, or open it with h5py.File(path, locking=False)."
        )
    if "unable to lock file" in text:
        return StoreIOError(
            f"cannot open run store {path} to {what}: {err}. Another program holds it open with HDF5 file locking "
            "(an h5py.File opened without locking=False, or HDFView): close that first."
        )
    if not path.exists():
        return StoreIOError(f"cannot open run store {path} to {what}: {err}")
    return damaged_error(path, err)


def damaged_error(path: Path, err: BaseException) -> DamagedStoreError:
    size = path.stat().st_size if path.exists() else 0
    return DamagedStoreError(
        f"{path} is damaged or not a complete run store ({size} bytes; HDF5 says: {str(err).splitlines()[0]}). "
        "A store is only ever replaced whole, so this file was cut short or damaged outside inrun, or is not a "
        "store at all. Delete it (or restore it from a copy) and start the run again."
    )
