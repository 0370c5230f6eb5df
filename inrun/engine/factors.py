"""Per-sample gradient factors: the compact forms every supported layer reduces a sample's gradient to.

A layer's per-sample gradient contribution ``c_i`` to one parameter is held in one of two forms:

* :class:`OuterFactor` -- ``c_i = sum_t rows[i, t] (outer) cols[i, t]``, a ``R x C`` matrix laid out like
  ``param.reshape(R, C)``. Each side is a :class:`DenseSide` (``[n, T, d]`` activations or output gradients) or an
  :class:`IndexSide` (``[n, T]`` token ids standing for one-hot rows, as for an embedding table).
  Linear, Conv1D, Conv2d and Embedding weights take this form.
* :class:`FlatFactor` -- ``c_i`` materialised as a flat vector ``[n, numel]`` laid out like ``param.reshape(-1)``.
  Biases and normalisation weights take this form: it is as small as the parameter itself.

The operations here (Gram products, materialisation, products with fixed matrices, projection) are the building
blocks of :mod:`inrun.engine.algebra`; none of them forms a per-sample gradient unless asked to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor


@dataclass
class DenseSide:
    """One side of an outer-product factor held as a dense tensor ``[n, T, d]``."""

    data: Tensor

    @property
    def n(self) -> int:
        return self.data.shape[0]

    @property
    def length(self) -> int:
        return self.data.shape[1]

    @property
    def dim(self) -> int:
        return self.data.shape[2]

    def matmul(self, matrix: Tensor) -> Tensor:
        """``side @ matrix`` for ``matrix [dim, m]``: ``[n, T, m]``."""
        return self.data @ matrix

    def select(self, rows: Tensor | slice) -> "DenseSide":
        return DenseSide(self.data[rows])


@dataclass
class IndexSide:
    """One side of an outer-product factor made of one-hot vectors, stored as ids ``[n, T]`` into ``size`` rows."""

    ids: Tensor
    size: int

    @property
    def n(self) -> int:
        return self.ids.shape[0]

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @property
    def dim(self) -> int:
        return self.size

    def matmul(self, matrix: Tensor) -> Tensor:
        """``onehot(ids) @ matrix`` for ``matrix [size, m]``: a row gather, ``[n, T, m]``."""
        return matrix[self.ids]

    def select(self, rows: Tensor | slice) -> "IndexSide":
        return IndexSide(self.ids[rows], self.size)


Side = Union[DenseSide, IndexSide]


def side_gram(left: Side, right: Side) -> Tensor:
    """Dot products between every position of every sample of ``left`` and of ``right``: ``[n1, n2, T1, T2]``."""
    if isinstance(left, DenseSide) and isinstance(right, DenseSide):
        n1, t1, d = left.data.shape
        n2, t2, _ = right.data.shape
        flat = left.data.reshape(n1 * t1, d) @ right.data.reshape(n2 * t2, d).T
        return flat.reshape(n1, t1, n2, t2).permute(0, 2, 1, 3)
    if isinstance(left, IndexSide) and isinstance(right, IndexSide):
        equal = left.ids[:, None, :, None] == right.ids[None, :, None, :]
        return equal.to(torch.get_default_dtype())
    if isinstance(left, IndexSide):
        return side_gram(right, left).permute(1, 0, 3, 2)
    # Dense x index: entry (i, j, t, s) is left[i, t, ids[j, s]], a gather.
    n1, t1, _ = left.data.shape
    n2, t2 = right.ids.shape
    gathered = left.data[:, :, right.ids.reshape(-1)].reshape(n1, t1, n2, t2)
    return gathered.permute(0, 2, 1, 3)


def side_gram_diagonal(left: Side, right: Side) -> Tensor:
    """Like :func:`side_gram` for the same samples on both sides, keeping only ``i == j``: ``[n, T1, T2]``."""
    if isinstance(left, DenseSide) and isinstance(right, DenseSide):
        return torch.bmm(left.data, right.data.transpose(1, 2))
    if isinstance(left, IndexSide) and isinstance(right, IndexSide):
        return (left.ids[:, :, None] == right.ids[:, None, :]).to(torch.get_default_dtype())
    if isinstance(left, IndexSide):
        return side_gram_diagonal(right, left).transpose(1, 2)
    n, t1, _ = left.data.shape
    t2 = right.ids.shape[1]
    index = right.ids[:, None, :].expand(n, t1, t2)
    return torch.gather(left.data, 2, index)


def _scatter_rows(ids: Tensor, size: int, values: Tensor) -> Tensor:
    """``sum_t onehot(ids[i, t]) (outer) values[i, t]`` for every sample: ``[n, size, m]``."""
    n, length = ids.shape
    m = values.shape[-1]
    offsets = torch.arange(n, device=ids.device)[:, None] * size
    out = values.new_zeros(n * size, m)
    out.index_add_(0, (ids + offsets).reshape(-1), values.reshape(n * length, m))
    return out.reshape(n, size, m)


@dataclass
class OuterFactor:
    """``c_i = sum_t rows[i, t] (outer) cols[i, t]``, an ``R x C`` matrix per sample (see module docstring)."""

    rows: Side
    cols: Side

    @property
    def n(self) -> int:
        return self.rows.n

    @property
    def length(self) -> int:
        return self.rows.length

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.dim, self.cols.dim)

    @property
    def numel(self) -> int:
        return self.rows.dim * self.cols.dim

    def select(self, samples: Tensor | slice) -> "OuterFactor":
        return OuterFactor(self.rows.select(samples), self.cols.select(samples))

    def materialise(self) -> Tensor:
        """The per-sample matrices ``[n, R, C]`` (this is the expensive route; the algebra decides when to take it)."""
        rows, cols = self.rows, self.cols
        if isinstance(rows, DenseSide) and isinstance(cols, DenseSide):
            return torch.bmm(rows.data.transpose(1, 2), cols.data)
        if isinstance(rows, IndexSide) and isinstance(cols, DenseSide):
            return _scatter_rows(rows.ids, rows.size, cols.data)
        if isinstance(rows, DenseSide) and isinstance(cols, IndexSide):
            return _scatter_rows(cols.ids, cols.size, rows.data).transpose(1, 2)
        raise NotImplementedError("an outer factor with one-hot ids on both sides is not supported")

    def sum_over_samples(self) -> Tensor:
        """``sum_i c_i``: the full-batch gradient this factor contributes, ``[R, C]``."""
        if isinstance(self.rows, IndexSide) or isinstance(self.cols, IndexSide):
            return self.materialise().sum(0)
        rows = self.rows.data.reshape(-1, self.rows.dim)
        cols = self.cols.data.reshape(-1, self.cols.dim)
        return rows.T @ cols

    def dot_fixed(self, matrices: Tensor) -> Tensor:
        """``<c_i, G_m>`` for fixed matrices ``G [m, R, C]``: ``[n, m]``, one matrix product, no per-sample gradient.

        ``<G, sum_t r_t q_t^T> = sum_t r_t . (G q_t)``: apply ``G`` to the column side (a gather for one-hot ids),
        then reduce against the row side (a gather when the rows are one-hot).
        """
        rows, cols = self.rows, self.cols
        m, r, c = matrices.shape
        if isinstance(rows, IndexSide):
            picked = matrices.permute(1, 0, 2)[rows.ids]  # [n, T, m, C]
            return (picked * cols.data.unsqueeze(2)).sum(dim=(1, 3))
        if r > c and isinstance(cols, DenseSide):
            # the same product applied to the wider side: the intermediate is [n, T, m, C] rather than [n, T, m, R]
            # (same matrix-product flops, a smaller elementwise reduction: MLP input layers, tied output heads)
            applied = rows.matmul(matrices.permute(1, 0, 2).reshape(r, m * c)).reshape(self.n, self.length, m, c)
            return (applied * cols.data.unsqueeze(2)).sum(dim=(1, 3))
        stacked = matrices.reshape(m * r, c)
        applied = cols.matmul(stacked.T).reshape(self.n, self.length, m, r)  # [n, T, m, R]
        return (applied * rows.data.unsqueeze(2)).sum(dim=(1, 3))

    def project(self, rows_projection: Tensor | None, cols_projection: Tensor | None) -> Tensor:
        """Kronecker projection ``(P_rows (x) P_cols) vec(c_i)``: ``[n, k_rows, k_cols]``; ``None`` keeps a side whole."""
        like = dense_reference(self)
        rows = self._project_side(self.rows, rows_projection, like)
        cols = self._project_side(self.cols, cols_projection, like)
        return torch.bmm(rows.transpose(1, 2), cols)

    @staticmethod
    def _project_side(side: Side, projection: Tensor | None, like: Tensor) -> Tensor:
        if projection is not None:
            return side.matmul(projection.T)
        if isinstance(side, DenseSide):
            return side.data
        # a one-hot side kept whole (a table no larger than the projection): its one-hot vectors
        return torch.nn.functional.one_hot(side.ids, side.size).to(like.dtype)


@dataclass
class FlatFactor:
    """``c_i`` held materialised as ``data [n, numel]`` (parameter layout ``param.reshape(-1)``)."""

    data: Tensor

    @property
    def n(self) -> int:
        return self.data.shape[0]

    @property
    def numel(self) -> int:
        return self.data.shape[1]

    def select(self, samples: Tensor | slice) -> "FlatFactor":
        return FlatFactor(self.data[samples])

    def materialise(self) -> Tensor:
        return self.data

    def sum_over_samples(self) -> Tensor:
        return self.data.sum(0)

    def dot_fixed(self, matrices: Tensor) -> Tensor:
        """``<c_i, G_m>`` for fixed vectors ``G [m, ...]`` of the parameter's size: ``[n, m]``."""
        return self.data @ matrices.reshape(matrices.shape[0], -1).T

    def project(self, projection: Tensor | None) -> Tensor:
        """Dense projection ``P c_i``: ``[n, k]``; ``None`` keeps the vector whole."""
        return self.data if projection is None else self.data @ projection.T


Factor = Union[OuterFactor, FlatFactor]


def dense_reference(factor: Factor) -> Tensor:
    """A dense tensor of the factor (for its dtype, device and element size)."""
    if isinstance(factor, FlatFactor):
        return factor.data
    side = factor.cols if isinstance(factor.cols, DenseSide) else factor.rows
    assert isinstance(side, DenseSide)
    return side.data


def scale_factor(factor: Factor, coefficient: float) -> Factor:
    """The factor of ``coefficient * c_i`` (scales one dense side)."""
    if isinstance(factor, FlatFactor):
        return FlatFactor(factor.data * coefficient)
    if isinstance(factor.cols, DenseSide):
        return OuterFactor(factor.rows, DenseSide(factor.cols.data * coefficient))
    assert isinstance(factor.rows, DenseSide)
    return OuterFactor(DenseSide(factor.rows.data * coefficient), factor.cols)


def _pad_positions(side: Side, length: int) -> Side:
    extra = length - side.length
    if extra == 0:
        return side
    if isinstance(side, DenseSide):
        return DenseSide(torch.nn.functional.pad(side.data, (0, 0, 0, extra)))
    return IndexSide(torch.nn.functional.pad(side.ids, (0, extra)), side.size)


def concat_factors(factors: list[Factor]) -> Factor:
    """Stack factors of the same parameter along the sample axis (padding positions with zeros)."""
    first = factors[0]
    if isinstance(first, FlatFactor):
        return FlatFactor(torch.cat([f.data for f in factors]))  # type: ignore[union-attr]
    length = max(f.length for f in factors)  # type: ignore[union-attr]
    rows = [_pad_positions(f.rows, length) for f in factors]  # type: ignore[union-attr]
    cols = [_pad_positions(f.cols, length) for f in factors]  # type: ignore[union-attr]
    # A padded position must contribute nothing: its dense side is zero, whatever id the other side holds.

    def join(sides: list[Side]) -> Side:
        if isinstance(sides[0], DenseSide):
            return DenseSide(torch.cat([s.data for s in sides]))  # type: ignore[union-attr]
        return IndexSide(torch.cat([s.ids for s in sides]), sides[0].size)  # type: ignore[union-attr]

    return OuterFactor(join(rows), join(cols))


def zero_factor(template: Factor, n: int) -> Factor:
    """A factor like ``template`` for ``n`` samples whose contributions are all zero."""
    if isinstance(template, FlatFactor):
        return FlatFactor(template.data.new_zeros(n, template.numel))

    def zero_side(side: Side) -> Side:
        if isinstance(side, DenseSide):
            return DenseSide(side.data.new_zeros(n, 1, side.dim))
        return IndexSide(side.ids.new_zeros(n, 1), side.size)

    return OuterFactor(zero_side(template.rows), zero_side(template.cols))
