"""One writer per store: an exclusive ``flock`` on ``<store>.lock``, taken before the store is touched.

``RunWriter`` takes the lock first, before it creates, truncates, overwrites or resumes anything, and holds it until
the store is closed (compression included). A second writer of the same store, in this process or another, gets
``StoreBusyError`` naming the path and the holder (pid, host, since when). The kernel drops the lock when its holder
dies, even by ``kill -9``, so a crashed run never blocks the next one; a stale lock file is simply reused.

Readers take no lock: ``is_locked`` tells them that a store is live (still being written). Locks are advisory and
work between processes of one machine on local file systems (on NFS ``flock`` may be local to each client).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from inrun.store.schema import StoreBusyError, StoreIOError

LOCK_SUFFIX = ".lock"


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


class StoreLock:
    """The writer's lock on one store; ``release()`` (or garbage collection, or death) lets the next writer in."""

    def __init__(self, store: str | Path, wait_s: float = 0.5):
        """Take the lock or raise ``StoreBusyError``. ``wait_s``: retry this long (a reader's probe holds a shared
        lock for microseconds)."""
        self.store = Path(store)
        self.path = lock_path(self.store)
        deadline = time.monotonic() + wait_s
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreIOError(f"cannot lock run store {self.store} ({self.path}): {err}") from err
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise StoreBusyError(
                    f"run store {self.store} is being written by another writer ({holder(self.store)}). One store has "
                    "one writer: wait for that run to finish (or stop it), or write to another path. Nothing was "
                    "changed."
                ) from None
            if _same_file(fd, self.path):  # not a lock file that its last holder unlinked meanwhile
                break
            os.close(fd)
        self._fd: int | None = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StoreIOError(
                f"cannot create the lock file {self.path} of run store {self.store}: {err}. Choose a writable path."
            ) from err

    def release(self) -> None:
        """Remove the lock file and unlock (in that order: a waiting writer then retries on a fresh file)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                self.release()
            except Exception:  # noqa: BLE001 -- at interpreter exit; the kernel drops the lock anyway
                pass


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def holder(store: str | Path) -> str:
    """Who holds the lock of ``store``, as recorded in its lock file ("unknown holder" when not readable)."""
    try:
        info = json.loads(lock_path(store).read_text() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "unknown holder"


def is_locked(store: str | Path) -> bool:
    """Whether a writer holds ``store`` now (the store is live). Takes a shared lock for an instant."""
    try:
        fd = os.open(lock_path(store), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock when it was taken
    return False
