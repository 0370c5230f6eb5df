"""Making sure that what the writer commits is on disk: space reserved ahead, write errors seen, data synced.

Measured on a full tmpfs (docs/store-schema.md, "Durability"): HDF5 reports a failed chunk write when the chunk
leaves its cache. When that happens inside the close of a dataset object that Python is freeing, h5py can only
print "Exception ignored in ..." (the error is raised in a destructor) and the writer would go on to commit rows
that are not in the file (they read back as zeros). Three measures make a write error impossible to miss:

* ``reserve``: before a block is written, the bytes HDF5 will append are allocated to the file with
  ``posix_fallocate``; on a full disk this fails cleanly *before* anything is written, and HDF5 never meets ENOSPC;
* the writer keeps one handle per dataset open for its whole life, so chunks are written by ``File.flush()``,
  which raises; ``SwallowedErrors`` also catches anything h5py reports through ``sys.unraisablehook`` meanwhile;
* ``fsync`` before the commit counter is written: a delayed write error of the file system surfaces there.
"""

from __future__ import annotations

import errno
import math
import os
import sys
from pathlib import Path
from typing import Iterable

import h5py

METADATA_SLACK = 256 << 10  # bytes reserved on top of the data for HDF5's chunk index and object headers


class SwallowedErrors:
    """Context manager collecting the ``OSError``/``RuntimeError`` that h5py raises inside destructors (shown as
    "Exception ignored in ...") while it is active; ``check()`` raises the first one."""

    def __enter__(self) -> "SwallowedErrors":
        self.errors: list[BaseException] = []
        self._previous = sys.unraisablehook
        sys.unraisablehook = self._hook
        return self

    def _hook(self, unraisable) -> None:
        where = f"{unraisable.object!r} {getattr(unraisable, 'err_msg', '') or ''}"
        if isinstance(unraisable.exc_value, (OSError, RuntimeError)) and "h5py" in where:
            self.errors.append(unraisable.exc_value)
        else:  # not h5py's: passed on as usual
            self._previous(unraisable)

    def check(self) -> None:
        if self.errors:
            raise OSError(errno.EIO, f"HDF5 reported a write error while closing a dataset: {self.errors[0]}")

    def __exit__(self, *exc) -> None:
        sys.unraisablehook = self._previous


def chunked_bytes(datasets: Iterable[h5py.Dataset], start: int, n: int) -> int:
    """Bytes of the new uncompressed chunks that writing rows ``start:start+n`` of each dataset allocates (a chunk
    that already holds rows before ``start`` is in the file already)."""
    total = 0
    for ds in datasets:
        if n <= 0:
            continue
        chunk_rows = ds.chunks[0]
        chunks = -(-(start + n) // chunk_rows) - -(-start // chunk_rows)
        total += chunks * chunk_rows * ds.dtype.itemsize * math.prod(ds.shape[1:])
    return total


def reserve(file: h5py.File, nbytes: int) -> None:
    """Allocate ``nbytes`` (plus slack for metadata) past the end of the HDF5 file's allocated space, so the writes
    that follow cannot run out of space. Raises ``OSError(ENOSPC)`` on a full disk, before anything is written.

    HDF5 with ``fs_strategy="none"`` appends every allocation at the end of the file, inside the reserved range;
    the unused rest is kept for the next block (the file is at most one block longer than its content).
    """
    fd = file.id.get_vfd_handle()
    end = int(file.id.get_filesize())
    try:
        os.posix_fallocate(fd, end, nbytes + METADATA_SLACK)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        # a file system without fallocate: at least check the free space
        need = nbytes + METADATA_SLACK
        if free_bytes(Path(file.filename).parent) < need:
            raise OSError(errno.ENOSPC, f"No space left on device (need {need} bytes)") from err


def sync(file: h5py.File) -> None:
    """Flush HDF5's caches and ``fsync`` the file: raises if any write failed."""
    file.flush()
    os.fsync(file.id.get_vfd_handle())


def fsync_path(path: Path) -> None:
    """``fsync`` a file or folder by path (a folder: so a rename in it is on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process can still write in ``folder``'s file system."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize
