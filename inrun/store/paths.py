"""Where a run's files live: rank files, model checkpoints, and fresh run ids.

``runs/run.h5`` is the store of a one-rank run; ``runs/run.rank<r>.h5`` are the files of a multi-rank run;
``runs/run.checkpoints/step_<t>.pt`` hold the model at the start of step ``t``. Files next to a run that are not
rank stores (embeddings, post-hoc values) carry one of ``SIDECAR_MARKERS`` in their names.
"""

from __future__ import annotations

import glob
import re
import uuid
from pathlib import Path
from typing import Any


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


def checkpoint_folder(store: str | Path) -> Path:
    """Where a run's model checkpoints go: ``run.h5`` -> ``run.checkpoints/`` (rank suffixes dropped)."""
    store = Path(store)
    stem = store.stem.split(".rank")[0]
    return store.with_name(stem + ".checkpoints")


def checkpoint_path(store: str | Path, step: int) -> Path:
    """The file holding the model at the start of ``step`` (``step`` = number of steps taken: the final model)."""
    return checkpoint_folder(store) / f"step_{step:08d}.pt"


CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt$")


def find_checkpoints(run: Any, folder: str | Path | None = None) -> dict[int, Path]:
    """``{step: file}`` of the model checkpoints saved with ``run`` (a ``Run``: its first rank file names the folder;
    ``checkpoint_every``), or in ``folder``."""
    folder = Path(folder) if folder is not None else checkpoint_folder(run.paths[0])
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = CHECKPOINT_NAME.search(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


SIDECAR_MARKERS = (".dvemb.", ".posthoc.")  # files inrun writes next to a run that are not rank stores


def _stores_only(files: list[Path]) -> list[Path]:
    return [f for f in files if not any(marker in f.name for marker in SIDECAR_MARKERS)]


def find_rank_files(path: str | Path) -> list[Path]:
    """The store files ``path`` names: itself, the ``*.h5`` files of a folder, or ``<prefix>.rank*.h5`` /
    ``<prefix>*.h5`` (a trailing ``.h5`` of the prefix is dropped). Embedding and post-hoc files are skipped."""
    path = Path(path)
    if path.is_dir():
        files = _stores_only(sorted(path.glob("*.h5")))
        if not files:
            raise FileNotFoundError(f"no run store (*.h5 files) in folder {path}")
        return files
    if path.is_file():
        return [path]
    prefix = path.name[: -len(".h5")] if path.name.endswith(".h5") else path.name
    folder = path.parent
    for pattern in (f"{glob.escape(prefix)}.rank*.h5", f"{glob.escape(prefix)}*.h5"):
        files = _stores_only(sorted(folder.glob(pattern)))
        if files:
            return files
    raise FileNotFoundError(
        f"no run store at {path}: it is neither a file nor a folder, and no files match {folder / prefix}*.h5"
    )
