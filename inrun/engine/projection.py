"""Seeded Kronecker projections of per-sample gradients (ALGORITHMS.md, "Projection", LoGra-style).

For a matrix parameter (``param.reshape(R, C)``) with per-sample contribution ``c_i = sum_t r_t q_t^T``, the projection
is ``P_rows c_i P_cols^T`` (``k_rows x k_cols``), computed from the factor's two sides without forming ``c_i``.
A side whose dimension is at most its ``k`` is kept whole (identity: exact). Flat parameters (biases, norms) are kept
whole when at most ``flat_k`` entries (default ``k_rows * k_cols``), else projected by one dense ``flat_k x numel``
matrix. Matrices are Gaussian with entries of variance ``1/k``, so
products of projected gradients are unbiased estimates of the true ones; ``kind="orthogonal"`` uses orthonormal rows.

The layout (which parameter sits where in the concatenated vector) and the matrices themselves are saved in the store,
so test gradients can be projected identically after training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from torch import Tensor

from inrun.engine.captured import CapturedBatch
from inrun.engine.factors import OuterFactor


@dataclass(frozen=True)
class ProjectionSettings:
    """Projection sizes per layer (``k_rows x k_cols``), the random family and the seed."""

    k_rows: int = 64
    k_cols: int = 64
    kind: str = "gaussian"  # or "orthogonal"
    seed: int = 0
    dtype: str = "float32"  # storage dtype of projected gradients: "float32" or "float16"
    every: int = 1  # record every k-th step
    parameters: tuple[str, ...] | None = None  # a subset of parameter names (None: all attributed)
    # flat parameters (biases, norm scales) with more entries than this are projected to it; None: k_rows * k_cols
    # (so biases and norms of models up to d = 4096 are kept whole by default, exactly)
    flat_k: int | None = None
    # sizing: optimizer steps the run will take (None: an integration's max steps, else unknown); the run states the
    # projected size at its first step and refuses to start when it exceeds the free disk unless check_disk=False
    planned_steps: int | None = None
    check_disk: bool = True

    @classmethod
    def from_any(cls, value: "bool | dict | ProjectionSettings") -> "ProjectionSettings":
        if isinstance(value, ProjectionSettings):
            return value
        if value is True:
            return cls()
        if isinstance(value, Mapping):
            fields = dict(value)
            if fields.get("parameters") is not None:
                fields["parameters"] = tuple(fields["parameters"])
            return cls(**fields)
        raise TypeError(f"embeddings must be True, a dict of ProjectionSettings fields, or ProjectionSettings; got {value!r}")


@dataclass(frozen=True)
class BlockLayout:
    """Where one parameter's projected gradient sits in the concatenated vector."""

    name: str
    kind: str  # "outer" or "flat"
    rows: int  # R (outer) or numel (flat)
    cols: int  # C (outer) or 1 (flat)
    k_rows: int
    k_cols: int
    offset: int

    @property
    def size(self) -> int:
        return self.k_rows * self.k_cols


def _generator(seed: int, name: str, side: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}:{side}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def random_projection(k: int, dim: int, kind: str, generator: torch.Generator) -> Tensor:
    """A ``k x dim`` projection (``k < dim``), float64 on the CPU."""
    gaussian = torch.randn(k, dim, generator=generator, dtype=torch.float64)
    if kind == "gaussian":
        return gaussian / k**0.5
    if kind == "orthogonal":
        q, _ = torch.linalg.qr(gaussian.T)  # dim x k, orthonormal columns
        return q.T.contiguous()
    raise ValueError(f"projection kind must be 'gaussian' or 'orthogonal', got {kind!r}")


@dataclass(frozen=True)
class EmbeddingSize:
    """What recording projected gradients will cost on disk, per rank file."""

    dim: int  # projected numbers per sample occurrence
    bytes_per_occurrence: int  # the whole record row: projected gradient plus ids, values, norms
    occurrences_per_step: int
    recorded_steps: int | None  # steps with projections among the planned ones (None: not known)

    @property
    def total_bytes(self) -> int | None:
        if self.recorded_steps is None:
            return None
        return self.bytes_per_occurrence * self.occurrences_per_step * self.recorded_steps

    def statement(self) -> str:
        line = (f"data value embeddings: {self.dim:,} projected numbers = {_human(self.bytes_per_occurrence)} per "
                f"sample occurrence, {_human(self.bytes_per_occurrence * self.occurrences_per_step)} per step of "
                f"{self.occurrences_per_step} samples")
        if self.total_bytes is None:
            return line + "; total unknown (pass embeddings={'planned_steps': N} to check it against the free disk)"
        return line + f"; {_human(self.total_bytes)} for the {self.recorded_steps:,} projected steps planned"


def embedding_size(row_bytes: int, dim: int, settings: ProjectionSettings, occurrences_per_step: int,
                   planned_steps: int | None) -> EmbeddingSize:
    """The size statement of a run recording ``dim`` projected numbers in record rows of ``row_bytes`` bytes."""
    steps = None if planned_steps is None else -(-int(planned_steps) // max(1, settings.every))
    return EmbeddingSize(dim, int(row_bytes), int(occurrences_per_step), steps)


def _human(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1000 or unit == "PB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count} B"


class Projector:
    """Projects captured batches and full gradients with per-parameter seeded matrices."""

    def __init__(self, layout: list[BlockLayout], matrices: dict[str, tuple[Tensor | None, Tensor | None]],
                 settings: ProjectionSettings):
        self.layout = layout
        self.matrices = matrices  # name -> (P_rows or None, P_cols or None); flat: (P or None, None)
        self.settings = settings
        self._cache: dict[tuple, tuple[Tensor | None, Tensor | None]] = {}

    @property
    def dim(self) -> int:
        return sum(block.size for block in self.layout)

    @classmethod
    def build(cls, shapes: Mapping[str, tuple[int, int] | int], settings: ProjectionSettings) -> "Projector":
        """``shapes``: name -> ``(R, C)`` for matrix parameters, or ``numel`` for flat ones."""
        layout, matrices, offset = [], {}, 0
        for name, shape in shapes.items():
            if settings.parameters is not None and name not in settings.parameters:
                continue
            if isinstance(shape, int):
                k = min(shape, settings.k_rows * settings.k_cols if settings.flat_k is None else settings.flat_k)
                p = None if k == shape else random_projection(k, shape, settings.kind, _generator(settings.seed, name, "flat"))
                block = BlockLayout(name, "flat", shape, 1, k, 1, offset)
                matrices[name] = (p, None)
            else:
                rows, cols = shape
                k_rows, k_cols = min(rows, settings.k_rows), min(cols, settings.k_cols)
                p_rows = None if k_rows == rows else random_projection(k_rows, rows, settings.kind, _generator(settings.seed, name, "rows"))
                p_cols = None if k_cols == cols else random_projection(k_cols, cols, settings.kind, _generator(settings.seed, name, "cols"))
                block = BlockLayout(name, "outer", rows, cols, k_rows, k_cols, offset)
                matrices[name] = (p_rows, p_cols)
            layout.append(block)
            offset += block.size
        return cls(layout, matrices, settings)

    @staticmethod
    def shapes_of(captured: CapturedBatch) -> dict[str, tuple[int, int] | int]:
        """Matrix shape ``(R, C)`` or flat size of every parameter in a captured batch (from its first factor)."""
        found: dict[str, tuple[int, int] | int] = {}
        for name, uses in captured.factors.items():
            factor = uses[0]
            found[name] = factor.shape if isinstance(factor, OuterFactor) else factor.numel
        return found

    def _on(self, name: str, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        key = (name, like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = tuple(None if m is None else m.to(like.device, like.dtype) for m in self.matrices[name])  # type: ignore
        return self._cache[key]

    def project_batch(self, captured: CapturedBatch) -> Tensor:
        """Projected per-sample contributions ``[n, dim]`` (each parameter's uses summed: tied weights included)."""
        blocks = []
        for block in self.layout:
            uses = captured.factors.get(block.name)
            if not uses:
                blocks.append(torch.zeros(captured.n, block.size))
                continue
            total = None
            for factor in uses:
                if isinstance(factor, OuterFactor):
                    like = factor.cols.data if hasattr(factor.cols, "data") else factor.rows.data  # type: ignore
                    p_rows, p_cols = self._on(block.name, like)
                    part = factor.project(p_rows, p_cols).reshape(captured.n, -1)
                else:
                    part = factor.project(self._on(block.name, factor.data)[0])
                total = part if total is None else total + part
            blocks.append(total)
        device = next((b.device for b in blocks if b.is_cuda), blocks[0].device if blocks else "cpu")
        return torch.cat([b.to(device).float() for b in blocks], dim=1) if blocks else torch.zeros(captured.n, 0)

    def project_gradients(self, grads: Mapping[str, Tensor]) -> Tensor:
        """Project full gradients given per parameter, ``[m, *param.shape]`` each (a leading batch axis): ``[m, dim]``."""
        blocks = []
        m = next(iter(grads.values())).shape[0]
        for block in self.layout:
            grad = grads.get(block.name)
            if grad is None:
                blocks.append(torch.zeros(m, block.size))
                continue
            grad = grad.double()
            if block.kind == "outer":
                matrix = grad.reshape(m, block.rows, block.cols)
                p_rows, p_cols = self._on(block.name, matrix)
                if p_rows is not None:
                    matrix = p_rows @ matrix
                if p_cols is not None:
                    matrix = matrix @ p_cols.T
                blocks.append(matrix.reshape(m, -1))
            else:
                flat = grad.reshape(m, -1)
                p = self._on(block.name, flat)[0]
                blocks.append(flat if p is None else flat @ p.T)
        return torch.cat([b.cpu() for b in blocks], dim=1).float()

    def layout_json(self) -> str:
        return json.dumps([asdict(block) for block in self.layout])

    def settings_json(self) -> str:
        return json.dumps(asdict(self.settings))
