"""A captured batch: the per-sample gradient factors of ``n`` samples and every exact product between them.

:class:`CapturedBatch` holds, for each attributed parameter, one factor per use in the forward pass. Everything it
computes is exact: products between the per-sample gradients of two batches, squared norms, products with fixed
parameter-shaped tensors (a validation gradient), and the full-batch gradient as a check. Per layer it chooses between
the Gram route and materialising by cost (``_materialise_pays``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from inrun.engine.algebra import DEFAULT_MEMORY_BUDGET, parameter_dots, parameter_fixed_dots, parameter_squared_norms
from inrun.engine.factors import Factor, FlatFactor, IndexSide, OuterFactor, dense_reference, scale_factor
from inrun.errors import InRunError

LossFn = Callable[[nn.Module, Any], Tensor]


#: flop-equivalents of one memory-bound pass over one element of materialised per-sample gradients (measured on CPU:
#: 227M-element passes at ~1.2 ns each against ~0.025 ns per matrix-product flop)
ELEMENT_PASS_COST = 48
#: the same for a layer whose per-sample gradients fit in cache (at most CACHED_BYTES): written and re-read there.
#: Measured on the 2-core CPU (L3 32 MiB), batch 16, norms plus one or two directions: 16 predicts the faster route
#: for every layer from 64 x 64 to 512 x 512 up to 8 MiB (both routes within 5% where it errs); from 16 MiB on the
#: out-of-cache cost above does
CACHED_PASS_COST = 16
CACHED_BYTES = 8 << 20


class CapturedBatch:
    """Per-sample gradient factors of one batch of ``n`` samples, keyed by parameter name."""

    def __init__(self, factors: dict[str, list[Factor]], n: int, shapes: Mapping[str, torch.Size]):
        self.factors = factors
        self.n = n
        self.shapes = dict(shapes)
        #: parameter name -> route taken by the last product computed for it ("gram", "materialise" or "flat")
        self.routes: dict[str, str] = {}
        self.memory_budget = DEFAULT_MEMORY_BUDGET
        #: the per-sample losses of the batch, when captured by :func:`capture_batch`
        self.losses: Tensor | None = None
        #: "gram" or "materialise" to force one route for every outer-product factor; None chooses by cost
        self.force_route: str | None = None
        #: the least precise dtype the captured activations and output gradients had (bf16 under autocast)
        self.precision: torch.dtype | None = None

    @property
    def parameter_names(self) -> list[str]:
        return list(self.factors)

    def _zeros(self, *shape: int) -> Tensor:
        for uses in self.factors.values():
            return dense_reference(uses[0]).new_zeros(shape)
        return torch.zeros(shape)

    def _note_routes(self, name: str, routes) -> None:
        kinds = sorted({route.route for route in routes})
        self.routes[name] = kinds[0] if len(kinds) == 1 else "+".join(kinds)

    def dots(self, other: "CapturedBatch") -> Tensor:
        """``<g_i, g'_j>`` between this batch's and ``other``'s per-sample gradients: ``[n, other.n]``."""
        total = self._zeros(self.n, other.n)
        for name, uses in self.factors.items():
            if name not in other.factors:
                continue
            part, routes = parameter_dots(uses, other.factors[name], memory_budget=self.memory_budget, force=self.force_route)
            self._note_routes(name, routes)
            total = total + part
        return total

    def dots_by_parameter(self, other: "CapturedBatch") -> dict[str, Tensor]:
        """Like :meth:`dots`, one ``[n, other.n]`` matrix per parameter."""
        found = {}
        for name, uses in self.factors.items():
            if name in other.factors:
                found[name], routes = parameter_dots(uses, other.factors[name], memory_budget=self.memory_budget, force=self.force_route)
                self._note_routes(name, routes)
        return found

    def squared_norms(self) -> Tensor:
        """``|g_i|^2`` per sample (ghost norms): ``[n]``."""
        total = self._zeros(self.n)
        for name, uses in self.factors.items():
            part, routes = parameter_squared_norms(uses, memory_budget=self.memory_budget, force=self.force_route)
            self._note_routes(name, routes)
            total = total + part
        return total

    def dot_with(self, vectors: Mapping[str, Tensor], *, stacked: bool = False) -> Tensor:
        """``<g_i, v>`` with ``v`` given per parameter (parameter-shaped): ``[n]``.

        With ``stacked=True`` every ``vectors[name]`` is ``[m, *param.shape]`` and the result is ``[n, m]``.
        Parameters missing from ``vectors`` contribute nothing.
        """
        products, _ = self.fixed_dots_and_norms([(vectors, stacked)], norms=False)
        return products[0]

    def scaled(self, coefficient: float) -> "CapturedBatch":
        """The same batch with every per-sample contribution multiplied by ``coefficient`` (gradient clipping)."""
        return CapturedBatch(
            {name: [scale_factor(f, coefficient) for f in uses] for name, uses in self.factors.items()},
            self.n,
            self.shapes,
        )

    def fixed_dots_and_norms(
        self, directions: list[tuple[Mapping[str, Tensor], bool]], *, norms: bool = True
    ) -> tuple[list[Tensor], Tensor | None]:
        """Several :meth:`dot_with` products and :meth:`squared_norms` in one pass over the parameters.

        ``directions``: ``(vectors, stacked)`` pairs as for :meth:`dot_with`. Where a parameter's squared norm is
        cheapest by materialising its per-sample gradients, the same matrices give every product at the cost of a
        multiply, and they are dropped before the next parameter: the work and memory of one layer at a time.
        """
        results: list[Tensor | None] = [None] * len(directions)
        total_norms = self._zeros(self.n) if norms else None
        for name, uses in self.factors.items():
            dense = None
            # Materialising a layer costs one weight-gradient-sized product plus memory-bound passes over its
            # n x R x C per-sample gradients (one to write, one per product and for the norm); the direct route costs
            # a weight-gradient-sized product per direction plus the Gram norm. Take the cheaper one.
            single = len(uses) == 1 and self.force_route != "gram" and not _has_index_side(uses[0])
            if single and directions and _materialise_pays(uses[0], len(directions), norms, self.memory_budget):
                dense = uses[0].materialise().reshape(self.n, -1)
                self.routes[name] = "flat" if isinstance(uses[0], FlatFactor) else "materialise"
                if norms:
                    total_norms = total_norms + torch.einsum("np,np->n", dense, dense)
            elif norms:
                part, routes = parameter_squared_norms(uses, memory_budget=self.memory_budget, force=self.force_route)
                self._note_routes(name, routes)
                total_norms = total_norms + part
            for k, (vectors, stacked) in enumerate(directions):
                vector = vectors.get(name)
                if vector is None:
                    continue
                matrices = (vector if stacked else vector.unsqueeze(0)).to(dense_reference(uses[0]).dtype)
                if tuple(matrices.shape[1:]) != tuple(self.shapes[name]):
                    raise InRunError(f"vector for '{name}' has shape {tuple(matrices.shape[1:])}, "
                                     f"expected {tuple(self.shapes[name])}")
                if dense is not None:
                    part = dense @ matrices.reshape(matrices.shape[0], -1).T
                else:
                    part = parameter_fixed_dots(uses, matrices)
                results[k] = part if results[k] is None else results[k] + part
        out = []
        for (vectors, stacked), result in zip(directions, results):
            if result is None:
                m = next(iter(vectors.values())).shape[0] if stacked and vectors else 1
                result = self._zeros(self.n, m)
            out.append(result if stacked else result[:, 0])
        return out, total_norms

    def gradient_sums(self) -> dict[str, Tensor]:
        """``sum_i g_i`` per parameter, parameter-shaped: equals ``param.grad`` of the summed loss."""
        return {
            name: sum(factor.sum_over_samples().reshape(self.shapes[name]) for factor in uses)  # type: ignore[misc]
            for name, uses in self.factors.items()
        }

    def per_sample_gradients(self) -> dict[str, Tensor]:
        """Materialised per-sample gradients ``[n, *param.shape]`` (for checks and small models only)."""
        return {
            name: sum(f.materialise().reshape(self.n, *self.shapes[name]) for f in uses)  # type: ignore[misc]
            for name, uses in self.factors.items()
        }


def _materialise_pays(factor: Factor, directions: int, norms: bool, memory_budget: int) -> bool:
    """Whether materialising one layer's per-sample gradients is the cheaper way to its products and norm."""
    if factor.n * factor.numel * 4 > memory_budget:
        return False
    if isinstance(factor, FlatFactor):
        return True
    n, length, rows, cols = factor.n, factor.length, factor.rows.dim, factor.cols.dim
    product = n * length * rows * cols
    cached = n * rows * cols * dense_reference(factor).element_size() <= CACHED_BYTES
    pass_cost = CACHED_PASS_COST if cached else ELEMENT_PASS_COST
    materialise = product + pass_cost * n * rows * cols * (1 + directions + int(norms))
    direct = directions * product + (n * length * length * (rows + cols) if norms else 0)
    return materialise <= direct


def _has_index_side(factor: Factor) -> bool:
    """One-hot sides (embedding tables): their products are gathers; materialising writes a mostly-zero table."""
    return isinstance(factor, OuterFactor) and (isinstance(factor.rows, IndexSide) or isinstance(factor.cols, IndexSide))
