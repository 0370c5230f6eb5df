"""Named fault points of the store, so tests can crash or fail it at an exact moment (no effect otherwise).

The writer calls ``fault_point(name)`` at each moment where a crash or a write error matters (see ``POINTS``).
Two environment variables, read at each call, turn a point into a fault:

* ``INRUN_KILL_AT=name`` (or ``name:k``, the k-th time the point is reached): the process sends itself SIGKILL
  there, as ``kill -9`` or a power cut would stop it;
* ``INRUN_FAIL_AT=name`` (or ``name:k``): an ``OSError(ENOSPC)`` is raised there, as a full disk would.

Unset (the normal case) each point costs one dictionary lookup. tests/test_faults.py drives every point.
"""

from __future__ import annotations

import errno
import os
import signal

POINTS = (
    "create",  # the new store is written to its temporary name, not yet renamed into place
    "write",  # a block's rows are handed to HDF5, not yet flushed
    "flush",  # a block is flushed and synced to disk, its commit counter not yet written
    "commit",  # the commit counter is written and synced
    "static",  # a static array is written, not yet flushed
    "compress",  # the compressed copy is complete, not yet renamed over the store
    "close",  # the last block is committed, the file not yet closed
    "resume",  # a store is opened to resume, its uncommitted tail not yet cut
    "checkpoint",  # the recorder: the final step is committed, the final model checkpoint not yet saved
)

_hits: dict[str, int] = {}


def _armed(variable: str, name: str) -> bool:
    spec = os.environ.get(variable)
    if not spec:
        return False
    point, _, count = spec.partition(":")
    if point != name:
        return False
    _hits[variable + name] = _hits.get(variable + name, 0) + 1
    return _hits[variable + name] == (int(count) if count else 1)


def fault_point(name: str) -> None:
    """Crash or fail here when a test asked for it through ``INRUN_KILL_AT`` / ``INRUN_FAIL_AT``."""
    if _armed("INRUN_KILL_AT", name):
        print(f"inrun fault: killed at {name}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if _armed("INRUN_FAIL_AT", name):
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
