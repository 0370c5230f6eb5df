"""The run store: one HDF5 file per rank, written under a crash-safe commit protocol, and the reader over it.

* :mod:`~inrun.store.schema`: format, schema version, columns, file options, errors;
* :mod:`~inrun.store.paths`: where a run's files live (rank files, checkpoints, side files);
* :mod:`~inrun.store.writer`: :class:`RunWriter` and its commit protocol;
* :mod:`~inrun.store.lock`: one writer per store; :mod:`~inrun.store.durability`: space reserved, write errors
  caught, data synced before each commit; :mod:`~inrun.store.faults`: named crash/failure points for tests;
* :mod:`~inrun.store.compression`: :func:`repack`, the atomic rewrite with compression at close;
* :mod:`~inrun.store.rankfile`: :class:`RankFile`, the read-only view of one rank's file;
* :mod:`~inrun.store.reader`: :func:`open_run` and :class:`Run`, the user-facing reader over all ranks.

The store needs h5py and numpy only: it imports no torch and none of the code that computes the values.
Layout: docs/store-schema.md.
"""

from inrun.store.compression import repack
from inrun.store.paths import checkpoint_folder, checkpoint_path, find_checkpoints, new_run_id, rank_path
from inrun.store.rankfile import RankFile
from inrun.store.reader import PhaseValues, Run, open_run
from inrun.store.schema import (
    DEFAULT_RECORD_COLUMNS,
    DEFAULT_STEP_COLUMNS,
    SCHEMA_VERSION,
    Column,
    DamagedStoreError,
    IncompatibleStoreError,
    StoreBusyError,
    StoreError,
    StoreIOError,
)
from inrun.store.writer import RunWriter

__all__ = [
    "DEFAULT_RECORD_COLUMNS",
    "DEFAULT_STEP_COLUMNS",
    "SCHEMA_VERSION",
    "Column",
    "DamagedStoreError",
    "IncompatibleStoreError",
    "PhaseValues",
    "RankFile",
    "Run",
    "RunWriter",
    "StoreBusyError",
    "StoreError",
    "StoreIOError",
    "checkpoint_folder",
    "checkpoint_path",
    "find_checkpoints",
    "new_run_id",
    "open_run",
    "rank_path",
    "repack",
]
