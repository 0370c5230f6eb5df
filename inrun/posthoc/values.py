"""In-Run Data Shapley for test points chosen after training (ALGORITHMS.md, last In-Run section).

The in-run values need the validation data during training. For test points chosen later, the recorded projected
contributions ``P c_i(t)`` and the model checkpoints give the same quantities approximately:

* first order:  ``phi_i = sum_t scale_t <P g_test(theta_t), P c_i(t)>``, ``g_test(theta_t)`` taken from the
  checkpoint of step t (exact), else the nearest checkpoint, else the final model (then it is TracIn);
* second order: the same with ``g_test`` at the midpoint ``(theta_t + theta_{t+1}) / 2`` where checkpoints of both
  steps exist (exactly the in-run midpoint for plain SGD; for Adam it differs by Delta_0 / 2), else the first-order
  choice.

``scale_t`` is each layer block's recorded update scale (SGD: the learning rate, exact; Adam: the step size along the
gradient taken, ``sum(D G^2) / sum(G^2)``, which is exactly the in-run ``adam_values="block"`` scale, not the default
elementwise fixed-state one). Test gradients are projected once per checkpoint; the stored steps are streamed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from inrun.engine.captured import LossFn
from inrun.engine.projection import Projector
from inrun.errors import BatchMismatchError, InRunError
from inrun.posthoc.record import EmbeddingsError, load_projector, project_test_gradients
from inrun.store.paths import find_checkpoints
from inrun.store.reader import Run

#: the suffix of a step's second-order note where it fell back to the first-order test gradient
NO_MIDPOINT = " (no midpoint)"


class CheckpointError(InRunError, ValueError):
    """A checkpoint that does not belong to the run or does not fit the model."""


@dataclass
class PosthocValues:
    """Post-hoc first- and second-order values of every training sample for each test point."""

    sample_ids: np.ndarray  # [n_ids], as run.sample_ids
    first: np.ndarray  # [n_ids, n_test]
    second: np.ndarray  # [n_ids, n_test]
    steps: np.ndarray  # [n_steps] step numbers
    step_first: np.ndarray  # [n_steps, n_test]: the values of each step's batch, summed
    step_second: np.ndarray
    approximation: list[str] = field(default_factory=list)  # per step, first order
    approximation_second: list[str] = field(default_factory=list)  # per step, second order
    #: the run the values were computed for (None in files saved before run ids were stored)
    run_id: str | None = None

    @property
    def second_order_fallbacks(self) -> int:
        """Steps whose second-order value fell back to the first-order one (no checkpoints of both step t and t+1,
        so no midpoint): there ``step_second`` equals ``step_first``."""
        return sum(1 for note in self.approximation_second if note.endswith(NO_MIDPOINT))

    def fallback_note(self) -> str | None:
        """A sentence saying where second order fell back to first order, or None where it never did."""
        fallbacks, total = self.second_order_fallbacks, len(self.approximation_second)
        if not fallbacks:
            return None
        return (f"second order fell back to first order at {fallbacks} of {total} steps (no checkpoints of both "
                "step t and t+1 to take the midpoint); record with checkpoint_every=1 for second-order post-hoc values"
                + (": the order-2 values equal order 1" if fallbacks == total else ""))

    def summed(self, order: int = 1) -> np.ndarray:
        """Values summed over the test points: ``[n_ids]``."""
        return (self.first if order == 1 else self.second).sum(axis=1)

    def save(self, path: str | Path) -> Path:
        """Write to HDF5 (``inrun report`` shows a run's ``<run>.posthoc.h5`` next to its in-run values)."""
        path = Path(path)
        with h5py.File(path, "w") as f:
            if self.run_id is not None:
                f.attrs["run_id"] = self.run_id
            for name in ("sample_ids", "first", "second", "steps", "step_first", "step_second"):
                f.create_dataset(name, data=getattr(self, name))
            f.create_dataset("approximation", data=np.array(self.approximation, dtype=object),
                             dtype=h5py.string_dtype())
            f.create_dataset("approximation_second", data=np.array(self.approximation_second, dtype=object),
                             dtype=h5py.string_dtype())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PosthocValues":
        with h5py.File(path, "r") as f:
            arrays = {name: f[name][()] for name in ("sample_ids", "first", "second", "steps", "step_first",
                                                     "step_second")}
            notes = [s.decode() if isinstance(s, bytes) else str(s) for s in f["approximation"][()]]
            notes2 = [s.decode() if isinstance(s, bytes) else str(s) for s in f["approximation_second"][()]]
            run_id = str(f.attrs["run_id"]) if "run_id" in f.attrs else None
        return cls(**arrays, approximation=notes, approximation_second=notes2, run_id=run_id)


def _load_state(path: Path, run: Run) -> dict[str, Tensor]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("run_id") != run.run_id:
        raise CheckpointError(f"{path} belongs to run {payload.get('run_id')}, not to this run ({run.run_id})")
    return payload["state_dict"]


class _CheckpointGradients:
    """Projected test gradients at checkpoints (and midpoints), computed once each, the model restored after."""

    def __init__(self, run: Run, model: nn.Module, loss_fn: LossFn, test_batch: Any, projector: Projector,
                 checkpoints: dict[int, Path]):
        self.run, self.model, self.loss_fn, self.test_batch = run, model, loss_fn, test_batch
        self.projector, self.checkpoints = projector, checkpoints
        self.original = {name: t.detach().clone() for name, t in model.state_dict().items()}
        self._cache: dict[Any, np.ndarray] = {}

    def _project_with(self, state: dict[str, Tensor] | None) -> np.ndarray:
        if state is not None:
            try:
                self.model.load_state_dict(state)
            except RuntimeError as error:
                raise CheckpointError(f"a checkpoint does not fit the model: {error}") from error
        try:
            return project_test_gradients(self.projector, self.model, self.loss_fn, self.test_batch)
        except (KeyError, TypeError, IndexError, AttributeError) as error:
            raise BatchMismatchError(
                f"the test data does not fit loss_fn ({type(error).__name__}: {error}); pass test batches with the "
                "structure of the training batches"
            ) from error
        finally:
            self.model.load_state_dict(self.original)

    def final(self) -> np.ndarray:
        if "final" not in self._cache:
            self._cache["final"] = self._project_with(None)
        return self._cache["final"]

    def at(self, step: int) -> np.ndarray:
        if step not in self._cache:
            self._cache[step] = self._project_with(_load_state(self.checkpoints[step], self.run))
        return self._cache[step]

    def midpoint(self, step: int) -> np.ndarray:
        key = ("mid", step)
        if key not in self._cache:
            before = _load_state(self.checkpoints[step], self.run)
            after = _load_state(self.checkpoints[step + 1], self.run)
            mid = {name: (before[name] + after[name]) / 2 if before[name].is_floating_point() else before[name]
                   for name in before}
            self._cache[key] = self._project_with(mid)
        return self._cache[key]


def _first_order_choice(step: int, available: list[int]) -> tuple[int | None, str]:
    if step in available:
        return step, "exact checkpoint"
    if not available:
        return None, "final model"
    nearest = min(available, key=lambda c: (abs(c - step), c))
    return nearest, f"nearest checkpoint (step {nearest})"


def _step_rows(run: Run) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """For each recorded step: (step, proj_scale [n_blocks], sample ids [rows], projected rows [rows, D]), all ranks."""
    files = [h5py.File(path, "r", locking=False) for path in run.paths]  # readers never lock (NOTES.md)
    try:
        tables = []
        for f in files:
            n = int(f.attrs["committed_steps"])
            steps = f["steps"]
            tables.append({key: steps[key][:n] for key in ("step", "row_start", "n_samples", "skipped", "proj_scale")})
        for k, step in enumerate(tables[0]["step"]):
            if tables[0]["skipped"][k]:
                continue
            ids, rows = [], []
            for f, table in zip(files, tables):
                match = np.flatnonzero(table["step"] == step)
                if match.size == 0:
                    continue
                start, count = int(table["row_start"][match[0]]), int(table["n_samples"][match[0]])
                ids.append(f["records"]["sample_id"][start:start + count])
                rows.append(f["records"]["proj_grad"][start:start + count].astype(np.float64))
            yield int(step), tables[0]["proj_scale"][k], np.concatenate(ids), np.concatenate(rows)
    finally:
        for f in files:
            f.close()


def _scaled(gradients: np.ndarray, scales: np.ndarray, projector: Projector) -> np.ndarray:
    """Multiply each block of projected test gradients ``[n_test, D]`` by that block's update scale."""
    out = gradients.copy()
    for block, scale in zip(projector.layout, scales):
        out[:, block.offset:block.offset + block.size] *= scale
    return out


def posthoc_values(run: Run, model: nn.Module, loss_fn: LossFn, test_batch: Any, *,
                   checkpoints: dict[int, str | Path] | str | Path | None = None) -> PosthocValues:
    """First- and second-order In-Run Shapley values of every training sample for test points chosen after training.

    ``model``: the trained model (used as the final model where no checkpoint serves); ``loss_fn(model, batch) ->
    Tensor[n]``; ``checkpoints``: ``{step: file}``, a folder, or None for the run's own (``checkpoint_every``).
    The result's ``approximation`` says, per step, which parameters the test gradient was taken at;
    ``second_order_fallbacks`` / ``fallback_note()`` say where second order fell back to first order (a warning too).

    Exact (equal to the in-run values for the same points, to float precision) only for SGD-family rules with
    checkpoints at every step and projections that keep every layer whole. Adam runs use one update scale per layer
    block (the ``"block"`` Adam values, which they then reproduce when the run recorded with
    ``adam_values="block"``); against in-run values recorded with the default ``adam_values="fixed-state"`` they
    differ (docs/adam-values.md).
    """
    if "proj_grad" not in run.record_columns:
        raise EmbeddingsError(
            f"{run.paths[0]} was recorded without projected gradients; post-hoc values need "
            "InRunCallback(..., embeddings=True) (and checkpoint_every=k for checkpoints)"
        )
    projector = load_projector(run)
    if isinstance(checkpoints, dict):
        found = {int(step): Path(path) for step, path in checkpoints.items()}
    else:
        found = find_checkpoints(run, checkpoints)
    gradients = _CheckpointGradients(run, model, loss_fn, test_batch, projector, found)
    available = sorted(found)
    ids = run.sample_ids
    n_test = gradients.final().shape[0]
    first, second = np.zeros((ids.size, n_test)), np.zeros((ids.size, n_test))
    step_numbers, step_first, step_second, notes, notes2 = [], [], [], [], []
    for step, scales, sample_ids, rows in _step_rows(run):
        if not np.isfinite(rows).all():
            continue  # a step recorded without projections (embeddings every k steps)
        chosen, note = _first_order_choice(step, available)
        g1 = gradients.final() if chosen is None else gradients.at(chosen)
        if step in found and step + 1 in found:
            g2, note2 = gradients.midpoint(step), "midpoint of checkpoints"
        else:
            g2, note2 = g1, f"{note}{NO_MIDPOINT}"
        values1 = rows @ _scaled(g1, scales, projector).T
        values2 = rows @ _scaled(g2, scales, projector).T
        where = np.searchsorted(ids, sample_ids)
        np.add.at(first, where, values1)
        np.add.at(second, where, values2)
        step_numbers.append(step)
        step_first.append(values1.sum(0))
        step_second.append(values2.sum(0))
        notes.append(note)
        notes2.append(note2)
    empty = np.zeros((0, n_test))
    result = PosthocValues(
        sample_ids=ids, first=first, second=second, steps=np.asarray(step_numbers, dtype=np.int64),
        step_first=np.asarray(step_first) if step_first else empty,
        step_second=np.asarray(step_second) if step_second else empty,
        approximation=notes, approximation_second=notes2, run_id=run.run_id,
    )
    note = result.fallback_note()
    if note is not None:
        warnings.warn(f"post-hoc values: {note}", stacklevel=2)
    return result
