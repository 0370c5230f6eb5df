"""Compression of a finished store: rewrite it with gzip/lzf into a temporary file and swap it in atomically.

The live file is written uncompressed (see :mod:`inrun.store.writer`); ``repack`` runs at close, or by hand on the
file of a crashed run. A crash at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import h5py
import numpy as np

from inrun.store.durability import SwallowedErrors, fsync_path
from inrun.store.faults import fault_point
from inrun.store.idbitmap import STORED_GROUP, STORED_NAME, BitmapBuilder, bitmap_limit
from inrun.store.lock import StoreLock
from inrun.store.rankfile import committed_counts
from inrun.store.schema import (
    CHUNK_ELEMENTS,
    CREATE_OPTIONS,
    LIBVER,
    READ_OPTIONS,
    RECORDS,
    STEPS,
    check_header,
    compression_options,
    create_table,
    table_columns,
)

COPY_BLOCK_ELEMENTS = 1 << 22  # elements per block when rewriting a table
STORED_BITMAP_MAX_IDS = 1 << 31  # the id bitmap kept with a compressed store covers at most this range (256 MiB)


REPACK_SUFFIX = ".repack.tmp"


def repack(path: str | Path, compression: str | None = "gzip", *, holding_lock: bool = False) -> None:
    """Rewrite a closed store with ``compression`` (None: uncompressed), keeping only committed rows.

    Writes ``<path>.repack.tmp``, syncs it, reads it back and compares every committed row with the store, then
    renames it over ``path``: a crash or a write error at any moment leaves either the old file or the new,
    complete one. Also useful to compress the file of a run that crashed. Takes the store's writer lock (refused
    while a run writes it) unless the caller, the writer itself, holds it.
    """
    path = Path(path)
    compression_options(compression)  # validate
    lock = None if holding_lock else StoreLock(path)
    tmp = path.with_name(path.name + REPACK_SUFFIX)
    try:
        with SwallowedErrors() as swallowed:
            with h5py.File(path, "r", **READ_OPTIONS) as src:
                check_header(src.attrs, path)
                file_options = {"libver": LIBVER, **READ_OPTIONS} if compression else CREATE_OPTIONS
                with h5py.File(tmp, "w", **file_options) as dst:
                    _copy_store(src, dst, path, compression)
                swallowed.check()
                fsync_path(tmp)
                with h5py.File(tmp, "r", **READ_OPTIONS) as dst:
                    _check_copy(src, dst, path)
            swallowed.check()
        fault_point("compress")
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def _check_copy(src: h5py.File, dst: h5py.File, path: Path) -> None:
    """Raise unless ``dst`` holds exactly the committed rows of ``src`` (bytewise, so NaNs compare equal)."""
    counts = committed_counts(src, path)
    if committed_counts(dst, path) != counts:
        raise OSError(f"the compressed copy of {path} does not hold its {counts[0]} committed steps")
    for table, n in zip((STEPS, RECORDS), counts):
        for name, ds in src[table].items():
            step = max(1, COPY_BLOCK_ELEMENTS // max(1, math.prod(ds.shape[1:])))
            for start in range(0, n, step):
                stop = min(n, start + step)
                if not np.array_equal(ds[start:stop].view(np.uint8), dst[table][name][start:stop].view(np.uint8)):
                    raise OSError(f"the compressed copy of {path} differs in {table}/{name} rows {start}:{stop}")


def _copy_store(src: h5py.File, dst: h5py.File, path: Path, compression: str | None) -> None:
    steps, rows = committed_counts(src, path)
    for key, value in src.attrs.items():
        dst.attrs[key] = value
    dst.attrs["committed_rows"] = rows
    # a compressed (finished) store keeps the bitmap of its sample ids: reading it then needs no pass over the ids
    bitmap = BitmapBuilder(bitmap_limit(rows, STORED_BITMAP_MAX_IDS)) if compression and rows else None
    for table, n in ((STEPS, steps), (RECORDS, rows)):
        columns = table_columns(src[table])
        create_table(dst.create_group(table, track_order=True), columns, compression)
        for name in columns:
            seen = bitmap.add if bitmap is not None and table == RECORDS and name == "sample_id" else None
            _copy_rows(src[table][name], dst[table][name], n, seen)
    for name in src:
        if name not in (STEPS, RECORDS, STORED_GROUP):  # an old bitmap is never copied: it may not fit the rows
            _copy_static(src[name], dst, compression)
    if bitmap is not None and bitmap.words is not None:
        ds = dst.require_group(STORED_GROUP).create_dataset(STORED_NAME, data=bitmap.words,
                                                            **compression_options(compression))
        ds.attrs.update({"lo": bitmap.lo, "steps": steps, "rows": rows})


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, n: int, seen=None) -> None:
    """Copy the first ``n`` rows in blocks of whole chunks; ``seen(block)`` is called with each block."""
    dst.resize(n, axis=0)
    chunk_rows = dst.chunks[0]  # whole chunks per block: no chunk is compressed twice
    block = chunk_rows * max(1, COPY_BLOCK_ELEMENTS // (chunk_rows * math.prod(src.shape[1:])))
    for start in range(0, n, block):
        stop = min(n, start + block)
        rows = src[start:stop]
        dst[start:stop] = rows
        if seen is not None:
            seen(rows)


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
        ds = dst_parent.create_dataset(name, data=obj[()], **compression_options(compression))
        for key, value in obj.attrs.items():
            ds.attrs[key] = value
    else:
        obj.file.copy(obj, dst_parent, name=name)


def stale_repack(path: str | Path) -> bool:
    """Whether a compression of the store at ``path`` was interrupted (its temporary file is left)."""
    path = Path(path)
    return path.with_name(path.name + REPACK_SUFFIX).exists()


def remove_stale_repack(path: Path) -> None:
    """Drop the temporary file of a repack that was interrupted (the store itself is intact)."""
    path.with_name(path.name + REPACK_SUFFIX).unlink(missing_ok=True)
