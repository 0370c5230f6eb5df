"""Exact per-sample gradient products from factors, choosing the cheaper route per layer.

Two exact routes compute ``<c_i, c'_j>`` for outer-product factors (ALGORITHMS.md, "ghost techniques"):

* ``gram``: ``<c_i, c'_j> = sum_{t,s} (rows_it . rows'_js)(cols_it . cols'_js)``, two ``T x T'`` Gram matrices per
  pair, never forming ``c_i``. Cost ``n n' T T' (d_rows + d_cols)``.
* ``materialise``: form ``c_i`` (``R x C`` per sample) and multiply. Cost ``(nT + n'T') R C + n n' R C``,
  memory ``(n + n') R C``.

:func:`choose_route` picks the route with fewer FLOPs unless materialising would exceed the memory budget.
A parameter used several times (tied weights, a module called twice) has one factor per use; its per-sample gradient
is the sum over uses, so products sum over every pair of uses, cross terms included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from inrun.engine.factors import (
    DenseSide,
    Factor,
    FlatFactor,
    OuterFactor,
    Side,
    dense_reference,
    side_gram,
    side_gram_diagonal,
)

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes a single layer's materialised gradients may take
GRAM_CHUNK_BYTES = 256 << 20  # bytes of Gram entries computed at once


@dataclass(frozen=True)
class RouteChoice:
    """The route chosen for one pair of factors, with the estimates that decided it."""

    route: str  # "gram", "materialise" or "flat"
    flops: float
    memory_bytes: float


def _gram_entry_cost(left: Side, right: Side) -> int:
    both_dense = isinstance(left, DenseSide) and isinstance(right, DenseSide)
    return left.dim if both_dense else 1


#: flop-equivalents per element of writing and re-reading a materialised table that is mostly zeros (measured on CPU:
#: the Gram route beats materialising an embedding table 10-80x where counting flops alone predicted the opposite)
TABLE_TRAFFIC_COST = 50.0


def _materialise_cost(factor: Factor) -> float:
    if isinstance(factor, FlatFactor):
        return 0.0
    dense_dims = [side.dim for side in (factor.rows, factor.cols) if isinstance(side, DenseSide)]
    if len(dense_dims) == 2:
        return float(factor.n * factor.length * factor.rows.dim * factor.cols.dim)
    scatter = factor.n * factor.length * dense_dims[0]
    return float(scatter + TABLE_TRAFFIC_COST * factor.n * factor.numel)


def choose_route(
    left: Factor,
    right: Factor,
    *,
    diagonal: bool,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    itemsize: int = 4,
    force: str | None = None,
) -> RouteChoice:
    """Pick ``gram`` or ``materialise`` for the products of two factors of one parameter.

    ``force`` ("gram" or "materialise") overrides the choice for outer-product factors (for tests and benchmarks).
    """
    numel = left.numel
    pairs = left.n if diagonal else left.n * right.n
    same = left is right  # a squared norm materialises its factor once
    materialise_flops = _materialise_cost(left) + (0.0 if same else _materialise_cost(right)) + pairs * numel
    materialise_memory = float((left.n + (0 if same else right.n)) * numel * itemsize)
    if isinstance(left, FlatFactor) or isinstance(right, FlatFactor):
        return RouteChoice("flat", materialise_flops, materialise_memory)
    entry = _gram_entry_cost(left.rows, right.rows) + _gram_entry_cost(left.cols, right.cols)
    gram_flops = float(pairs * left.length * right.length * entry)
    gram_memory = float(min(pairs * left.length * right.length * 2 * itemsize, GRAM_CHUNK_BYTES))
    if force is not None:
        if force not in ("gram", "materialise"):
            raise ValueError(f"force must be 'gram' or 'materialise', got {force!r}")
        flops, memory = (gram_flops, gram_memory) if force == "gram" else (materialise_flops, materialise_memory)
        return RouteChoice(force, flops, memory)
    if materialise_memory > memory_budget or gram_flops <= materialise_flops:
        return RouteChoice("gram", gram_flops, gram_memory)
    return RouteChoice("materialise", materialise_flops, materialise_memory)


def _flat(factor: Factor) -> Tensor:
    return factor.materialise().reshape(factor.n, -1)


def _gram_dots(left: OuterFactor, right: OuterFactor, itemsize: int) -> Tensor:
    """Pairwise ``[n1, n2]`` by the Gram route, in chunks of ``right``'s samples to bound memory."""
    per_sample = max(1, left.n * left.length * right.length * 2 * itemsize)
    chunk = max(1, GRAM_CHUNK_BYTES // per_sample)
    blocks = []
    for start in range(0, right.n, chunk):
        part = right if chunk >= right.n else right.select(slice(start, start + chunk))
        rows = side_gram(left.rows, part.rows)
        cols = side_gram(left.cols, part.cols)
        blocks.append((rows * cols).sum(dim=(2, 3)))
    return torch.cat(blocks, dim=1)


def _gram_diagonal(left: OuterFactor, right: OuterFactor, itemsize: int) -> Tensor:
    per_sample = max(1, left.length * right.length * 2 * itemsize)
    chunk = max(1, GRAM_CHUNK_BYTES // per_sample)
    blocks = []
    for start in range(0, left.n, chunk):
        samples = slice(start, start + chunk)
        a, b = (left, right) if chunk >= left.n else (left.select(samples), right.select(samples))
        blocks.append((side_gram_diagonal(a.rows, b.rows) * side_gram_diagonal(a.cols, b.cols)).sum(dim=(1, 2)))
    return torch.cat(blocks)


def factor_dots(left: Factor, right: Factor, route: RouteChoice, itemsize: int = 4) -> Tensor:
    """``<c_i, c'_j>`` for all pairs: ``[n1, n2]``."""
    if route.route == "gram":
        return _gram_dots(left, right, itemsize)  # type: ignore[arg-type]
    return _flat(left) @ _flat(right).T


def factor_diagonal_dots(left: Factor, right: Factor, route: RouteChoice, itemsize: int = 4) -> Tensor:
    """``<c_i, c'_i>`` for the same samples on both sides: ``[n]``."""
    if route.route == "gram":
        return _gram_diagonal(left, right, itemsize)  # type: ignore[arg-type]
    if left is right:
        flat = _flat(left)
        return torch.einsum("np,np->n", flat, flat)
    return (_flat(left) * _flat(right)).sum(1)


def parameter_dots(
    left: list[Factor], right: list[Factor], *, memory_budget: int = DEFAULT_MEMORY_BUDGET, force: str | None = None
) -> tuple[Tensor, list[RouteChoice]]:
    """Pairwise products of one parameter's per-sample gradients, summed over every pair of uses."""
    total = None
    routes = []
    for a in left:
        itemsize = dense_reference(a).element_size()
        for b in right:
            route = choose_route(a, b, diagonal=False, memory_budget=memory_budget, itemsize=itemsize, force=force)
            routes.append(route)
            part = factor_dots(a, b, route, itemsize)
            total = part if total is None else total + part
    assert total is not None
    return total, routes


def parameter_squared_norms(
    uses: list[Factor], *, memory_budget: int = DEFAULT_MEMORY_BUDGET, force: str | None = None
) -> tuple[Tensor, list[RouteChoice]]:
    """``|sum_u c_i^u|^2`` per sample, cross terms between uses included."""
    total = None
    routes = []
    for position, a in enumerate(uses):
        itemsize = dense_reference(a).element_size()
        for b in uses[position:]:
            route = choose_route(a, b, diagonal=True, memory_budget=memory_budget, itemsize=itemsize, force=force)
            routes.append(route)
            part = factor_diagonal_dots(a, b, route, itemsize)
            part = part if a is b else 2 * part
            total = part if total is None else total + part
    assert total is not None
    return total, routes


def parameter_fixed_dots(uses: list[Factor], matrices: Tensor) -> Tensor:
    """``<sum_u c_i^u, G_m>`` for fixed parameter-shaped tensors ``G [m, *param.shape]``: ``[n, m]``."""
    total = None
    for factor in uses:
        if isinstance(factor, OuterFactor):
            part = factor.dot_fixed(matrices.reshape(matrices.shape[0], *factor.shape))
        else:
            part = factor.dot_fixed(matrices)
        total = part if total is None else total + part
    assert total is not None
    return total

