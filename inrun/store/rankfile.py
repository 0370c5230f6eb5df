"""``RankFile``: the low-level read-only view of one rank's store (header and the committed rows of both tables).

:mod:`inrun.store.reader` builds the user-facing ``Run`` on it; the writer uses it to check a store before resuming.

Reading a live store (one a writer still holds, :func:`inrun.store.lock.is_locked`): files are opened without
HDF5's file lock, and a ``RankFile`` is a snapshot of the steps committed when it was opened. The writer never
changes committed rows, but it does extend HDF5's chunk index and object headers, which a long-open handle would
hold stale copies of; so for a live store every read opens the file afresh, and an open that meets a half-written
index is retried. Open the run again to see newer steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from inrun.store.idbitmap import STORED_GROUP, STORED_NAME
from inrun.store.lock import is_locked
from inrun.store.schema import (
    READ_OPTIONS,
    RECORDS,
    STEPS,
    Column,
    StoreError,
    check_header,
    damaged_error,
    open_error,
    table_columns,
)

LIVE_OPEN_ATTEMPTS = 5  # a live store's open is retried this often (20-100 ms apart) if it meets a half-written index


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
    """Read-only view of one rank's store: header attributes and the committed part of both tables.

    ``live``: whether a writer still holds the store (None: find out). A live store is read as a snapshot of the
    steps committed at open, each read on a fresh handle (module docstring).
    """

    def __init__(self, path: str | Path, live: bool | None = None):
        self.path = Path(path)
        self.live = is_locked(self.path) if live is None else live
        self.file = self._open_retrying(LIVE_OPEN_ATTEMPTS if self.live else 1)
        attrs = self.file.attrs
        self.run_id = str(attrs["run_id"])
        self.rank = int(attrs["rank"])
        self.world_size = int(attrs["world_size"])
        self.schema_version = int(attrs["schema_version"])
        self.inrun_version = str(attrs.get("inrun_version", "unknown"))
        self.created = str(attrs.get("created", ""))

    def _open_retrying(self, attempts: int) -> h5py.File:
        for attempt in range(attempts):
            try:
                return self._open()
            except StoreError:
                if attempt == attempts - 1 or not self.path.exists():
                    raise
                time.sleep(0.02 * (attempt + 1))
        raise AssertionError("unreachable")

    def _open(self) -> h5py.File:
        """Open the file and read its header and committed counts; a damaged file raises ``DamagedStoreError``."""
        try:
            file = h5py.File(self.path, "r", **READ_OPTIONS)
        except OSError as err:
            if not self.path.exists():
                raise FileNotFoundError(f"run store {self.path} does not exist") from err
            raise open_error(self.path, err, "r") from err
        try:
            check_header(file.attrs, self.path)
            counts = committed_counts(file, self.path)
            if not hasattr(self, "committed_steps"):
                self.committed_steps, self.committed_rows = counts
            elif str(file.attrs["run_id"]) != self.run_id:
                raise StoreError(f"run store {self.path} was replaced by another run while being read; open it again")
            elif counts[0] < self.committed_steps:
                raise StoreError(f"run store {self.path} was cut back (a resume from an older checkpoint) while "
                                 "being read; open it again")
        except StoreError:
            file.close()
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:  # HDF5 or layout trouble
            file.close()
            raise damaged_error(self.path, err) from err
        except BaseException:
            file.close()
            raise
        return file

    def _fresh(self) -> h5py.File:
        """The handle to read from: for a live store a newly opened one (stale index copies dropped)."""
        if self.live:
            self.file.close()
            self.file = self._open_retrying(LIVE_OPEN_ATTEMPTS)
        return self.file

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
        return _column(self._fresh()[STEPS], name, 0, self.committed_steps, self.path)

    def record_column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` (default: all committed) of record column ``name``."""
        stop = self.committed_rows if stop is None else min(stop, self.committed_rows)
        return _column(self._fresh()[RECORDS], name, start, stop, self.path)

    def id_bitmap(self) -> tuple[int, np.ndarray] | None:
        """``(lo, words)``: the bitmap of this file's sample ids that the close-time compression stored, or None
        (a live or uncompressed store, sparse ids, or a bitmap that does not cover exactly the committed rows)."""
        if self.live:
            return None
        if not self.committed_rows:  # no ids at all (the compression stores no bitmap then)
            return 0, np.zeros(0, np.uint64)
        if STORED_GROUP not in self.file or STORED_NAME not in self.file[STORED_GROUP]:
            return None
        ds = self.file[STORED_GROUP][STORED_NAME]
        if (int(ds.attrs.get("rows", -1)), int(ds.attrs.get("steps", -1))) != (self.committed_rows,
                                                                                self.committed_steps):
            return None
        return int(ds.attrs["lo"]), ds[()]

    def has_static(self, path: str) -> bool:
        return path.strip("/") in self.file

    def static(self, path: str) -> np.ndarray:
        """A static array written with ``RunWriter.write_static`` (strings come back as a str array)."""
        ds = self._fresh()[path.strip("/")]
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
