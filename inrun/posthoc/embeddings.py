"""Queries on built data value embeddings: trajectory-specific leave-one-out and the per-step influence curve.

:func:`trajectory_loo` (``Run.trajectory_loo`` delegates here) answers ``L_test(theta'_T) - L_test(theta_T)`` for the
removal of each training sample (positive = it helped) as a dot product of its embedding with the projected test
gradient; :func:`step_influence` gives the mean influence of each step's batch (the training phases). Embeddings are
built on first use by :func:`inrun.posthoc.build.build_embeddings`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from torch import nn

from inrun.engine.projection import BlockLayout
from inrun.posthoc.build import (
    ROW_BLOCK_BYTES,
    build_embeddings,
    build_progress,
    check_embeddings_header,
    default_embeddings_path,
)
from inrun.posthoc.record import EmbeddingsError, LossFn, RunRecord, project_test_gradients, require_embeddings
from inrun.store.rankfile import RankFile
from inrun.store.reader import Run


class Embeddings:
    """A complete embeddings file opened for reading, checked against its run."""

    def __init__(self, path: Path, run: Run):
        self.path = Path(path)
        if not self.path.exists():
            raise EmbeddingsError(f"no embeddings file at {self.path}: build it with "
                                  f"inrun.posthoc.build_embeddings({str(run.paths[0])!r}, out={str(self.path)!r})")
        self.file = h5py.File(self.path, "r")
        try:
            self._check(run)
        except BaseException:
            self.file.close()
            raise

    def _check(self, run: Run) -> None:
        attrs = self.file.attrs
        check_embeddings_header(attrs, self.path)
        if str(attrs["run_id"]) != run.run_id:
            raise EmbeddingsError(f"{self.path} belongs to run {attrs['run_id']}, not to {run.paths[0]} "
                                  f"(run {run.run_id}); pass the embeddings of this run, or build them")
        if not int(attrs["complete"]):
            below = build_progress(attrs)["below"]
            raise EmbeddingsError(
                f"{self.path} is incomplete (the build stopped with steps below {below} of {int(attrs['until_step'])} "
                f"left to do). Finish it with inrun.posthoc.build_embeddings({str(run.paths[0])!r}, "
                f"out={str(self.path)!r}) or `python -m inrun.posthoc.build {run.paths[0]} --out {self.path}`: "
                "it resumes where it stopped"
            )
        rows = json.loads(attrs["rank_rows"])
        now = [RankFile(p) for p in run.paths]
        try:
            current = [f.committed_rows for f in now]
        finally:
            for f in now:
                f.close()
        if rows != current:
            raise EmbeddingsError(
                f"{self.path} was built from {sum(rows)} records but the run now has {sum(current)}: the run went on "
                "after the build. Rebuild with inrun.posthoc.build_embeddings(run, resume=False)"
            )
        self.until_step = int(attrs["until_step"])
        self.layout = [BlockLayout(**b) for b in json.loads(attrs["layout"])]

    @property
    def sample_ids(self) -> np.ndarray:
        return self.file["sample_ids"][()]

    def iter_rows(self, name: str = "embeddings"):
        """``(start, block)`` over the rows of ``name`` as float64, in blocks of about ``ROW_BLOCK_BYTES``."""
        ds = self.file[name]
        rows, dim = ds.shape
        step = max(1, ROW_BLOCK_BYTES // (8 * max(dim, 1)))
        for start in range(0, rows, step):
            yield start, np.asarray(ds[start: start + step], dtype=np.float64)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "Embeddings":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_embeddings(run: Run, embeddings: "str | Path | None" = None, *, build: bool = True,
                    progress: bool = True) -> Embeddings:
    """The run's embeddings file (default path when ``embeddings`` is None, built there first when missing)."""
    path = Path(embeddings) if embeddings is not None else default_embeddings_path(run)
    if embeddings is None and build:
        owner = _run_id_of(path) if path.exists() else None
        stale = owner is not None and owner != run.run_id
        if stale:  # the default path of a store that was since recorded again (overwrite=True): rebuild for this run
            warnings.warn(f"{path} holds the embeddings of an earlier run recorded at {run.paths[0]}; rebuilding "
                          f"them for run {run.run_id}", stacklevel=2)
        if stale or not path.exists():
            require_embeddings(run)
            build_embeddings(run, path, progress=progress, resume=not stale)
    return Embeddings(path, run)


def _run_id_of(path: Path) -> str | None:
    """The run id an embeddings file was built for (None when it cannot be read: the caller's check then says why)."""
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs["run_id"]) if "run_id" in f.attrs else None
    except (OSError, KeyError):
        return None


def trajectory_loo(run: Run, model: nn.Module, loss_fn: LossFn, test_batch: Any, *,
                   embeddings: "str | Path | None" = None, per_occurrence: bool = False, build: bool = True,
                   progress: bool = True) -> np.ndarray:
    """Trajectory-specific leave-one-out estimates ``L_test(theta'_T) - L_test(theta_T)`` (positive = helped).

    Returns ``[n_ids, n_test]`` with ids in the order of ``run.sample_ids``: removal of the sample from every step
    that used it (the sum of its occurrence embeddings). With ``per_occurrence=True``: ``[n_records, n_test]`` in
    the row order of ``run.records()`` (removal from that one step; NaN for steps whose projections were not
    recorded). ``model`` must be the model at the end of the embeddings' range (the final model; the model at
    ``until_step`` for a checkpointed build). ``embeddings``: an embeddings file (default ``<run>.dvemb.h5``, built
    on first use when ``build``).
    """
    test = project_test_gradients(run, model, loss_fn, test_batch)
    with open_embeddings(run, embeddings, build=build, progress=progress) as emb:
        if per_occurrence:
            return np.concatenate([block @ test.T for _, block in emb.iter_rows("embeddings")]) \
                if emb.file["embeddings"].shape[0] else np.zeros((0, len(test)))
        ids = emb.sample_ids
        if not np.array_equal(ids, run.sample_ids):
            raise EmbeddingsError(f"{emb.path} lists other sample ids than run {run.paths[0]}; rebuild it")
        if not len(ids):
            return np.zeros((0, len(test)))
        return np.concatenate([block @ test.T for _, block in emb.iter_rows("sums")])


def influence_path(run: Run) -> Path:
    """Where :func:`step_influence` saves its curve for ``inrun report``: ``<run>.influence.npz``."""
    return Path(run.paths[0]).with_suffix(".influence.npz")


def step_influence(run: Run, model: nn.Module, loss_fn: LossFn, test_batch: Any, *,
                   embeddings: "str | Path | None" = None, build: bool = True,
                   progress: bool = True, save: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per step, the mean embedding-based influence of the step's batch on the mean test loss, with the step size
    divided out: ``mean_{z in B_s} sum_b <P_b g_test, emb_b(z)> / eta_{s,b}`` (ALGORITHMS.md, DVEmb section).

    Returns ``(steps, values)``: step numbers ascending (steps with recorded embeddings) and their values.
    Positive = the step's data reduced the final test loss. Plot against the step to see the training phases;
    with ``save=True`` the curve is also written to :func:`influence_path`, and ``inrun report`` plots it.
    """
    steps, values = _step_influence(run, model, loss_fn, test_batch, embeddings, build, progress)
    if save:
        np.savez(influence_path(run), steps=steps, values=values)
    return steps, values


def _step_influence(run: Run, model: nn.Module, loss_fn: LossFn, test_batch: Any, embeddings: "str | Path | None",
                    build: bool, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    test = project_test_gradients(run, model, loss_fn, test_batch).mean(axis=0)
    with open_embeddings(run, embeddings, build=build, progress=progress) as emb:
        record = RunRecord(run)
        try:
            record_steps = record.record_steps()
            numbers, scales = record.step_numbers, record.scales
        finally:
            record.close()
        layout = emb.layout
        per_row = np.full(len(record_steps), np.nan)
        for start, block in emb.iter_rows("embeddings"):
            steps = record_steps[start: start + len(block)]
            eta = scales[np.searchsorted(numbers, steps)]  # [rows, n_blocks]
            total = np.zeros(len(block))
            for b, spec in enumerate(layout):
                part = block[:, spec.offset: spec.offset + spec.size] @ test[spec.offset: spec.offset + spec.size]
                with np.errstate(divide="ignore", invalid="ignore"):
                    total += np.where(eta[:, b] != 0, part / eta[:, b], 0.0)
            per_row[start: start + len(block)] = total
    finite = np.isfinite(per_row)
    steps_u, inverse = np.unique(record_steps[finite], return_inverse=True)
    sums = np.bincount(inverse, weights=per_row[finite], minlength=len(steps_u))
    counts = np.bincount(inverse, minlength=len(steps_u))
    return steps_u, sums / np.maximum(counts, 1)
