"""``RunWriter``: appends one rank's steps and records under a commit protocol that survives ``kill -9``.

Rows are buffered in memory and committed in blocks: space is reserved, records and steps written, the file flushed
and synced, and only then the committed counts written and synced, so the counts only ever cover whole steps that
are on disk. A write error at any point stops the writer *before* the counts are written (see
:mod:`inrun.store.durability` for how errors that h5py would swallow are caught).

One writer per store: the writer takes the store's lock (:mod:`inrun.store.lock`) before it touches anything. A new
store is written under a temporary name and renamed into place, so a crash during creation leaves no store (or the
old one, with ``overwrite=True``), and a reader that has the old file open keeps reading it whole.

Why the live file is uncompressed: HDF5 stores a compressed chunk at a new place each time it is rewritten and
frees the old place, which it may reuse at once. A partly filled chunk holding committed rows is rewritten by the
next block, so a crash could leave the last flushed index pointing at overwritten bytes (seen in 17 of 20 kill -9
trials). Uncompressed chunks never move and their committed bytes are rewritten with the same values, so every
committed step survives. ``close()`` then rewrites the finished file compressed (:mod:`inrun.store.compression`).

A commit writes each buffered part straight into its slice of the dataset (no joined copy of the block). With
``background=True`` (off by default) the commits that ``append_step`` starts run in a writer thread, one block in
flight, under the same protocol; its error is raised on the training thread by the next call, and nothing is
committed after it. What it can take off the training thread is mostly the ``fsync`` (h5py holds the GIL while it
writes); a caller may not change arrays it has given to ``append_step`` until they are committed (true without it
too: rows wait in the buffer until the next commit).
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from inrun.store.compression import remove_stale_repack, repack
from inrun.store.durability import SwallowedErrors, chunked_bytes, free_bytes, fsync_path, reserve, sync
from inrun.store.faults import fault_point
from inrun.store.lock import StoreLock
from inrun.store.paths import new_run_id
from inrun.store.rankfile import RankFile, committed_counts
from inrun.store.schema import (
    CREATE_OPTIONS,
    DEFAULT_RECORD_COLUMNS,
    DEFAULT_STEP_COLUMNS,
    FORMAT,
    OPEN_OPTIONS,
    RECORDS,
    REQUIRED_RECORD_COLUMNS,
    REQUIRED_STEP_COLUMNS,
    SCHEMA_VERSION,
    STEPS,
    Column,
    IncompatibleStoreError,
    StoreError,
    StoreIOError,
    as_column,
    as_columns,
    compression_options,
    create_table,
    fill_value,
    inrun_version,
    open_error,
    table_columns,
)

WRITER_STEP_COLUMNS = ("n_samples", "row_start")

CREATE_SUFFIX = ".new.tmp"  # a store being created, renamed into place once its header and tables are written

#: ``INRUN_STORE_BACKGROUND=1`` turns the background writer on for writers created with ``background=None``
BACKGROUND_ENV = "INRUN_STORE_BACKGROUND"


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

    def take(self) -> dict[str, list[np.ndarray]]:
        """Everything buffered, as the list of parts each column was given in (no join); empties the buffer."""
        parts = self.parts
        self.clear()
        return parts


#: a column whose buffered parts hold at most this many bytes is joined and written in one call (a small copy costs
#: less than h5py's per-call overhead); larger ones are written part by part into their slices, never copied
JOIN_BELOW_BYTES = 1 << 20


def _write_rows(dataset: h5py.Dataset, start: int, parts: list[np.ndarray]) -> None:
    """Grow ``dataset`` once and write the buffered ``parts`` one after another from row ``start``. The one place
    data reaches the file (tests patch it).

    Large columns (projected gradients) are written straight from the arrays ``append_step`` was given into their
    slices of the dataset: joining them first would copy every buffered byte once more (tens of MB per commit with
    embeddings) and touch as much fresh memory."""
    n = sum(len(part) for part in parts)
    if n == 0:
        return
    dataset.resize(start + n, axis=0)
    if len(parts) > 1 and sum(part.nbytes for part in parts) <= JOIN_BELOW_BYTES:
        parts = [np.concatenate(parts)]
    for part in parts:
        if len(part):
            dataset[start : start + len(part)] = part
            start += len(part)


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
        background: bool | None = None,
    ):
        """Create the file now (so a bad path fails before training starts), or open it with ``resume=True``.

        ``run_id``: shared by all ranks of one run (a new one when None). ``config``/``coverage``: JSON-able dicts
        stored as root attributes. Columns map name -> ``(dtype, row_shape)`` or ``Column``; on resume, None means
        "the file's columns". ``compression``: applied by ``close()``, which rewrites the finished file with it:
        "gzip" (level 4 + shuffle, readable everywhere), "lzf" (faster, h5py only) or None (keep it uncompressed,
        e.g. for very large stores). While the run is live the file is uncompressed (see the module docstring).

        ``background=True``: the commits that ``append_step`` starts run in a writer thread (same protocol, same
        order on disk), so the training thread only waits for the previous block, at most one block in flight
        (memory up to twice ``max_buffer_bytes``). A write error there stops the writer and is raised as the same
        ``StoreIOError`` by the next call on the training thread (``append_step``, ``flush``, ``close``...); no
        commit follows it. ``flush()``, ``close()`` and the other calls that touch the file wait for the block in
        flight. None: on when the environment variable ``INRUN_STORE_BACKGROUND`` is 1 (default off).
        """
        if overwrite and resume:
            raise ValueError("pass either overwrite=True (start a new file) or resume=True (append), not both")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..world_size-1 (world_size={world_size})")
        compression_options(compression)  # validate before touching the disk
        self.path = Path(path)
        self.compression = compression
        self.flush_every = int(flush_every)
        self.max_buffer_bytes = int(max_buffer_bytes)
        self._failed: BaseException | None = None
        self._closed = False
        self._committed = (0, 0)  # (steps, rows) in the file; the attributes' value, kept here for speed
        self._taken = (0, 0)  # (steps, rows) committed or handed to the block in flight
        if background is None:
            background = os.environ.get(BACKGROUND_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        self.background = bool(background)
        self._pending: threading.Thread | None = None  # the background commit in flight
        self._pending_error: BaseException | None = None  # what it raised, not yet raised on the training thread
        if resume:
            self._check_resume_path()
        else:
            self._check_new_path(overwrite)
        self._lock = StoreLock(self.path)  # one writer per store, before anything is created or changed
        try:
            if resume:
                self._file = self._open_existing(run_id, rank, world_size, step_columns, record_columns)
            else:
                self._check_new_path(overwrite)  # again under the lock: another writer may have created it meanwhile
                self._file = self._create_new(run_id or new_run_id(), rank, world_size, step_columns,
                                              record_columns, config, coverage)
            # one handle per dataset for the writer's life: chunks then reach the disk in File.flush(), which
            # raises on a write error, never in a dataset's destructor, which cannot (durability.py)
            self._steps = dict(self._file[STEPS].items())
            self._records = dict(self._file[RECORDS].items())
            self.step_columns, self.record_columns = table_columns(self._steps), table_columns(self._records)
            self._step_buf, self._record_buf = _Buffer(self.step_columns), _Buffer(self.record_columns)
            if resume:
                fault_point("resume")
                self._cut_uncommitted_tail()
            self._last_step = self._read_last_step()
            if resume and config is not None:
                self.set_config(config)
            if resume and coverage is not None:
                self.set_coverage(coverage)
            sync(self._file)
        except BaseException:
            file = getattr(self, "_file", None)
            if file is not None:
                file.close()
            self._lock.release()
            raise

    # -- opening ---------------------------------------------------------------------------------------------------

    def _check_new_path(self, overwrite: bool) -> None:
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

    def _create_new(self, run_id, rank, world_size, step_columns, record_columns, config, coverage):
        """Write the empty store under a temporary name, sync it and rename it into place (replacing an old store
        with ``overwrite=True``: a reader holding the old file keeps reading it), then open it to append."""
        step_cols = as_columns(step_columns or DEFAULT_STEP_COLUMNS, REQUIRED_STEP_COLUMNS, "step")
        record_cols = as_columns(record_columns or DEFAULT_RECORD_COLUMNS, REQUIRED_RECORD_COLUMNS, "record")
        tmp = self.path.with_name(self.path.name + CREATE_SUFFIX)
        remove_stale_repack(self.path)
        try:
            tmp.unlink(missing_ok=True)
            file = h5py.File(tmp, "w", **CREATE_OPTIONS)
        except OSError as err:
            raise open_error(tmp, err, "w") from err
        try:
            with SwallowedErrors() as swallowed:
                self._write_header(file, run_id, rank, world_size)
                if config is not None:
                    file.attrs["config"] = _json(config)
                if coverage is not None:
                    file.attrs["coverage"] = _json(coverage)
                create_table(file.create_group(STEPS, track_order=True), step_cols)
                create_table(file.create_group(RECORDS, track_order=True), record_cols)
                sync(file)
                file.close()
                swallowed.check()
            fault_point("create")
            os.replace(tmp, self.path)
            fsync_path(self.path.parent)
        except (OSError, RuntimeError) as err:
            if file.id.valid:
                file.close()
            tmp.unlink(missing_ok=True)
            raise StoreIOError(
                f"cannot write run store {self.path}: {_cause(err)}. Choose a writable path with free space."
            ) from err
        try:
            return h5py.File(self.path, "r+", **OPEN_OPTIONS)
        except OSError as err:
            raise open_error(self.path, err, "r+") from err

    @staticmethod
    def _write_header(file: h5py.File, run_id: str, rank: int, world_size: int) -> None:
        attrs = file.attrs
        attrs["format"] = FORMAT
        attrs["schema_version"] = SCHEMA_VERSION
        attrs["inrun_version"] = inrun_version()
        attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        attrs["run_id"] = str(run_id)
        attrs["rank"] = int(rank)
        attrs["world_size"] = int(world_size)
        attrs["config"] = "{}"
        attrs["coverage"] = "{}"
        attrs["committed_steps"] = 0
        attrs["committed_rows"] = 0

    def _check_resume_path(self) -> None:
        if not self.path.is_file():
            raise FileNotFoundError(
                f"cannot resume run store {self.path}: no such file. Drop resume=True to start one."
            )

    def _open_existing(self, run_id, rank, world_size, step_columns, record_columns):
        remove_stale_repack(self.path)  # a compression that a crash interrupted: close() compresses again
        self.path.with_name(self.path.name + CREATE_SUFFIX).unlink(missing_ok=True)
        if _check_resumable(self.path, run_id, rank, world_size, step_columns, record_columns):
            repack(self.path, None, holding_lock=True)  # appending to compressed chunks is not crash-safe
        try:
            return h5py.File(self.path, "r+", **OPEN_OPTIONS)
        except OSError as err:
            raise open_error(self.path, err, "r+") from err

    def _cut_uncommitted_tail(self) -> None:
        """Shrink every dataset back to the committed lengths: rows written after the last commit are dropped."""
        steps, rows = committed_counts(self._file, self.path)
        self._resize_tables(steps, rows)
        self._file.attrs["committed_rows"] = rows
        self._committed = self._taken = (steps, rows)
        sync(self._file)

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
        """Steps appended so far: committed, in flight (background writer) and buffered."""
        return self._taken[0] + self._step_buf.rows

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
        row_start = self._taken[1] + self._record_buf.rows
        steps = self._step_block(step_row, step=step, n_samples=n, row_start=row_start)
        self._record_buf.add(records, n)
        self._step_buf.add(steps, 1)
        self._last_step = step
        if self._step_buf.rows >= self.flush_every or self._buffered_bytes() >= self.max_buffer_bytes:
            if self.background:
                self._commit_in_background()
            else:
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
                block[name] = np.full((n, *col.shape), fill_value(name, col), col.dtype)
        return block, n

    def _step_block(self, step_row: Mapping[str, Any], **filled: int) -> dict[str, np.ndarray]:
        _reject_unknown(step_row, self.step_columns, WRITER_STEP_COLUMNS, "step", self.path)
        block = {}
        for name, col in self.step_columns.items():
            value = filled[name] if name in filled else step_row.get(name, None)
            if value is None:
                value = np.full(col.shape, fill_value(name, col), col.dtype) if col.shape else fill_value(name, col)
            block[name] = _cast_rows(name, np.asarray(value)[None], col, 1)
        return block

    def _buffered_bytes(self) -> int:
        return self._step_buf.nbytes + self._record_buf.nbytes

    def flush(self) -> None:
        """Commit every buffered step: records, then steps, flush, then the committed counts, flush again.

        The counts are flushed only after the data they cover is on disk, so a crash at any moment leaves them
        pointing at whole steps. On a write error the writer stops and raises ``StoreIOError``. With the background
        writer this first waits for the block in flight; everything appended is committed when it returns.
        """
        self._check_usable()
        self._wait_pending()
        if self._step_buf.rows == 0:
            return
        self._commit(*self._take_block())

    def _take_block(self) -> tuple:
        """The buffered rows as one block to commit, with where it goes; the buffers start empty again."""
        before = self._taken
        n_steps, n_rows = self._step_buf.rows, self._record_buf.rows
        block = (before, n_steps, n_rows, self._record_buf.take(), self._step_buf.take())
        self._taken = (before[0] + n_steps, before[1] + n_rows)
        return block

    def _commit(self, before: tuple[int, int], n_steps: int, n_rows: int, records: dict, steps: dict) -> None:
        """Write one block and commit it (on the training thread, or in the writer thread)."""
        steps_before, rows_before = before
        try:
            with SwallowedErrors() as swallowed:
                reserve(self._file, chunked_bytes(self._records.values(), rows_before, n_rows)
                        + chunked_bytes(self._steps.values(), steps_before, n_steps))
                for name, parts in records.items():
                    _write_rows(self._records[name], rows_before, parts)
                for name, parts in steps.items():
                    _write_rows(self._steps[name], steps_before, parts)
                fault_point("write")
                sync(self._file)  # the rows are on disk ...
                swallowed.check()
                fault_point("flush")
                self._set_committed(steps_before + n_steps, rows_before + n_rows)  # ... before the counts say so
                swallowed.check()
        except (OSError, RuntimeError) as err:
            self._failed = err
            raise StoreIOError(
                f"writing run store {self.path} failed: {_cause(err)}. Nothing of this block was committed: the "
                f"{self.committed_steps} steps committed before stay whole and readable; the {n_steps} buffered "
                "steps are lost. Training cannot be recorded further: free space (or fix the file system) and "
                "resume from a checkpoint (resume=True)."
            ) from err
        fault_point("commit")

    def _commit_in_background(self) -> None:
        """Hand the buffered block to a writer thread, after the previous one is done (one block in flight)."""
        self._wait_pending()
        block = self._take_block()

        def run() -> None:
            try:
                self._commit(*block)
            except BaseException as err:  # raised on the training thread by its next call
                if self._failed is None:
                    self._failed = err
                self._pending_error = err

        self._pending = threading.Thread(target=run, name=f"inrun-store-writer {self.path.name}")
        self._pending.start()

    def _wait_pending(self) -> None:
        """Wait for the block in flight; raise its error (once) if it failed."""
        pending = self._pending
        if pending is not None:
            pending.join()
            self._pending = None
        self._raise_pending_error()

    def _raise_pending_error(self) -> None:
        err, self._pending_error = self._pending_error, None
        if err is not None:
            raise err

    def _set_committed(self, steps: int, rows: int) -> None:
        self._file.attrs["committed_steps"] = steps
        self._file.attrs["committed_rows"] = rows
        sync(self._file)
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
            self._taken = (keep, rows)  # nothing is buffered or in flight after the flush above
            self._resize_tables(keep, rows)
            sync(self._file)
        except (OSError, RuntimeError) as err:
            self._failed = err
            raise StoreIOError(f"truncating run store {self.path} failed: {_cause(err)}") from err
        self._last_step = int(numbers[keep - 1]) if keep else None

    def write_static(self, path: str, data: Any = None, attrs: Mapping[str, Any] | None = None) -> None:
        """Store a static array at ``path``, e.g. ``projections/fc1`` or ``sources/names`` (a list of strings),
        replacing an earlier one. With ``data=None`` only the group at ``path`` is made (kept if it exists) and
        ``attrs`` set. ``attrs``: scalars, strings, or lists/dicts (stored as JSON text)."""
        self._check_usable()
        self._wait_pending()  # the writer thread's block first: one thing writes to the file at a time
        path = path.strip("/")
        if not path or path.split("/")[0] in (STEPS, RECORDS):
            raise ValueError(f"static path {path!r} must name a group or dataset outside 'steps' and 'records'")
        try:
            with SwallowedErrors() as swallowed:
                reserve(self._file, 0 if data is None else np.asarray(data).nbytes)
                if data is None:
                    obj = self._file.require_group(path)
                else:
                    if path in self._file:
                        del self._file[path]
                    obj = _create_static_dataset(self._file, path, data)
                for key, value in (attrs or {}).items():
                    obj.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
                fault_point("static")
                sync(self._file)
                swallowed.check()
        except (OSError, RuntimeError) as err:
            self._failed = err
            raise StoreIOError(
                f"writing {path!r} to run store {self.path} failed: {_cause(err)}. The {self.committed_steps} committed "
                "steps stay whole and readable; free space and resume from a checkpoint (resume=True)."
            ) from err

    def set_config(self, config: Mapping[str, Any]) -> None:
        """Replace the stored run configuration (a JSON-able dict); on disk at the next commit."""
        self._wait_pending()
        self._file.attrs["config"] = _json(config)

    def set_coverage(self, coverage: Mapping[str, Any]) -> None:
        """Replace the stored coverage description (a JSON-able dict); on disk at the next commit."""
        self._wait_pending()
        self._file.attrs["coverage"] = _json(coverage)

    # -- closing ----------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Commit what is buffered, close the file and rewrite it with ``compression`` (atomically: a crash
        meanwhile keeps the uncompressed file), then release the store's lock. After a write failure only closes
        (nothing more is committed). Safe to call twice."""
        if self._closed:
            return
        try:
            try:
                self._wait_pending()  # a background commit's error surfaces here at the latest
                if self._failed is None:
                    self.flush()
                    fault_point("close")
            finally:
                self._closed = True
                self._close_file()
            if self._failed is None and self.compression is not None:
                self._compress()
        finally:
            self._lock.release()

    def _close_file(self) -> None:
        if self._failed is not None:
            _detach_from_disk(self._file)
        with SwallowedErrors() as swallowed:
            try:
                self._steps, self._records = {}, {}
                self._file.close()
                swallowed.check()
            except (OSError, RuntimeError) as err:
                if self._failed is None:
                    self._failed = err
                    raise StoreIOError(
                        f"closing run store {self.path} failed: {_cause(err)}. The {self.committed_steps} committed steps "
                        "stay whole and readable."
                    ) from err

    def _compress(self) -> None:
        """Rewrite the closed store with ``compression``; when that is impossible, say why and that (and only
        because) the store was checked complete, it stays uncompressed."""
        size = self.path.stat().st_size
        free = free_bytes(self.path.parent)
        reason = None
        if free < size + (1 << 20):  # the compressed copy is at most the size of the file, until it replaces it
            reason = f"compressing needs up to {size / 1e6:.1f} MB free next to it and {free / 1e6:.1f} MB are free"
        else:
            try:
                repack(self.path, self.compression, holding_lock=True)
                return
            except (OSError, RuntimeError) as err:
                reason = str(err)
        with RankFile(self.path, live=False) as f:  # the store itself is untouched: check that before saying it
            complete = (f.committed_steps, f.committed_rows) == self._committed
        if not complete:
            raise StoreIOError(f"run store {self.path} does not hold the {self.committed_steps} steps committed "
                               f"while compressing failed ({reason})")
        warnings.warn(
            f"could not compress run store {self.path} ({reason}); it stays uncompressed and complete (all "
            f"{self.committed_steps} committed steps checked). Compress it later with "
            f"inrun.store.repack(path, {self.compression!r}).", RuntimeWarning, stacklevel=3)

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
        pending = self._pending
        if pending is not None and (self._failed is not None or not pending.is_alive()):
            self._wait_pending()  # a finished (or failing) background commit: its own error, if any
        if self._closed:
            raise StoreError(f"run store writer for {self.path} is closed")
        if self._failed is not None:
            raise StoreIOError(
                f"run store writer for {self.path} stopped after a write error ({_cause(self._failed)}); "
                "open it again with resume=True"
            )


def _detach_from_disk(file: h5py.File) -> None:
    """After a write error: point the file's descriptor at /dev/null, so that closing it writes nothing more to the
    store (it stays as the last commit left it) and HDF5, whose retries of a failed flush otherwise end in a crash
    at exit, closes cleanly."""
    try:
        fd = file.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    except (OSError, RuntimeError, ValueError):
        pass


def _cause(err: BaseException) -> str:
    """An error's text on one line (HDF5's messages span several)."""
    return " ".join(str(err).split())


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), sort_keys=True, default=str)


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
    with RankFile(path, live=False) as f:
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
