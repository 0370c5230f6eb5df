"""In-Run Data Shapley values of one optimizer step (ALGORITHMS.md, "In-Run Data Shapley").

With ``u_i = -D * c_i`` (:mod:`inrun.valuation.update_rules`):

* first order:  ``phi_i = -<g_V(theta_t), u_i> = <D * g_V(theta_t), c_i>``;
* second order: ``phi_i = <D * g_V(theta_mid), c_i>`` with ``theta_mid = theta_t + Delta_0 + Delta_B / 2``, the
  midpoint-gradient form of ``g_V + H_V (Delta_0 + Delta_B / 2)``: one extra validation gradient per step, no double
  backward, no per-sample Hessian;
* per validation point: the same with each point's own loss gradient, a ``[batch, n_val]`` matrix.

Each product ``<w, c_i>`` with a fixed parameter-shaped ``w`` costs one matrix product per layer
(:meth:`CapturedBatch.dot_with`); per-sample gradients are never formed for the training batch.
A value is a reduction of validation loss: positive means the sample helped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from inrun.engine.algebra import parameter_dots, parameter_squared_norms
from inrun.engine.captured import CapturedBatch
from inrun.engine.factors import DenseSide, FlatFactor, IndexSide, OuterFactor
from inrun.valuation.update_rules import UpdateTerms
from inrun.valuation.validation import ValidationSet, shifted_parameters


@dataclass
class MicroBatch:
    """One backward pass's captured factors with the dataset ids (and optional source labels) of its samples."""

    captured: CapturedBatch
    sample_ids: Tensor
    sources: Tensor | None = None


@dataclass
class StepValues:
    """Everything recorded for one optimizer step (arrays are per sample, in micro-batch order)."""

    sample_ids: np.ndarray
    sources: np.ndarray
    value_1: np.ndarray
    value_2: np.ndarray | None
    grad_norm_sq: np.ndarray
    val_loss: float  # L_V(theta_t)
    val_loss_base: float  # L_V(theta_t + Delta_0): the utility of the empty set
    direction_norm_sq: float  # |D * g_V|^2, for cosine-normalised values
    per_val_1: np.ndarray | None = None  # [n, n_val]
    per_val_2: np.ndarray | None = None
    extras: dict = field(default_factory=dict)


def _update_shifts(terms: dict[str, UpdateTerms], grads: dict[str, Tensor], fraction_of_batch: float) -> dict[str, Tensor]:
    """``Delta_0 + fraction * Delta_B`` per parameter, with ``Delta_B = -D * G`` (one new tensor per parameter)."""
    shifts = {}
    for name, term in terms.items():
        shift = None
        if fraction_of_batch:
            if isinstance(term.scale, Tensor):
                shift = (torch.addcmul(term.delta0, term.scale, grads[name], value=-fraction_of_batch)
                         if term.delta0 is not None else term.scale * grads[name] * -fraction_of_batch)
            else:
                shift = grads[name] * (-fraction_of_batch * float(term.scale))
                if term.delta0 is not None:
                    shift.add_(term.delta0)
        elif term.delta0 is not None:
            shift = term.delta0
        if shift is not None:
            shifts[name] = shift if isinstance(shift, Tensor) else torch.as_tensor(shift)
    return shifts


def _stacked_directions(terms: dict[str, UpdateTerms], parts: list[tuple[dict[str, Tensor], bool]]
                        ) -> tuple[dict[str, Tensor], list[slice]]:
    """Every direction ``D * v`` the samples' contributions are multiplied with, stacked per parameter into one
    ``[m, *shape]`` tensor (written in place, no intermediate copies), so that one fused product per layer gives all
    of them: ``parts`` are ``(vectors, stacked)`` pairs (``stacked``: ``vectors[name]`` is ``[k, *shape]``).
    Returns the stacks and each part's column range of the product."""
    widths = []
    for vectors, stacked in parts:
        sample = next(iter(vectors.values()), None)
        widths.append(sample.shape[0] if stacked and sample is not None else 1)
    columns, start = [], 0
    for width in widths:
        columns.append(slice(start, start + width))
        start += width
    out: dict[str, Tensor] = {}
    for name, term in terms.items():
        if not all(name in vectors for vectors, _ in parts):
            continue
        first = parts[0][0][name]
        shape = first.shape[1:] if parts[0][1] else first.shape
        buffer = first.new_empty((start, *shape))
        for (vectors, stacked), column in zip(parts, columns):
            target = buffer[column] if stacked else buffer[column.start]
            torch.mul(vectors[name], term.scale, out=target)
        out[name] = buffer
    return out, columns


def _squared_norm(tensors: list[Tensor]) -> float:
    """``sum |x|^2`` over ``tensors``, each tensor's sum in float32 or float64 (torch's CPU sums are cascaded: ~1e-8
    relative in float32 at 6M entries; half-precision tensors are summed in float32) and the totals in float64. A
    float64 copy of every direction, as before, cost 6x more (~0.2 s per GPT-2-shaped step of 3 s) for no digit this
    diagnostic column needs."""
    wide = (torch.float32, torch.float64)
    return sum(float((t if t.dtype in wide else t.float()).square().sum()) for t in tensors)


def _ghost_values(microbatches: list[MicroBatch], terms: dict[str, UpdateTerms], val_parts: list) -> np.ndarray:
    """``[n, n_val]``: ``scale_p <c_i, c'_j>`` summed over parameters, from the Gram products of the training and
    validation points' factors (ghost dot products: no per-sample gradient materialised where that costs more)."""
    rows = []
    for mb in microbatches:
        blocks = []
        for part in val_parts:
            by_parameter = mb.captured.dots_by_parameter(part)
            total = None
            for name, dots in by_parameter.items():
                if name in terms:
                    term = float(terms[name].scale) * dots
                    total = term if total is None else total + term
            blocks.append(total if total is not None else torch.zeros(mb.captured.n, part.n))
        rows.append(torch.cat(blocks, dim=1))
    return torch.cat(rows).detach().double().cpu().numpy()


def _direction_norm_sq(terms: dict[str, UpdateTerms], val_parts: list, n_val: int) -> float:
    """``|D g_V|^2`` with ``g_V`` the mean of the validation points' gradients.

    Per parameter the cheaper of two exact forms: the squared norm of the points' summed contributions (one product
    of the weight's size, ``N (R + C)`` against ``R C`` for ``N`` validation positions) or the sum of the points'
    pairwise Gram products (``N^2``; kept for one-hot sides, whose sum would be a table-sized temporary per point).
    """
    total = 0.0
    for name in dict.fromkeys(name for part in val_parts for name in part.factors):
        if name not in terms:
            continue
        uses = [part.factors[name] for part in val_parts if name in part.factors]
        if _summing_pays([f for part_uses in uses for f in part_uses]):
            summed = sum(f.sum_over_samples().reshape(-1) for part_uses in uses for f in part_uses)
            squared = _squared_norm([summed])  # type: ignore[list-item]
        else:
            squared = sum(float(parameter_dots(a, b)[0].double().sum()) for a in uses for b in uses)
        total += float(terms[name].scale) ** 2 * squared
    return total / n_val**2


def _summing_pays(factors: list) -> bool:
    """Whether summing the contributions beats their Gram products (dense sides only; see _direction_norm_sq)."""
    positions, widest = 0, 0
    for f in factors:
        if isinstance(f, FlatFactor):
            continue
        if isinstance(f.rows, IndexSide) or isinstance(f.cols, IndexSide):
            return False
        positions += f.n * f.length
        widest = max(widest, f.rows.dim * f.cols.dim / (f.rows.dim + f.cols.dim))
    return positions >= widest


def _ghost_pays(microbatches: list[MicroBatch], n_val: int | None, per_val_point: bool) -> bool:
    """Whether ghost dot products with the validation points' factors cost less than products with the (scaled)
    validation gradient, for a per-parameter scalar scale (both routes are exact).

    Ghost: ``n n_val T T' (R + C)`` per matrix parameter (Gram matrices; a one-hot side counts 1), per-point values
    included. Direct: one weight-gradient-sized product ``n T R C`` per direction (one, or ``1 + n_val`` with
    per-point values) plus the validation weight gradient ``n_val T' R C``; ``T' = T`` is assumed. Many validation
    points against narrow layers (the main job: 32 points, width 64) favour the direct route; a few points against
    wide layers (the GPT-2-shaped benchmark: 2 points, width 768) the ghost one."""
    if not n_val:
        return True
    ghost = direct = 0.0
    for mb in microbatches:
        for uses in mb.captured.factors.values():
            for factor in uses:
                if not isinstance(factor, OuterFactor):
                    continue
                n, t = factor.n, factor.length
                rows_dense, cols_dense = isinstance(factor.rows, DenseSide), isinstance(factor.cols, DenseSide)
                r, c = factor.rows.dim, factor.cols.dim
                ghost += n * n_val * t * t * ((r if rows_dense else 1) + (c if cols_dense else 1))
                area = r * c if rows_dense and cols_dense else (r if rows_dense else c)
                direct += n * t * area * (1 + (n_val if per_val_point else 0)) + n_val * t * area / len(microbatches)
    return ghost <= direct


def _value_step_ghost(microbatches, terms, grads, validation, params, *, second_order, per_val_point,
                      record_norms) -> StepValues:
    """:func:`value_step` for update rules whose scale is one number per parameter (SGD, momentum, weight decay):
    every value is ``scale <c_i, c'_j>`` averaged over the validation points, so the validation points' own factors
    replace the validation gradient (one validation forward and backward, per-point values for free)."""
    val_loss, val_parts = validation.captured()
    n_val = validation.num_points
    per_val_1 = _ghost_values(microbatches, terms, val_parts)
    direction_norm_sq = _direction_norm_sq(terms, val_parts, n_val)
    base_shift = _update_shifts(terms, grads, 0.0)
    val_loss_base = val_loss
    if base_shift:
        with shifted_parameters(params, base_shift):
            val_loss_base = validation.loss()
    per_val_2 = None
    if second_order:
        with shifted_parameters(params, _update_shifts(terms, grads, 0.5)):
            _, mid_parts = validation.captured()
            per_val_2 = _ghost_values(microbatches, terms, mid_parts)
    if record_norms:
        norms = torch.cat([mb.captured.squared_norms() for mb in microbatches]).detach().double().cpu().numpy()
    else:
        norms = np.full(per_val_1.shape[0], np.nan)
    return StepValues(
        sample_ids=sample_ids_of(microbatches),
        sources=sources_of(microbatches),
        value_1=per_val_1.mean(axis=1),
        value_2=per_val_2.mean(axis=1) if per_val_2 is not None else None,
        grad_norm_sq=norms,
        val_loss=val_loss,
        val_loss_base=val_loss_base,
        direction_norm_sq=direction_norm_sq,
        per_val_1=per_val_1 if per_val_point else None,
        per_val_2=per_val_2 if per_val_point else None,
    )


def _part_kinds(per_val_point: bool, second_order: bool) -> list[tuple[None, bool]]:
    """Which parts of :func:`value_step`'s stacked directions are per validation point, in order."""
    kinds = [(None, False)] + ([(None, True)] if per_val_point else [])
    return kinds + (kinds if second_order else [])


def sample_sq_sums(microbatches: list[MicroBatch]) -> dict[str, float]:
    """``sum_i |c_i|^2`` per parameter over the step's samples (ghost norms), for ``adam_values="noise-eps"``."""
    totals: dict[str, float] = {}
    for mb in microbatches:
        for name, uses in mb.captured.factors.items():
            norms, _ = parameter_squared_norms(uses, memory_budget=mb.captured.memory_budget)
            totals[name] = totals.get(name, 0.0) + float(norms.double().sum())
    return totals


def sample_ids_of(microbatches: list[MicroBatch]) -> np.ndarray:
    return torch.cat([mb.sample_ids.reshape(-1) for mb in microbatches]).cpu().numpy().astype(np.int64)


def sources_of(microbatches: list[MicroBatch]) -> np.ndarray:
    return torch.cat(
        [mb.sources.reshape(-1) if mb.sources is not None else torch.full_like(mb.sample_ids, -1) for mb in microbatches]
    ).cpu().numpy().astype(np.int32)


def value_step(
    microbatches: list[MicroBatch],
    terms: dict[str, UpdateTerms],
    grads: dict[str, Tensor],
    validation: ValidationSet,
    params: dict[str, Tensor],
    *,
    second_order: bool,
    per_val_point: bool,
    record_norms: bool = True,
) -> StepValues:
    """Value every sample of the step's micro-batches; call before the optimizer steps (parameters at theta_t).

    ``grads`` is the full-batch gradient the optimizer will apply (after unscaling and clipping); ``terms`` the
    update rule read from the optimizer with those gradients.
    """
    # a validation set split across ranks may assemble the mean gradient more cheaply than every point's factors;
    # split, every rank must take the same route (their collectives differ), so the local cost choice is agreed on
    scalar = all(not isinstance(term.scale, Tensor) for term in terms.values())
    agree = getattr(validation, "on_every_rank", lambda flag: flag)
    if scalar and not getattr(validation, "prefers_gradient", lambda per_point: False)(per_val_point) and agree(
            _ghost_pays(microbatches, validation.num_points, per_val_point)):
        return _value_step_ghost(microbatches, terms, grads, validation, params, second_order=second_order,
                                 per_val_point=per_val_point, record_norms=record_norms)
    val_loss, val_grad = validation.gradient(params)

    base_shift = _update_shifts(terms, grads, 0.0)
    val_loss_base = val_loss
    if base_shift:
        with shifted_parameters(params, base_shift):
            val_loss_base = validation.loss()

    # Every direction the samples' contributions are multiplied with, stacked per parameter: one fused product
    # per layer and micro-batch gives the first- and second-order values (and per-point ones) together.
    parts: list[tuple[dict[str, Tensor], bool]] = [(val_grad, False)]
    if per_val_point:
        parts.append((validation.per_point_gradients(), True))
    if second_order:
        with shifted_parameters(params, _update_shifts(terms, grads, 0.5)):
            _, mid_grad = validation.gradient(params)
            parts.append((mid_grad, False))
            if per_val_point:
                parts.append((validation.per_point_gradients(), True))
    stacks, column_ranges = _stacked_directions(terms, parts)
    del parts, val_grad  # the stacks hold what is needed
    direction_norm_sq = _squared_norm([stack[0] for stack in stacks.values()])
    product_parts, norm_parts = [], []
    for mb in microbatches:
        products, norms = mb.captured.fixed_dots_and_norms([(stacks, True)], norms=record_norms)
        product_parts.append(products[0])
        norm_parts.append(norms)
    product = torch.cat(product_parts).detach().double().cpu().numpy()
    if not stacks:  # no parameter the validation loss reaches: every value is zero
        product = np.zeros((product.shape[0], column_ranges[-1].stop))
    arrays = [product[:, column] if stacked else product[:, column.start]
              for column, (_, stacked) in zip(column_ranges, _part_kinds(per_val_point, second_order))]
    value_1 = arrays.pop(0)
    per_val_1 = arrays.pop(0) if per_val_point else None
    value_2 = arrays.pop(0) if second_order else None
    per_val_2 = arrays.pop(0) if second_order and per_val_point else None
    if record_norms:
        norms = torch.cat(norm_parts).detach().double().cpu().numpy()  # type: ignore[arg-type]
    else:
        norms = np.full(value_1.shape[0], np.nan)
    return StepValues(
        sample_ids=sample_ids_of(microbatches),
        sources=sources_of(microbatches),
        value_1=value_1,
        value_2=value_2,
        grad_norm_sq=norms,
        val_loss=val_loss,
        val_loss_base=val_loss_base,
        direction_norm_sq=direction_norm_sq,
        per_val_1=per_val_1,
        per_val_2=per_val_2,
    )
