"""``RankFile``: the low-level read-only view of one rank's store (header and the committed rows of both tables).

:mod:`inrun.store.reader` builds the user-facing ``Run`` on it; the writer uses it to check a store before resuming.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from inrun.store.schema import RECORDS, STEPS, Column, StoreError, check_header, open_error, table_columns


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
            raise open_error(self.path, err, "r") from err
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
