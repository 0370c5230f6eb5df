"""The run store: one HDF5 file per rank with one row per optimizer step and one row per sample occurrence.

``RunWriter`` buffers rows in memory and appends them in blocks under a commit protocol that survives ``kill -9``;
``RankFile`` is the low-level read-only view of one file that ``inrun.reader`` builds on.
The layout is documented in docs/store-schema.md; change it only together with ``SCHEMA_VERSION`` and that page.

Why the live file is uncompressed: HDF5 stores a compressed chunk at a new place each time it is rewritten and
frees the old place, which it may reuse at once. A partly filled chunk holding committed rows is rewritten by the
next block, so a crash could leave the last flushed index pointing at overwritten bytes (seen in 17 of 20 kill -9
trials). Uncompressed chunks never move and their committed bytes are rewritten with the same values, so every
committed step survives. ``close()`` then rewrites the finished file compressed and swaps it in atomically.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import h5py
import numpy as np

from inrun.errors import InRunError

FORMAT = "inrun-run"
SCHEMA_VERSION = 1

# Superblock v0 ("earliest") keeps files readable after kill -9: with ("v110", "v110") HDF5 leaves a
# "file is open for write" flag set that blocks every later open until h5clear is run.
# The upper bound "v110" allows large attributes while keeping HDF5 1.10+ readers working.
LIBVER = ("earliest", "v110")
CHUNK_ELEMENTS = 16384  # target elements per chunk (NOTES.md: 16-64k elements, written in blocks)
CHUNK_CACHE_BYTES = 32 << 20
COPY_BLOCK_ELEMENTS = 1 << 22  # elements per block when rewriting a table
STEPS, RECORDS = "steps", "records"
REPACK_SUFFIX = ".repack.tmp"
OPEN_OPTIONS = {"libver": LIBVER, "rdcc_nbytes": CHUNK_CACHE_BYTES}
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
WRITER_STEP_COLUMNS = ("n_samples", "row_start")


class StoreError(InRunError):
    """A run store cannot be created, opened, written or read as asked."""


class StoreIOError(StoreError, OSError):
    """The file system refused: the store cannot be created, opened or written."""


class IncompatibleStoreError(StoreError, ValueError):
    """The file is not an inrun run store this code can use (format, schema, run id or columns differ)."""


def new_run_id() -> str:
    """A fresh run id; every rank of one run must be given the same one."""
    return uuid.uuid4().hex


def rank_path(path: str | Path, rank: int, world_size: int) -> Path:
    """The file of ``rank``: ``path`` itself for one rank, else ``<path without .h5>.rank<r>.h5``.

    ``inrun.open_run(path)`` finds these files again from the same ``path``.
    """
    path = Path(path)
    if world_size == 1:
        return path
    stem = path.name[: -len(".h5")] if path.name.endswith(".h5") else path.name
    return path.with_name(f"{stem}.rank{rank}.h5")


# ----------------------------------------------------------------------------------------------------------- columns


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


def _as_columns(specs: Mapping[str, Column | tuple], required: tuple[str, ...], table: str) -> dict[str, Column]:
    columns = {str(name): as_column(spec) for name, spec in specs.items()}
    missing = [name for name in required if name not in columns]
    if missing:
        raise ValueError(f"the {table} table needs the columns {missing}; start from DEFAULT_{table.upper()}_COLUMNS")
    return columns


def _fill_value(name: str, col: Column) -> Any:
    if col.fill is not None:
        return col.fill
    if col.dtype.kind == "f":
        return np.nan
    raise KeyError(f"column {name!r} has no value in this row and no fill value; pass it")


def _chunk_rows(col: Column) -> int:
    return max(1, CHUNK_ELEMENTS // math.prod(col.shape))


def _compression_options(compression: str | None) -> dict[str, Any]:
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression is None:
        return {}
    raise ValueError(f"compression must be 'gzip', 'lzf' or None, not {compression!r}")


def _create_table(group: h5py.Group, columns: dict[str, Column], compression: str | None = None) -> None:
    """One resizable dataset per column; chunked along rows. Live files use ``compression=None``."""
    for name, col in columns.items():
        ds = group.create_dataset(
            name,
            shape=(0, *col.shape),
            maxshape=(None, *col.shape),
            chunks=(_chunk_rows(col), *col.shape),
            dtype=col.dtype,
            **_compression_options(compression),
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


# ------------------------------------------------------------------------------------------------------------ header


def _inrun_version() -> str:
    import inrun  # at call time: the package imports this module

    return str(inrun.__version__)


def check_header(attrs: h5py.AttributeManager, path: Path) -> None:
    """Raise a clear error unless ``attrs`` belong to an inrun run store of a schema this code reads."""
    fmt = _plain(attrs.get("format"))
    if fmt != FORMAT:
        raise IncompatibleStoreError(f"{path} is not an inrun run store (its 'format' attribute is {fmt!r})")
    version = int(attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise IncompatibleStoreError(
            f"{path} was written by inrun {_plain(attrs.get('inrun_version'))} with schema {version}; "
            f"this inrun ({_inrun_version()}) reads up to schema {SCHEMA_VERSION}; upgrade inrun"
        )
    if version < 1:
        raise IncompatibleStoreError(f"{path} has no valid schema_version attribute ({version})")


def _wrap_open_error(path: Path, err: OSError, mode: str) -> StoreIOError:
    hint = ""
    if "lock" in str(err).lower() or "already open" in str(err).lower():
        hint = (" The file is open elsewhere (a training process still writing it, or a reader/writer in this"
                " process): close that first.")
    what = "read" if mode == "r" else "write"
    return StoreIOError(f"cannot open run store {path} to {what}: {err}.{hint}")


# ------------------------------------------------------------------------------------------------------------ writer


class _Buffer:
    """Rows of one table held in memory until the next commit."""

    def __init__(self, columns: dict[str, Column]):
        self.columns = columns
        self.clear()

    def clear(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in self.columns}
        self.rows = 0
        self.nbytes = 0

    def add(self, arrays: dict[str, np.ndarray], rows: int) -> None:
        for name, array in arrays.items():
            self.parts[name].append(array)
            self.nbytes += array.nbytes
        self.rows += rows

    def take(self) -> dict[str, np.ndarray]:
        """Everything buffered, one array per column; empties the buffer."""
        block = {
            name: np.concatenate(parts) if parts else np.empty((0, *col.shape), col.dtype)
            for (name, parts), col in zip(self.parts.items(), self.columns.values())
        }
        self.clear()
        return block


def _write_rows(dataset: h5py.Dataset, start: int, rows: np.ndarray) -> None:
    """Grow ``dataset`` and write ``rows`` at ``start``. The one place data reaches the file (tests patch it)."""
    dataset.resize(start + len(rows), axis=0)
    dataset[start : start + len(rows)] = rows


class RunWriter:
    """Writes one rank's run store: ``append_step`` per optimizer step, committed every ``flush_every`` steps.

    A crash (even ``kill -9``) leaves a file whose committed steps are whole and readable; anything written after
    the last commit is ignored by readers and cut off by ``resume=True``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        run_id: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        config: Mapping[str, Any] | None = None,
        coverage: Mapping[str, Any] | None = None,
        step_columns: Mapping[str, Column | tuple] | None = None,
        record_columns: Mapping[str, Column | tuple] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        flush_every: int = 100,
        max_buffer_bytes: int = 64 << 20,
        compression: str | None = "gzip",
    ):
        """Create the file now (so a bad path fails before training starts), or open it with ``resume=True``.

        ``run_id``: shared by all ranks of one run (a new one when None). ``config``/``coverage``: JSON-able dicts
        stored as root attributes. Columns map name -> ``(dtype, row_shape)`` or ``Column``; on resume, None means
        "the file's columns". ``compression``: applied by ``close()``, which rewrites the finished file with it:
        "gzip" (level 4 + shuffle, readable everywhere), "lzf" (faster, h5py only) or None (keep it uncompressed,
        e.g. for very large stores). While the run is live the file is uncompressed (see the module docstring).
        """
        if overwrite and resume:
            raise ValueError("pass either overwrite=True (start a new file) or resume=True (append), not both")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..world_size-1 (world_size={world_size})")
        _compression_options(compression)  # validate before touching the disk
        self.path = Path(path)
        self.compression = compression
        self.flush_every = int(flush_every)
        self.max_buffer_bytes = int(max_buffer_bytes)
        self._failed: BaseException | None = None
        self._closed = False
        self._committed = (0, 0)  # (steps, rows) in the file; the attributes' value, kept here for speed
        if resume:
            self._file = self._open_existing(run_id, rank, world_size, step_columns, record_columns)
        else:
            self._file = self._create_new(run_id or new_run_id(), rank, world_size, step_columns, record_columns,
                                          overwrite)
        self._steps, self._records = self._file[STEPS], self._file[RECORDS]
        self.step_columns, self.record_columns = table_columns(self._steps), table_columns(self._records)
        self._step_buf, self._record_buf = _Buffer(self.step_columns), _Buffer(self.record_columns)
        if resume:
            self._cut_uncommitted_tail()
        self._last_step = self._read_last_step()
        if config is not None:
            self.set_config(config)
        if coverage is not None:
            self.set_coverage(coverage)
        self._file.flush()

    # -- opening ---------------------------------------------------------------------------------------------------

    def _create_new(self, run_id, rank, world_size, step_columns, record_columns, overwrite):
        step_cols = _as_columns(step_columns or DEFAULT_STEP_COLUMNS, REQUIRED_STEP_COLUMNS, "step")
        record_cols = _as_columns(record_columns or DEFAULT_RECORD_COLUMNS, REQUIRED_RECORD_COLUMNS, "record")
        if self.path.is_dir():
            raise StoreIOError(
                f"run store path {self.path} is a folder; give a file name such as {self.path / 'run.h5'}"
            )
        if self.path.exists() and not overwrite:
            raise FileExistsError(
                f"run store {self.path} already exists. Pass overwrite=True to replace it, resume=True to append to "
                "it, or choose another path."
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreIOError(
                f"cannot create the folder of run store {self.path}: {err}. Choose a writable path."
            ) from err
        try:
            _remove_stale_repack(self.path)
            file = h5py.File(self.path, "w", **CREATE_OPTIONS)
        except OSError as err:
            raise _wrap_open_error(self.path, err, "w") from err
        try:
            self._write_header(file, run_id, rank, world_size)
            _create_table(file.create_group(STEPS, track_order=True), step_cols)
            _create_table(file.create_group(RECORDS, track_order=True), record_cols)
            file.flush()
        except OSError as err:
            file.close()
            raise StoreIOError(
                f"cannot write run store {self.path}: {err}. Choose a writable path with free space."
            ) from err
        return file

    @staticmethod
    def _write_header(file: h5py.File, run_id: str, rank: int, world_size: int) -> None:
        attrs = file.attrs
        attrs["format"] = FORMAT
        attrs["schema_version"] = SCHEMA_VERSION
        attrs["inrun_version"] = _inrun_version()
        attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        attrs["run_id"] = str(run_id)
        attrs["rank"] = int(rank)
        attrs["world_size"] = int(world_size)
        attrs["config"] = "{}"
        attrs["coverage"] = "{}"
        attrs["committed_steps"] = 0
        attrs["committed_rows"] = 0

    def _open_existing(self, run_id, rank, world_size, step_columns, record_columns):
        if not self.path.is_file():
            raise FileNotFoundError(
                f"cannot resume run store {self.path}: no such file. Drop resume=True to start one."
            )
        _remove_stale_repack(self.path)
        if _check_resumable(self.path, run_id, rank, world_size, step_columns, record_columns):
            repack(self.path, None)  # appending to compressed chunks is not crash-safe
        try:
            return h5py.File(self.path, "r+", **OPEN_OPTIONS)
        except OSError as err:
            raise _wrap_open_error(self.path, err, "r+") from err

    def _cut_uncommitted_tail(self) -> None:
        """Shrink every dataset back to the committed lengths: rows written after the last commit are dropped."""
        steps, rows = committed_counts(self._file, self.path)
        self._resize_tables(steps, rows)
        self._file.attrs["committed_rows"] = rows
        self._committed = (steps, rows)
        self._file.flush()

    def _resize_tables(self, steps: int, rows: int) -> None:
        for ds in self._steps.values():
            ds.resize(steps, axis=0)
        for ds in self._records.values():
            ds.resize(rows, axis=0)

    def _read_last_step(self) -> int | None:
        n = self.committed_steps
        return int(self._steps["step"][n - 1]) if n else None

    # -- state ------------------------------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return str(self._file.attrs["run_id"])

    @property
    def rank(self) -> int:
        return int(self._file.attrs["rank"])

    @property
    def world_size(self) -> int:
        return int(self._file.attrs["world_size"])

    @property
    def committed_steps(self) -> int:
        """Steps that are safely in the file."""
        return self._committed[0]

    @property
    def committed_rows(self) -> int:
        """Record rows of the committed steps."""
        return self._committed[1]

    @property
    def num_steps(self) -> int:
        """Steps appended so far: committed plus buffered."""
        return self.committed_steps + self._step_buf.rows

    @property
    def last_step(self) -> int | None:
        """The step number of the last appended step (None before the first)."""
        return self._last_step

    # -- writing ----------------------------------------------------------------------------------------------------

    def append_step(self, step_row: Mapping[str, Any], record_rows: Mapping[str, Any]) -> int:
        """Buffer one optimizer step and its batch's records; commit when ``flush_every`` steps are buffered.

        ``step_row`` maps step columns to scalars (``step`` defaults to the next number; ``n_samples`` and
        ``row_start`` are filled here). ``record_rows`` maps record columns to arrays of one common length n
        (``step`` is filled here). Float columns left out are NaN. Returns the step number.
        """
        self._check_usable()
        step = self._next_step(step_row)
        records, n = self._record_block(record_rows, step)
        row_start = self.committed_rows + self._record_buf.rows
        steps = self._step_block(step_row, step=step, n_samples=n, row_start=row_start)
        self._record_buf.add(records, n)
        self._step_buf.add(steps, 1)
        self._last_step = step
        if self._step_buf.rows >= self.flush_every or self._buffered_bytes() >= self.max_buffer_bytes:
            self.flush()
        return step

    def _next_step(self, step_row: Mapping[str, Any]) -> int:
        if "step" not in step_row:
            return 0 if self._last_step is None else self._last_step + 1
        step = int(step_row["step"])
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"step {step} does not follow the last step {self._last_step} in {self.path}; step numbers must "
                "increase. After resuming from an older checkpoint call truncate_to_step(checkpoint_step) first."
            )
        return step

    def _record_block(self, record_rows: Mapping[str, Any], step: int) -> tuple[dict[str, np.ndarray], int]:
        _reject_unknown(record_rows, self.record_columns, ("step",), "record", self.path)
        given = {name: np.asarray(value) for name, value in record_rows.items()}
        lengths = {name: (a.shape[0] if a.ndim else None) for name, a in given.items()}
        n = next(iter(lengths.values()), 0)
        if n is None or any(length != n for length in lengths.values()):
            raise ValueError(f"record arrays must share one length (the batch size); got lengths {lengths}")
        block = {}
        for name, col in self.record_columns.items():
            if name == "step":
                block[name] = np.full(n, step, col.dtype)
            elif name in given:
                block[name] = _cast_rows(name, given[name], col, n)
            else:
                block[name] = np.full((n, *col.shape), _fill_value(name, col), col.dtype)
        return block, n

    def _step_block(self, step_row: Mapping[str, Any], **filled: int) -> dict[str, np.ndarray]:
        _reject_unknown(step_row, self.step_columns, WRITER_STEP_COLUMNS, "step", self.path)
        block = {}
        for name, col in self.step_columns.items():
            value = filled[name] if name in filled else step_row.get(name, None)
            if value is None:
                value = np.full(col.shape, _fill_value(name, col), col.dtype) if col.shape else _fill_value(name, col)
            block[name] = _cast_rows(name, np.asarray(value)[None], col, 1)
        return block

    def _buffered_bytes(self) -> int:
        return self._step_buf.nbytes + self._record_buf.nbytes

    def flush(self) -> None:
        """Commit every buffered step: records, then steps, flush, then the committed counts, flush again.

        The counts are flushed only after the data they cover is on disk, so a crash at any moment leaves them
        pointing at whole steps. On a write error the writer stops and raises ``StoreIOError``.
        """
        self._check_usable()
        if self._step_buf.rows == 0:
            return
        steps_before, rows_before = self.committed_steps, self.committed_rows
        n_steps, n_rows = self._step_buf.rows, self._record_buf.rows
        records, steps = self._record_buf.take(), self._step_buf.take()
        try:
            for name, rows in records.items():
                _write_rows(self._records[name], rows_before, rows)
            for name, rows in steps.items():
                _write_rows(self._steps[name], steps_before, rows)
            self._file.flush()
            self._set_committed(steps_before + n_steps, rows_before + n_rows)
        except (OSError, RuntimeError) as err:
            self._failed = err
            raise StoreIOError(
                f"writing run store {self.path} failed: {err}. The {steps_before} steps committed before stay "
                f"readable; the {n_steps} buffered steps are lost. Free space (or fix the file system) and continue "
                "with resume=True."
            ) from err

    def _set_committed(self, steps: int, rows: int) -> None:
        self._file.attrs["committed_steps"] = steps
        self._file.attrs["committed_rows"] = rows
        self._file.flush()
        self._committed = (steps, rows)

    def truncate_to_step(self, step: int) -> None:
        """Drop every step numbered ``step`` or later (and its records), e.g. to resume from an older checkpoint.

        With steps recorded from 0 without gaps this keeps the first ``step`` steps.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.flush()
        n = self.committed_steps
        numbers = self._steps["step"][:n]
        keep = int(np.searchsorted(numbers, step, side="left"))
        if keep == n:
            return
        rows = int(self._steps["row_start"][keep])
        try:
            self._set_committed(keep, rows)  # shrink the counts first: a crash in between loses nothing committed
            self._resize_tables(keep, rows)
            self._file.flush()
        except (OSError, RuntimeError) as err:
            self._failed = err
            raise StoreIOError(f"truncating run store {self.path} failed: {err}") from err
        self._last_step = int(numbers[keep - 1]) if keep else None

    def write_static(self, path: str, data: Any = None, attrs: Mapping[str, Any] | None = None) -> None:
        """Store a static array at ``path``, e.g. ``projections/fc1`` or ``sources/names`` (a list of strings),
        replacing an earlier one. With ``data=None`` only the group at ``path`` is made (kept if it exists) and
        ``attrs`` set. ``attrs``: scalars, strings, or lists/dicts (stored as JSON text)."""
        self._check_usable()
        path = path.strip("/")
        if not path or path.split("/")[0] in (STEPS, RECORDS):
            raise ValueError(f"static path {path!r} must name a group or dataset outside 'steps' and 'records'")
        if data is None:
            obj = self._file.require_group(path)
        else:
            if path in self._file:
                del self._file[path]
            obj = _create_static_dataset(self._file, path, data)
        for key, value in (attrs or {}).items():
            obj.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
        self._file.flush()

    def set_config(self, config: Mapping[str, Any]) -> None:
        """Replace the stored run configuration (a JSON-able dict); on disk at the next commit."""
        self._file.attrs["config"] = json.dumps(dict(config), sort_keys=True, default=str)

    def set_coverage(self, coverage: Mapping[str, Any]) -> None:
        """Replace the stored coverage description (a JSON-able dict); on disk at the next commit."""
        self._file.attrs["coverage"] = json.dumps(dict(coverage), sort_keys=True, default=str)

    # -- closing ----------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Commit what is buffered, close the file and rewrite it with ``compression`` (atomically: a crash
        meanwhile keeps the uncompressed file). After a write failure only closes. Safe to call twice."""
        if self._closed:
            return
        try:
            if self._failed is None:
                self.flush()
        finally:
            self._closed = True
            try:
                self._file.close()
            except (OSError, RuntimeError) as err:
                if self._failed is None:
                    raise StoreIOError(f"closing run store {self.path} failed: {err}") from err
        if self._failed is None and self.compression is not None:
            try:
                repack(self.path, self.compression)
            except (OSError, RuntimeError) as err:
                warnings.warn(f"could not compress run store {self.path} ({err}); it stays uncompressed and complete",
                              RuntimeWarning, stacklevel=2)

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the steps appended so far are whole: keep them, without hiding the original error
            self.close()
        except StoreError:
            pass

    def _check_usable(self) -> None:
        if self._closed:
            raise StoreError(f"run store writer for {self.path} is closed")
        if self._failed is not None:
            raise StoreIOError(
                f"run store writer for {self.path} stopped after a write error ({self._failed}); "
                "open it again with resume=True"
            )


def _cast_rows(name: str, array: np.ndarray, col: Column, n: int) -> np.ndarray:
    if array.shape != (n, *col.shape):
        raise ValueError(f"column {name!r} needs shape {(n, *col.shape)} for this step, got {array.shape}")
    return np.ascontiguousarray(array, dtype=col.dtype)


def _reject_unknown(row: Mapping[str, Any], columns: dict, filled: tuple[str, ...], table: str, path: Path) -> None:
    unknown = [name for name in row if name not in columns]
    if unknown:
        raise KeyError(f"{table} columns {unknown} are not in {path}; its {table} columns are {list(columns)}")
    written = [name for name in row if name in filled]
    if written:
        raise ValueError(f"{table} columns {written} are filled by the writer; leave them out")


def _create_static_dataset(file: h5py.File, path: str, data: Any) -> h5py.Dataset:
    array = np.asarray(data)
    if array.dtype.kind in "UOS":
        strings = np.asarray([str(s) for s in array.ravel()], dtype=object).reshape(array.shape)
        return file.create_dataset(path, data=strings, dtype=h5py.string_dtype("utf-8"))
    return file.create_dataset(path, data=array)  # uncompressed while live; close() compresses large ones


def _check_resumable(path: Path, run_id: str | None, rank: int, world_size: int,
                     step_columns: Mapping[str, Any] | None, record_columns: Mapping[str, Any] | None) -> bool:
    """Raise a clear error unless the store at ``path`` can be resumed as asked; return whether it is compressed."""
    with RankFile(path) as f:
        _check_identity(f, run_id, rank, world_size)
        _check_columns(f.file[STEPS], step_columns, "step", path)
        _check_columns(f.file[RECORDS], record_columns, "record", path)
        return any(ds.compression is not None for table in (STEPS, RECORDS) for ds in f.file[table].values())


def _check_identity(f: "RankFile", run_id: str | None, rank: int, world_size: int) -> None:
    stored = {"run_id": f.run_id, "rank": f.rank, "world_size": f.world_size}
    asked = {"run_id": f.run_id if run_id is None else str(run_id), "rank": rank, "world_size": world_size}
    wrong = {key: (stored[key], asked[key]) for key in stored if stored[key] != asked[key]}
    if wrong:
        details = ", ".join(f"{key} is {old!r} in the file but {new!r} was asked" for key, (old, new) in wrong.items())
        raise IncompatibleStoreError(
            f"cannot resume run store {f.path}: {details}. Resume with the same run id, rank and world size, "
            "or start a new store (overwrite=True or another path)."
        )


def _check_columns(group: h5py.Group, asked: Mapping[str, Any] | None, table: str, path: Path) -> None:
    if asked is None:
        return
    stored = table_columns(group)
    wanted = {name: as_column(spec) for name, spec in asked.items()}
    if {n: (c.dtype, c.shape) for n, c in stored.items()} != {n: (c.dtype, c.shape) for n, c in wanted.items()}:
        raise IncompatibleStoreError(
            f"cannot resume run store {path}: its {table} columns "
            f"{ {n: (str(c.dtype), c.shape) for n, c in stored.items()} } differ from the requested "
            f"{ {n: (str(c.dtype), c.shape) for n, c in wanted.items()} }. Resume with the same columns "
            f"(or {table}_columns=None)."
        )


# ------------------------------------------------------------------------------------------------------------ repack


def repack(path: str | Path, compression: str | None = "gzip") -> None:
    """Rewrite a closed store with ``compression`` (None: uncompressed), keeping only committed rows.

    Writes ``<path>.repack.tmp``, syncs it to disk, then renames it over ``path``: a crash at any moment leaves
    either the old file or the new one. Also useful to compress the file of a run that crashed.
    """
    path = Path(path)
    _compression_options(compression)  # validate
    tmp = path.with_name(path.name + REPACK_SUFFIX)
    try:
        with h5py.File(path, "r") as src:
            check_header(src.attrs, path)
            file_options = {"libver": LIBVER} if compression else CREATE_OPTIONS
            with h5py.File(tmp, "w", **file_options) as dst:
                _copy_store(src, dst, path, compression)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_store(src: h5py.File, dst: h5py.File, path: Path, compression: str | None) -> None:
    steps, rows = committed_counts(src, path)
    for key, value in src.attrs.items():
        dst.attrs[key] = value
    dst.attrs["committed_rows"] = rows
    for table, n in ((STEPS, steps), (RECORDS, rows)):
        columns = table_columns(src[table])
        _create_table(dst.create_group(table, track_order=True), columns, compression)
        for name in columns:
            _copy_rows(src[table][name], dst[table][name], n)
    for name in src:
        if name not in (STEPS, RECORDS):
            _copy_static(src[name], dst, compression)


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, n: int) -> None:
    dst.resize(n, axis=0)
    chunk_rows = dst.chunks[0]  # whole chunks per block: no chunk is compressed twice
    block = chunk_rows * max(1, COPY_BLOCK_ELEMENTS // (chunk_rows * math.prod(src.shape[1:])))
    for start in range(0, n, block):
        stop = min(n, start + block)
        dst[start:stop] = src[start:stop]


def _copy_static(obj: h5py.Group | h5py.Dataset, dst_parent: h5py.Group, compression: str | None) -> None:
    """Copy a static group or dataset; large numeric datasets are (re)written with ``compression``."""
    name = obj.name.rsplit("/", 1)[-1]
    if isinstance(obj, h5py.Group):
        group = dst_parent.create_group(name)
        for key, value in obj.attrs.items():
            group.attrs[key] = value
        for child in obj.values():
            _copy_static(child, group, compression)
        return
    if obj.dtype.kind in "biuf" and obj.size >= CHUNK_ELEMENTS:
        ds = dst_parent.create_dataset(name, data=obj[()], **_compression_options(compression))
        for key, value in obj.attrs.items():
            ds.attrs[key] = value
    else:
        obj.file.copy(obj, dst_parent, name=name)


def _remove_stale_repack(path: Path) -> None:
    """Drop the temporary file of a repack that was interrupted (the store itself is intact)."""
    path.with_name(path.name + REPACK_SUFFIX).unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------------------ reading


def committed_counts(file: h5py.File, path: Path) -> tuple[int, int]:
    """(steps, rows) that are committed: ``committed_steps`` and the rows those steps cover.

    Rows are derived from the committed steps' ``row_start`` + ``n_samples``, so they always cover whole steps.
    """
    steps_table, records_table = file[STEPS], file[RECORDS]
    steps = int(file.attrs["committed_steps"])
    if steps > steps_table["step"].shape[0]:
        raise StoreError(f"run store {path} is damaged: {steps} steps committed but only "
                         f"{steps_table['step'].shape[0]} stored")
    rows = 0
    if steps:
        rows = int(steps_table["row_start"][steps - 1]) + int(steps_table["n_samples"][steps - 1])
    if rows > records_table["sample_id"].shape[0]:
        raise StoreError(f"run store {path} is damaged: {rows} records committed but only "
                         f"{records_table['sample_id'].shape[0]} stored")
    return steps, rows


class RankFile:
    """Read-only view of one rank's store: header attributes and the committed part of both tables."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            if not self.path.exists():
                raise FileNotFoundError(f"run store {self.path} does not exist") from err
            raise _wrap_open_error(self.path, err, "r") from err
        try:
            check_header(self.file.attrs, self.path)
            self.committed_steps, self.committed_rows = committed_counts(self.file, self.path)
        except BaseException:
            self.file.close()
            raise
        attrs = self.file.attrs
        self.run_id = str(attrs["run_id"])
        self.rank = int(attrs["rank"])
        self.world_size = int(attrs["world_size"])
        self.schema_version = int(attrs["schema_version"])
        self.inrun_version = str(attrs.get("inrun_version", "unknown"))
        self.created = str(attrs.get("created", ""))

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.file.attrs.get("config", "{}"))

    @property
    def coverage(self) -> dict[str, Any]:
        return json.loads(self.file.attrs.get("coverage", "{}"))

    @property
    def step_columns(self) -> dict[str, Column]:
        return table_columns(self.file[STEPS])

    @property
    def record_columns(self) -> dict[str, Column]:
        return table_columns(self.file[RECORDS])

    def step_column(self, name: str) -> np.ndarray:
        """Column ``name`` of the committed steps."""
        return _column(self.file[STEPS], name, 0, self.committed_steps, self.path)

    def record_column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` (default: all committed) of record column ``name``."""
        stop = self.committed_rows if stop is None else min(stop, self.committed_rows)
        return _column(self.file[RECORDS], name, start, stop, self.path)

    def has_static(self, path: str) -> bool:
        return path.strip("/") in self.file

    def static(self, path: str) -> np.ndarray:
        """A static array written with ``RunWriter.write_static`` (strings come back as a str array)."""
        ds = self.file[path.strip("/")]
        if h5py.check_string_dtype(ds.dtype) is not None:
            return np.asarray(ds.asstr()[()], dtype=str)
        return ds[()]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "RankFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _column(group: h5py.Group, name: str, start: int, stop: int, path: Path) -> np.ndarray:
    if name not in group:
        raise KeyError(f"column {name!r} is not in {path}/{group.name.strip('/')}; columns: {list(group)}")
    return group[name][start:stop]
