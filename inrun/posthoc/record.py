"""Access to what a run recorded for embeddings: its projection, its projected gradient rows, projected test gradients.

A run recorded with ``embeddings=...`` holds, for every sample occurrence, its projected contribution
``g = P c_s(z)`` to the gradient of step ``s`` (``records/proj_grad``) and, per layer block, the step's update scale
``eta_s`` (``steps/proj_scale``). Everything after training (:mod:`inrun.posthoc.build`,
:mod:`inrun.posthoc.embeddings`, :mod:`inrun.posthoc.values`, :mod:`inrun.posthoc.baselines`) reads it through here.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from inrun.engine.capture import GradientCapture
from inrun.engine.captured import LossFn
from inrun.engine.products import capture_batch
from inrun.engine.projection import BlockLayout, ProjectionSettings, Projector
from inrun.errors import InRunError
from inrun.store.rankfile import RankFile
from inrun.store.reader import Run
from inrun.store.schema import SCHEMA_VERSION as STORE_SCHEMA_VERSION
from inrun.valuation.validation import eval_mode


class EmbeddingsError(InRunError, ValueError):
    """Data value embeddings cannot be built or used as asked (a clear message says why and what to do)."""


def has_embeddings(run: Run) -> bool:
    """Whether ``run`` recorded projected per-sample gradients (``embeddings=...`` at recording time)."""
    return "proj_grad" in run.record_columns and "proj_scale" in run.steps


def require_embeddings(run: Run) -> None:
    if run.schema_version > STORE_SCHEMA_VERSION:
        raise EmbeddingsError(
            f"{run.paths[0]} has store schema {run.schema_version}; this inrun reads up to schema "
            f"{STORE_SCHEMA_VERSION}; upgrade inrun"
        )
    if not has_embeddings(run):
        raise EmbeddingsError(
            f"run {run.paths[0]} was recorded without embeddings (no records/proj_grad): record with "
            "InRunCallback(..., embeddings=True) or InRunRecorder(..., embeddings=True) (or a dict of projection "
            "settings such as {'k_rows': 32, 'k_cols': 32}) to use data value embeddings, TracIn, LoGra or DataInf"
        )


def read_projection(run: Run) -> tuple[list[BlockLayout], dict[str, tuple[Tensor | None, Tensor | None]], ProjectionSettings]:
    """The recorded layout, projection matrices (float64) and settings of ``run`` (from rank 0's file)."""
    require_embeddings(run)
    with h5py.File(run.paths[0], "r", locking=False) as f:  # the Run holds it open without locking
        if "projection" not in f:
            raise EmbeddingsError(f"{run.paths[0]} has records/proj_grad but no 'projection' group: the file is damaged")
        group = f["projection"]
        layout = [BlockLayout(**entry) for entry in json.loads(group.attrs["layout"])]
        settings = ProjectionSettings.from_any(json.loads(group.attrs["settings"]))
        matrices: dict[str, tuple[Tensor | None, Tensor | None]] = {}
        for position, block in enumerate(layout):
            sides = []
            for side in ("rows", "cols"):
                key = f"{position}/{side}"
                sides.append(torch.from_numpy(np.asarray(group[key][()], dtype=np.float64)) if key in group else None)
            matrices[block.name] = (sides[0], sides[1])
    return layout, matrices, settings


def load_projector(run: Run) -> Projector:
    """A :class:`~inrun.engine.projection.Projector` identical to the one the run recorded with."""
    layout, matrices, settings = read_projection(run)
    return Projector(layout, matrices, settings)


def check_model(projector: Projector, capture: GradientCapture) -> None:
    """Raise a clear error when the model's attributed parameters do not match the recorded layout."""
    params = capture.parameters
    for block in projector.layout:
        param = params.get(block.name)
        if param is None:
            known = ", ".join(sorted(params)) or "none"
            raise EmbeddingsError(
                f"the model has no attributed parameter '{block.name}', which the run recorded (its attributed "
                f"parameters: {known}); pass the model the run trained"
            )
        numel = block.rows * block.cols
        if param.numel() != numel:
            raise EmbeddingsError(
                f"parameter '{block.name}' has shape {tuple(param.shape)} ({param.numel()} numbers) but the run "
                f"recorded it as {block.rows} x {block.cols} ({numel}); pass the model the run trained"
            )
    if projector.settings.parameters is None:
        extra = sorted(set(params) - {block.name for block in projector.layout})
        if extra:
            warnings.warn(
                f"inrun: parameters {extra} of the model are not in the run's recorded layout; they are left out of "
                "the test gradients", stacklevel=3)


def _check_captured_shapes(projector: Projector, captured) -> None:
    found = Projector.shapes_of(captured)
    for block in projector.layout:
        shape = found.get(block.name)
        if shape is None:
            continue  # unused by the test loss: its projected gradient is zero
        expected = (block.rows, block.cols) if block.kind == "outer" else block.rows
        if shape != expected:
            raise EmbeddingsError(
                f"parameter '{block.name}' gives per-sample gradients of shape {shape}, but the run recorded "
                f"{expected}; pass the model the run trained"
            )


def project_test_gradients(run_or_projector: "Run | Projector", model: nn.Module, loss_fn: LossFn,
                           test_batch: Any, *, allow_unsupported: bool = False) -> np.ndarray:
    """Projected loss gradients of each test point, ``[n_test, D]`` float64, with the run's recorded projection.

    ``loss_fn(model, batch) -> Tensor[n]``; the model is evaluated in eval mode; its parameters and ``param.grad``
    are left as they were. ``test_batch`` may also be a list of batches (their points are concatenated).
    """
    projector = run_or_projector if isinstance(run_or_projector, Projector) else load_projector(run_or_projector)
    batches = test_batch if isinstance(test_batch, list) and test_batch and not isinstance(test_batch[0], Tensor) else [test_batch]
    parts = []
    with GradientCapture(model, allow_unsupported=allow_unsupported) as capture:
        check_model(projector, capture)
        with eval_mode(model), torch.enable_grad():
            for batch in batches:
                captured = capture_batch(capture, model, loss_fn, batch)
                _check_captured_shapes(projector, captured)
                parts.append(projector.project_batch(captured).detach().double().cpu())
    return torch.cat(parts).numpy()


@dataclass
class RankSteps:
    """One rank's committed steps: numbers, first row and row count of each, in step order."""

    path: Path
    steps: np.ndarray
    row_start: np.ndarray
    n_samples: np.ndarray
    rows: int

    def span(self, low: int, high: int) -> tuple[int, int, np.ndarray]:
        """Rows ``[a, b)`` covering steps ``low <= step <= high``, and those steps' positions in the table."""
        i, j = np.searchsorted(self.steps, low, "left"), np.searchsorted(self.steps, high, "right")
        positions = np.arange(i, j)
        if not len(positions):
            return 0, 0, positions
        return int(self.row_start[i]), int(self.row_start[j - 1] + self.n_samples[j - 1]), positions


class RunRecord:
    """Per-rank read access to the committed ``proj_grad`` rows of a run (own read-only handles)."""

    def __init__(self, run: Run):
        require_embeddings(run)
        self.run = run
        self.files = [RankFile(p) for p in run.paths]
        self.ranks = []
        for f in self.files:
            self.ranks.append(RankSteps(f.path, f.step_column("step"), f.step_column("row_start"),
                                         f.step_column("n_samples"), f.committed_rows))
        self.rank_rows = [r.rows for r in self.ranks]
        self.offsets = np.concatenate([[0], np.cumsum(self.rank_rows)]).astype(np.int64)
        steps = run.steps
        self.step_numbers = np.asarray(steps["step"], np.int64)
        self.scales = np.nan_to_num(np.asarray(steps["proj_scale"], np.float64), nan=0.0)
        if self.scales.ndim == 1:
            self.scales = self.scales[:, None]
        self.dim = int(self.files[0].record_columns["proj_grad"].shape[0])

    def scale_of(self, step: int) -> np.ndarray:
        i = int(np.searchsorted(self.step_numbers, step))
        if i == len(self.step_numbers) or self.step_numbers[i] != step:
            raise EmbeddingsError(f"step {step} has records but no row in the steps table of {self.run.paths[0]}")
        return self.scales[i]

    def steps_with_rows(self, below: int) -> np.ndarray:
        """Step numbers below ``below`` that hold at least one record on some rank, ascending."""
        found = [r.steps[(r.n_samples > 0) & (r.steps < below)] for r in self.ranks]
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def read(self, rank: int, a: int, b: int, column: str = "proj_grad") -> np.ndarray:
        return self.files[rank].record_column(column, a, b)

    def sample_ids(self) -> np.ndarray:
        return np.concatenate([f.record_column("sample_id") for f in self.files])

    def record_steps(self) -> np.ndarray:
        return np.concatenate([f.record_column("step") for f in self.files])

    def close(self) -> None:
        for f in self.files:
            f.close()
